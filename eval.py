"""Evaluate a checkpoint: `python eval.py checkpoint=outputs/.../best.pt`.

Prints val loss, top-1, top-5, per-class accuracy and throughput as JSON and writes them beside the
checkpoint. Exit status: 0 done, 2 bad input (e.g. a path that is not a checkpoint).
"""

import hydra
from omegaconf import DictConfig

from cbam.cli import entry_point, run_hydra
from cbam.engine.eval_checkpoint import evaluate_checkpoint


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@entry_point
def main(cfg: DictConfig) -> None:
    evaluate_checkpoint(cfg)


if __name__ == "__main__":
    run_hydra(main)
