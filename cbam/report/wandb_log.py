"""The comparison as one W&B run (job_type "compare") in the group of the runs it compares.

It mirrors the files written to --out; a W&B failure only warns.
"""

import logging
from pathlib import Path

from cbam.tracking import resolve_mode

from .runs import Run

log = logging.getLogger(__name__)


def wandb_group(runs: list[Run]) -> str | None:
    """The runs' W&B group: their config's `group`, else the multirun dir they all came from (as train.py does)."""
    groups = {run.config.get("group") for run in runs}
    if len(groups) == 1 and None not in groups:
        return groups.pop()
    sweeps = {run.sweep for run in runs}
    if len(sweeps) == 1 and None not in sweeps:
        return sweeps.pop().name
    return None


def _init(wandb, mode: str, **init):
    try:
        return wandb.init(mode=mode, **init)
    except Exception as e:  # W&B raises many types (network, auth, bad project); all mean "not online"
        if mode != "online":
            raise
        log.warning("warning: W&B online init failed (%s); logging offline instead", str(e).splitlines()[0])
        return wandb.init(mode="offline", **init)


def log_comparison(
    *,
    runs: list[Run],
    name: str,
    mode: str,
    out: Path,
    config: dict,
    columns: list[str],
    rows: list[dict],
    run_rows: list[dict],
    plots: dict[str, Path],
) -> str | None:
    """Log the comparison table, one row per run (variant, seed, top-1 compared and final-epoch, train img/s)
    and the plots, as a run called `name`; returns the W&B run id, or None when W&B failed (a warning says why)."""
    logger = runs[0].config.get("logger") or {}
    try:
        import wandb

        run = _init(
            wandb,
            resolve_mode(mode),
            project=logger.get("project", "cbam-ablate"),
            entity=logger.get("entity"),
            name=name,
            job_type="compare",
            group=wandb_group(runs),
            tags=["compare", runs[0].summary["data"]],
            config=config,
            dir=str(out),
            settings=wandb.Settings(init_timeout=logger.get("init_timeout", 60), silent=True),
        )
    except Exception as e:
        log.warning("warning: W&B init failed (%s); the comparison's files are written all the same", e)
        return None
    run_id, offline, files = run.id, run.settings.mode == "offline", Path(run.dir).parent
    with run:  # finishes the run, also when logging fails
        try:
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows], allow_mixed_types=True)
            per_run = list(run_rows[0]) if run_rows else []
            run_table = wandb.Table(columns=per_run, data=[[r[c] for c in per_run] for r in run_rows])
            images = {name: wandb.Image(str(path), caption=name) for name, path in plots.items()}
            run.log({"comparison": table, "runs": run_table} | images)
        except Exception as e:
            log.warning("warning: W&B logging failed (%s); the comparison's files are written all the same", e)
    if offline:
        log.info("W&B run logged offline: upload it with `wandb sync %s`", files)
    return run_id
