"""What the entry points share: Hydra's runtime state read in one place, and bad input as one line on
stderr with a documented exit status."""

import atexit
import functools
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from traceback import format_exc

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cbam.engine.distributed import launched_rank, launched_world_size
from cbam.engine.run import RunContext, train, variant_label
from cbam.errors import EXIT_BAD_INPUT, CbamError, ConfigError, Preempted

log = logging.getLogger("cbam")

# A multirun's run dirs are named by variant (conf/train.yaml, hydra.sweep.subdir), as compare.py groups runs:
# two variants of one preset (`attention=cbam attention.reduction=8`) never share a dir, also when a later
# command into the same sweep dir numbers its jobs from 0 again.
OmegaConf.register_new_resolver(
    "cbam_variant", lambda preset, overrides: variant_label(preset, overrides).replace(os.sep, "_"), replace=True
)


def entry_point(fn):
    """Turn the errors a user can act on into one line and an exit status instead of a traceback.

    In a multirun, a job that diverges or is given a bad value ends only itself: Hydra records it as failed
    and runs the rest, then raises the first failure, which `run_hydra` turns into this exit status. A stop
    signal (Preempted) still ends the whole multirun at once: that is what it asks for. So does any error
    under torchrun with several processes: one seen by rank 0 alone (a checkpoint it could not write) would
    leave the others waiting in the next job's collectives."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CbamError as e:
            e.report(log)
            if isinstance(e, Preempted) or HydraConfig.get().mode != RunMode.MULTIRUN or launched_world_size() > 1:
                sys.exit(e.exit_code)
            failed = e
        except Exception as e:  # a crash (out of memory, a bug): Hydra runs the other jobs of a multirun all the same
            if HydraConfig.get().mode != RunMode.MULTIRUN or launched_world_size() > 1:
                raise
            # its traceback now, as text: a log record holding the exception would hold its frames too
            log.error("the job crashed; the multirun goes on, and ends with this error\n%s", format_exc().rstrip())
            failed = e
        # Hydra keeps a failed job's exception until every job has run: without its traceback, whose frames
        # hold the job's model, optimizer and in-memory dataset, so that those are freed for the next job.
        failed.__traceback__ = failed.__context__ = failed.__cause__ = None
        raise failed

    return wrapper


def attention_presets(selection) -> list[str]:
    """The presets a script's `variants=` names, `none` (the baseline of every ratio) first: null for every
    preset in conf/attention/, a list, or one comma-separated string (`variants=cbam` is a string to Hydra);
    a ConfigError naming those that are not presets. Inside a Hydra app (its config search path)."""
    known = GlobalHydra.instance().config_loader().get_group_options("attention")
    names = known if selection is None else selection.split(",") if isinstance(selection, str) else list(selection)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"variants: {', '.join(unknown)} not in conf/attention/ (there: {', '.join(sorted(known))})")
    return list(dict.fromkeys(["none", *sorted(names)]))


def _one_line(e: Exception) -> str:
    """Hydra's multi-line composition message as one line: "Could not find 'attention/nope'", then the
    options it lists, comma-separated."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    head, *rest = lines
    head = head.rstrip(".")
    listing = next((i for i, line in enumerate(rest) if line.startswith("Available options")), None)
    if listing is None:
        return "; ".join([head, *rest])
    options = []
    for line in rest[listing + 1 :]:
        if ":" in line:  # the next block ("Config search path:")
            break
        options.append(line)
    return f"{head}: use one of {', '.join(options)}"


def run_hydra(main) -> None:
    """Call a `@hydra.main` function so that a config that does not compose (an unknown preset or key, an
    override that does not parse) is one line and exit 2, like every other bad input: Hydra itself prints
    several lines and exits 1. HYDRA_FULL_ERROR makes Hydra raise instead of printing; a crash still
    ends in a traceback (then a complete one)."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except CbamError as e:  # a multirun's first failed job, raised by Hydra once every job has run
        print(f"error: a job of this multirun failed (the others ran): {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def hydra_run_context() -> RunContext:
    """The RunContext of the current Hydra job: its output dir, chosen presets and overrides, and in a
    multirun the sweep dir's name as the default W&B group."""
    hydra = HydraConfig.get()
    group = Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None
    return RunContext(
        run_dir=Path(hydra.runtime.output_dir),
        choices=dict(hydra.runtime.choices),
        overrides=list(hydra.overrides.task),
        group=group,
        job=hydra.job.num if hydra.mode == RunMode.MULTIRUN else None,
    )


def train_job(cfg: DictConfig) -> dict:
    """train.py's job: the run Hydra composed, with the end-of-run figures when trainer.visualize is on."""
    end_of_run = []
    if cfg.trainer.visualize:
        from cbam.viz import end_of_run_figures  # matplotlib only when asked for

        end_of_run.append(end_of_run_figures)
    return train(cfg, hydra_run_context(), end_of_run=end_of_run)


# Hydra keys that would give a rank its own run dir or train.log.
_OWN_OUTPUT = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra/job_logging=", "hydra.job_logging.")


def torchrun_argv(argv: list[str]) -> list[str]:
    """The command line Hydra should see in this process: as given, except under torchrun on ranks > 0.

    Each rank runs Hydra itself, and a `${now:}` in the run dir resolves to another second on each; rank 0's
    dir is the run's (train() broadcasts it to the others). So a rank > 0 gets a throwaway Hydra dir,
    removed at exit, and logs warnings to stderr only: no dir and no train.log of its own anywhere.
    """
    rank = launched_rank()
    if rank == 0:
        return argv
    tmp = tempfile.mkdtemp(prefix=f"cbam-rank{rank}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    ours = [
        f"hydra.run.dir={tmp}",
        f"hydra.sweep.dir={tmp}",
        "hydra/job_logging=stderr",
        "hydra/hydra_logging=disabled",  # rank 0 prints Hydra's own lines (a multirun's job list)
        "hydra.job_logging.root.level=WARNING",
        f"hydra.job_logging.formatters.plain.format='[rank {rank}] %(levelname)s: %(message)s'",
    ]
    args = [a for a in argv[1:] if not a.lstrip("+").startswith(_OWN_OUTPUT)]
    # Hydra's overrides must stay one block (argparse takes one run of positionals): ours go before the first.
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return [argv[0], *args[:at], *ours, *args[at:]]
