"""Train one model: `python train.py attention=cbam_parallel`; a sweep: `python train.py -m ...`.
Data-parallel over N processes: `torchrun --nproc_per_node=N train.py ...` (README: Distributed training).

Exit status: 0 done, 2 bad input, 3 non-finite loss, 75 stopped by SIGTERM/SIGINT (resume=auto continues).
In a multirun a job that fails with 2 or 3 does not stop the others; the multirun exits with the first one's status.
"""

import sys

import hydra
from omegaconf import DictConfig

from cbam.cli import entry_point, run_hydra, torchrun_argv, train_job


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float:
    return train_job(cfg)["best_val_top1"]  # returned for sweepers that optimise it


if __name__ == "__main__":
    sys.argv = torchrun_argv(sys.argv)  # ranks > 0 of a torchrun job write no run dir of their own
    run_hydra(main)
