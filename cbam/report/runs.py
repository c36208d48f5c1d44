"""Finding and reading finished runs: our own records (summary.json, metrics.jsonl, config.yaml), never W&B."""

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from cbam.engine.records import WHAT_A_RUN_HOLDS, RunRecords, evaluation_name
from cbam.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Run:
    name: str  # the run dir's name, or parent/name when two runs share a name
    dir: Path
    summary: dict
    config: dict  # the resolved config
    history: list[dict]  # metrics.jsonl, one row per epoch
    sweep: Path | None  # the multirun dir it was found in
    # the same final weights evaluated otherwise (compare.py --bn-batch-stats), compared in place of final_top1
    evaluated_top1: float | None = None

    @property
    def variant(self) -> str:
        return self.summary["variant"]

    @property
    def final_top1(self) -> float:
        """The final epoch's val top-1 as the run evaluated it (see README, "Comparing variants")."""
        return self.summary["final"]["val/top1"]

    @property
    def top1(self) -> float:
        """The accuracy compared: the final epoch's, unless the comparison evaluates the runs otherwise."""
        return self.final_top1 if self.evaluated_top1 is None else self.evaluated_top1


# A multirun job's dir as conf/train.yaml's hydra.sweep.subdir names it: <job>-<model>-<variant>-s<seed>.
SWEEP_JOB_DIR = re.compile(r"\d+-.+-s\d+")


def find_run_dirs(paths: Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """(run dir, the multirun dir it belongs to or None), for run dirs and multirun dirs (their subdirs). A
    run dir given alone (`multirun/x/*-resnet56-*`) belongs to its parent when it is named as a sweep's job,
    so that the commands that decide a row continue that sweep."""
    if not paths:
        raise ConfigError(f"no runs given: pass a multirun dir or run dirs ({WHAT_A_RUN_HOLDS})")
    found: dict[Path, Path | None] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(f"{path} does not exist or is not a dir: pass a multirun dir or run dirs")
        if RunRecords(path).holds_a_run():
            found.setdefault(path.resolve(), path.resolve().parent if SWEEP_JOB_DIR.fullmatch(path.name) else None)
            continue
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and RunRecords(p).holds_a_run())
        if not subdirs:
            raise ConfigError(f"no run records found in {path}: {WHAT_A_RUN_HOLDS}")
        for sub in subdirs:
            found.setdefault(sub.resolve(), path.resolve())
    return list(found.items())


