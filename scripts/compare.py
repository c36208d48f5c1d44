"""Compare attention variants across seeds from the runs' own records (never from W&B).

    python scripts/compare.py multirun/2026-11-25_18-00-00             # a sweep: writes <it>/compare/
    python scripts/compare.py run_a run_b run_c --baseline cbam --out report --no-wandb
    python scripts/compare.py results/ablation_fmnist --finished-only --no-wandb --readme README.md  # README's table
    python scripts/compare.py results/leave_one_out --baseline cbam_improved --bn-batch-stats  # eval.py bn_batch_stats

Writes comparison.md (also printed), comparison.csv, comparison.html and PNG plots to --out, and logs
one W&B run (job_type "compare") in the runs' group. Exit status: 0 done, 2 bad input (one line on stderr).
"""

import argparse
import logging
import sys
from pathlib import Path

from cbam.errors import EXIT_BAD_INPUT, ConfigError
from cbam.report import compare
from cbam.report.report import DEFAULT_BASELINE, DEFAULT_MARGIN

log = logging.getLogger("cbam")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun dir (its run subdirs are read) and/or run dirs")
    parser.add_argument(
        "--baseline", default=DEFAULT_BASELINE,
        help=f"the variant every other one is compared with (default: {DEFAULT_BASELINE})",
    )  # fmt: skip
    parser.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN,
        help="equivalence margin in top-1 points: 'equivalent' when the difference lies within +-margin "
        f"(default: {DEFAULT_MARGIN:g})",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help="output dir (default: <multirun dir>/compare, or ./compare for several dirs)"
    )
    parser.add_argument("--no-wandb", action="store_true", help="write the files only, log nothing to W&B")
    parser.add_argument(
        "--finished-only", action="store_true",
        help="compare the finished runs and name the others in a warning (a sweep still running), those "
        "training now apart from those that stopped; without it, an unfinished run is an error",
    )  # fmt: skip
    parser.add_argument(
        "--bn-batch-stats", action="store_true",
        help="compare each run's final weights with BatchNorm layers on batch statistics: the val top-1 that "
        "'python eval.py checkpoint=<run dir>/last.pt bn_batch_stats=GLOB' wrote beside the checkpoint; runs "
        "without layers matching GLOB keep their final-epoch top-1 (a diagnostic of running statistics)",
    )  # fmt: skip
    parser.add_argument(
        "--readme", type=Path,
        help="also replace the table kept for this comparison in this Markdown file: the block between "
        "'<!-- compare.py PATHS [--baseline B] [--margin M] [--bn-batch-stats] -->' (the options not at their "
        "defaults) "
        "and '<!-- /compare.py -->' (how README.md's results are regenerated)",
    )  # fmt: skip
    parser.add_argument(
        "--wandb-mode",
        choices=["auto", "online", "offline"],
        default="auto",
        help="auto: online with an API key, else offline (default: auto)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        if not args.margin > 0:
            raise ConfigError(f"--margin {args.margin} must be a positive number of top-1 points, e.g. --margin 0.2")
        compare(
            args.paths, baseline=args.baseline, margin=args.margin, out=args.out,
            wandb_mode=None if args.no_wandb else args.wandb_mode, readme=args.readme,
            finished_only=args.finished_only, bn_batch_stats=args.bn_batch_stats,
        )  # fmt: skip
    except ConfigError as e:
        log.error("error: %s", e)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
