"""Train one model: `python train.py attention=cbam_parallel`; a sweep: `python train.py -m ...`.

Exit status: 0 done, 2 bad input, 3 non-finite loss, 75 stopped by SIGTERM/SIGINT (resume=auto continues).
"""

import hydra
from omegaconf import DictConfig

from cbam.cli import entry_point
from cbam.engine.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float:
    return train(cfg)["best_val_top1"]  # returned for sweepers that optimise it


if __name__ == "__main__":
    main()
