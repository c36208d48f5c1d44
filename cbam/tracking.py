"""Experiment tracking: Weights & Biases, or nothing (logger=none).

Our own run records (metrics.jsonl, summary.json) are the source of truth; W&B mirrors them. A W&B
failure therefore only warns: it never stops training.
"""

import logging
import netrc
import os
from pathlib import Path

from cbam.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
# Logged once per epoch, so plotted against the epoch; per-step metrics (train/step_loss, lr) keep the step.
EPOCH_METRICS = ("train/loss", "train/top1", "train/img_per_s", "train/data_wait_share", "train/epoch_time_s", "val/*")


class NullTracker:
    """logger=none: the same interface, doing nothing."""

    run_id = None

    def __init__(self, **_run):
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """auto: W&B's own WANDB_MODE if set, else online with an API key, else offline."""
    if mode not in MODES:
        raise ConfigError(f"logger.mode={mode!r} is unknown: use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _api_key_configured() else "offline"


class WandbTracker:
    """One W&B run, finished on exit even when training fails."""

    def __init__(
        self,
        *,
        project: str,
        entity: str | None,
        mode: str,
        init_timeout: float,
        run_dir: Path,
        name: str,
        group: str | None,
        tags: list[str],
        config: dict,
        run_id: str | None = None,
        job_type: str = "train",
    ):
        import wandb  # imported here so that logger=none never pays for it

        self._wandb = wandb
        mode = resolve_mode(mode)
        init = dict(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=tags,
            config=config,
            job_type=job_type,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=init_timeout, silent=True),
        )
        self.run = None
        try:
            self.run = wandb.init(mode=mode, **init)
        except Exception as e:  # W&B raises many types (network, auth, bad project); all mean "not online"
            if mode == "online":
                log.warning("W&B online init failed (%s); logging offline instead", str(e).splitlines()[0])
                try:
                    self.run = wandb.init(mode="offline", **init)
                    mode = "offline"
                except Exception as e2:
                    log.warning("W&B offline init failed too (%s); training goes on without W&B", e2)
            else:
                log.warning("W&B init failed (%s); training goes on without W&B", e)
        if self.run is not None and mode == "offline":
            log.info("W&B is logging offline: upload later with `wandb sync %s`", Path(self.run.dir).parent)
        self.run_id = self.run.id if self.run is not None else None
        self._guard(self._define_metrics)

    def _define_metrics(self) -> None:
        """Epoch metrics against the epoch, and the summaries a dashboard sorts runs by: the last epoch's
        val top-1 (what the comparison reports) and its maximum."""
        self.run.define_metric("epoch")
        for name in EPOCH_METRICS:
            self.run.define_metric(name, step_metric="epoch")
        self.run.define_metric("val/top1", step_metric="epoch", summary="last,max")

    def _guard(self, action, *args) -> None:
        if self.run is None:
            return
        try:
            action(*args)
        except Exception as e:
            log.warning("W&B call failed (%s); W&B logging stops, training goes on", e)
            run, self.run = self.run, None
            try:  # marked failed now: left open, the next run's init or wandb's exit hook would finish it as a success
                run.finish(exit_code=1)
            except Exception:
                pass  # W&B is already broken; our records hold the run

    def log(self, metrics: dict, step: int) -> None:
        self._guard(lambda: self.run.log(metrics, step=step))

    def summary(self, metrics: dict) -> None:
        self._guard(lambda: self.run.summary.update(metrics))

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """PNG files as W&B images, under viz/<name>."""
        self._guard(
            lambda: self.run.log(
                {f"viz/{k}": self._wandb.Image(str(p), caption=k) for k, p in images.items()}, step=step
            )
        )

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A preempted run ends with its own status (75) rather than a generic failure.
        self._guard(lambda: self.run.finish(exit_code=0 if exc_type is None else getattr(exc, "exit_code", 1)))
        self.run = None