def _names(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" for d in dirs]


def load_runs(paths: Sequence[str | Path], finished_only: bool = False) -> list[Run]:
    """Every run under `paths`; one ConfigError naming all runs that did not finish (no summary.json), or
    with `finished_only` (a sweep still running) a warning naming them, and the finished ones. Runs that
    are training now (their train.lock is held) are told apart from runs that stopped."""
    found, training, stopped = [], [], []
    for run_dir, sweep in find_run_dirs(paths):
        records = RunRecords(run_dir)
        if records.summary.exists():
            found.append((run_dir, sweep))
        elif holder := records.trainer():
            training.append(f"{run_dir} ({holder})")
        else:
            stopped.append(str(run_dir))
    if (training or stopped) and not finished_only:
        problems = []
        if training:
            problems.append(
                f"{len(training)} run(s) are training now: {', '.join(training)}; "
                "wait for them to finish or pass --finished-only"
            )
        if stopped:
            problems.append(
                f"{len(stopped)} run(s) did not finish (no summary.json): {', '.join(stopped)}; "
                "resume them (train.py ... hydra.run.dir=<run dir> resume=auto), pass only finished runs, "
                "or pass --finished-only"
            )
        raise ConfigError("; ".join(problems))
    if training:
        log.warning(
            "warning: leaving out %d run(s) training now: %s; a command that trains more seeds into their sweep "
            "(as below) may train one of theirs again under another job number: run it once they have finished",
            len(training), ", ".join(training),
        )  # fmt: skip
    if stopped:
        log.warning("warning: leaving out %d unfinished run(s): %s", len(stopped), ", ".join(stopped))
    if not found:
        raise ConfigError(f"no finished runs in {', '.join(map(str, paths))} yet")
    runs = []
    for (run_dir, sweep), name in zip(found, _names([d for d, _ in found]), strict=True):
        records = RunRecords(run_dir)
        for path in (records.config, records.metrics):
            if not path.exists():
                raise ConfigError(f"{run_dir} has summary.json but no {path.name}: {WHAT_A_RUN_HOLDS}")
        try:
            summary, config, history = records.read_summary(), records.read_config(), records.read_metrics()
        except (ValueError, OSError) as e:  # JSON and YAML errors are ValueErrors
            raise ConfigError(f"cannot read the records of {run_dir}: {str(e).splitlines()[0]}") from e
        runs.append(Run(name, run_dir, summary, config, history, sweep))
    return runs


def common_dataset(runs: list[Run]) -> str:
    """The dataset all runs were trained on; a ConfigError when they were not all on one."""
    by_data: dict[str, list[str]] = {}
    for run in runs:
        by_data.setdefault(run.summary["data"], []).append(run.name)
    if len(by_data) > 1:
        listing = "; ".join(f"{data}: {', '.join(names)}" for data, names in by_data.items())
        raise ConfigError(
            f"the runs were trained on different datasets ({listing}): compare the runs of one dataset at a time"
        )
    return next(iter(by_data))


BN_BATCH_STATS_RECORD = evaluation_name(Path("last.pt"), bn_batch_stats=True) + ".json"
EVAL_COMMAND = "python eval.py checkpoint={run}/last.pt 'bn_batch_stats={pattern}'"


@dataclass(frozen=True)
class BatchStatsEval:
    """How compare.py --bn-batch-stats's accuracies were measured: eval.py's glob and val batch size."""

    pattern: str
    batch_size: int


def use_bn_batch_stats(runs: list[Run]) -> BatchStatsEval:
    """Compare each run's final weights with BatchNorm layers on batch statistics: the val top-1 that
    `eval.py checkpoint=<run>/last.pt bn_batch_stats=GLOB` wrote to BN_BATCH_STATS_RECORD beside it. A run
    whose model has no BatchNorm the glob matches keeps its final-epoch top-1 (the diagnostic would change
    nothing there); a run that has such layers but no record is an error that says how to make it, and so
    are records of other weights and records measured another way (batch statistics depend on the batch)."""
    from cbam.models import batch_norms_matching, build_model  # torch: only for this option

    ways: dict[BatchStatsEval, list[str]] = {}
    for run in runs:
        path = run.dir / BN_BATCH_STATS_RECORD
        if not path.exists():
            continue
        remake = EVAL_COMMAND.format(run=run.dir, pattern="<glob of BN layers>")
        try:
            record = json.loads(path.read_text())
            way = BatchStatsEval(record["bn_batch_stats"]["pattern"], int(record["bn_batch_stats"]["batch_size"]))
            checkpoint, epoch, top1 = Path(record["checkpoint"]), record["epoch"], float(record["val/top1"])
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read {path} ({e!r}): make it again with {remake}") from e
        # eval.py records the path as given: a bare last.pt was evaluated from inside the run dir
        if checkpoint.name != "last.pt" or checkpoint.parent.name not in (run.dir.name, ""):
            raise ConfigError(f"{path} is the record of {checkpoint}, not of this run's last.pt: {remake}")
        if epoch != run.summary["epochs"]:
            raise ConfigError(
                f"{path} evaluated the weights of epoch {epoch}, but the run ended at epoch {run.summary['epochs']}: "
                f"evaluate its last.pt again ({EVAL_COMMAND.format(run=run.dir, pattern=way.pattern)})"
            )
        ways.setdefault(way, []).append(run.name)
        run.evaluated_top1 = top1
    if not ways:
        raise ConfigError(
            f"--bn-batch-stats: none of the runs has {BN_BATCH_STATS_RECORD}: make them with "
            + EVAL_COMMAND.format(run="<run dir>", pattern="<glob of BN layers>")
        )
    if len(ways) > 1:
        listing = "; ".join(f"{w.pattern!r} in batches of {w.batch_size}: {', '.join(n)}" for w, n in ways.items())
        raise ConfigError(
            f"the {BN_BATCH_STATS_RECORD} records were measured in different ways ({listing}): evaluate them all "
            f"alike, e.g. {EVAL_COMMAND.format(run='<run dir>', pattern=next(iter(ways)).pattern)}"
        )
    [way] = ways
    lacking = [
        str(run.dir) for run in runs
        if run.evaluated_top1 is None and batch_norms_matching(build_model(OmegaConf.create(run.config)), way.pattern)
    ]  # fmt: skip
    if lacking:
        raise ConfigError(
            f"{len(lacking)} run(s) have BatchNorm layers matching {way.pattern!r} but no {BN_BATCH_STATS_RECORD} "
            f"({', '.join(lacking)}): make it in each with {EVAL_COMMAND.format(run='<run dir>', pattern=way.pattern)}"
        )
    return way
