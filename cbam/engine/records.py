"""A run's own records in its output dir: the source of truth for reports, W&B only mirrors them.

config.yaml     the resolved config
metrics.jsonl   one JSON row per epoch
summary.json    final and best metrics, cost, provenance
last.pt, best.pt
"""

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not measured"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(_json_safe(data), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class RunRecords:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.config = self.dir / "config.yaml"
        self.metrics = self.dir / "metrics.jsonl"
        self.summary = self.dir / "summary.json"
        self.last = self.dir / "last.pt"
        self.best = self.dir / "best.pt"

    def holds_a_run(self) -> bool:
        return self.metrics.exists() or self.last.exists() or self.summary.exists()

    def write_config(self, cfg: DictConfig) -> None:
        self.config.write_text(OmegaConf.to_yaml(cfg, resolve=True))

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def keep_epochs_before(self, epoch: int) -> None:
        """On resume: drop rows of epochs the checkpoint does not cover (they will be run again)."""
        rows = [r for r in self.read_metrics() if r["epoch"] < epoch]
        self.metrics.write_text("".join(json.dumps(_json_safe(r)) + "\n" for r in rows))

    def append_metrics(self, row: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary, summary)


def git_commit() -> str | None:
    """The commit the code ran at, with "-dirty" when the tree had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.strip() + ("-dirty" if dirty.strip() else "")
