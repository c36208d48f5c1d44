"""Attention maps, Grad-CAM and channel weights of checkpoints, side by side.

    python scripts/visualize.py checkpoint=runs/none/last.pt checkpoint=runs/cbam/last.pt
    python scripts/visualize.py checkpoint=[runs/none/last.pt,runs/cbam/last.pt] blocks=[layer2.2] target=label

Writes attention_grid.png and channel_weights.png (to <first run dir>/viz/ unless output=DIR) and
prints their paths. Exit status: 0 done, 2 bad input (e.g. a checkpoint that does not exist).
"""

import sys

import hydra
from omegaconf import DictConfig

from cbam.cli import entry_point, run_hydra
from cbam.viz import visualize_checkpoints


def merge_repeated(args: list[str], key: str = "checkpoint") -> list[str]:
    """`key=a key=b` -> `key=['a','b']`: Hydra would silently keep only the last of repeated keys."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    if len(values) < 2:
        return args
    items = [v[1:-1] if v.startswith("[") and v.endswith("]") else "'" + v.replace("'", "\\'") + "'" for v in values]
    first = next(i for i, a in enumerate(args) if a.startswith(f"{key}="))
    rest = [a for a in args if not a.startswith(f"{key}=")]
    return rest[:first] + [f"{key}=[{','.join(i for i in items if i)}]"] + rest[first:]


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
@entry_point
def main(cfg: DictConfig) -> None:
    visualize_checkpoints(cfg)


if __name__ == "__main__":
    sys.argv[1:] = merge_repeated(sys.argv[1:])
    run_hydra(main)
