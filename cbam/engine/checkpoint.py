"""Checkpoints: written atomically, loaded with weights_only=True, checked against the model."""

import errno
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from cbam.errors import ConfigError, Diverged


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable, made for another model, or could not be written."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temp file in the same dir, fsync, then rename over `path`: a crash at any moment
    leaves either the old checkpoint or the new one, never a torn file. Weights that are not finite
    are refused, so a diverged run never replaces a good checkpoint."""
    path = Path(path)
    bad = [k for k, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise Diverged(
            f"not writing {path.name}: the weights are not finite "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
            "the previous checkpoint is kept. Lower optim.optimizer.lr or set trainer.grad_clip"
        )
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        os_error = _os_error_behind(e)
        if os_error is not None:
            full = os_error.errno == errno.ENOSPC
            hint = "free some space or move the run (hydra.run.dir)" if full else "check the run dir"
            raise CheckpointError(
                f"could not write {path} ({os_error.strerror or os_error}): {hint}; the previous checkpoint is intact"
            ) from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _os_error_behind(e: BaseException) -> OSError | None:
    """The OSError that caused `e`, if any: torch.save turns a full disk into a RuntimeError of its zip
    writer, raised while handling the OSError."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the path of a last.pt or best.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file: pass the path of a last.pt or best.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # no permission to read it, an I/O error
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror or e}): check the file") from e
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}); pass a last.pt or best.pt"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is a torch file but not a cbam-ablate checkpoint (no model and config in it)")
    return state


def load_model_state(
    model: nn.Module,
    state_dict: dict,
    source: str,
    remedy: str = "Use the same model= and attention= as the run that wrote it",
) -> None:
    """Strict load with an error that lists what differs, e.g. a checkpoint of another variant, and says
    what to do (`remedy`)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                # One entry per parameter kind, not per block: layer2.1.attn... -> layer*.*.attn...
                kinds = sorted({re.sub(r"layer\d+\.\d+\.", "layer*.*.", k) for k in keys})
                parts.append(f"{label} ({len(keys)}): {', '.join(kinds[:8])}{', ...' if len(kinds) > 8 else ''}")
        raise CheckpointError(
            f"{source} was saved from a different model or attention variant: {'; '.join(parts)}. {remedy}"
        )
    model.load_state_dict(state_dict)
