"""`compare(paths)`: read finished runs, group them by variant, write the comparison to --out."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .fairness import IGNORED, Difference, config_differences
from .render import html_table, markdown_table, render_html, write_csv
from .runs import Run, common_dataset, find_run_dirs, load_runs
from .table import COLUMNS, CSV_COLUMNS, Variant, csv_row, markdown_row, summarize

log = logging.getLogger(__name__)

TITLE = "Attention variants compared"
NOTE = (
    "Accuracy is the final epoch's val top-1 (summary.json final['val/top1']), not the best epoch's: the val "
    "split is the dataset's test split (unless data.holdout > 0), so picking the best epoch on it would give an "
    "optimistic, selected number. Mean ± sample std over seeds. Δ: difference of the mean to the baseline's, "
    "with a 95% confidence interval (Welch–Satterthwaite df, t quantile); p: Welch's two-sided t-test; n/a where "
    "a side has one run or both have zero variance. train img/s: mean training throughput, and its ratio to the "
    "baseline's."
)
FAIR = (
    "None: the runs' resolved configs differ only in the attention config and the seed "
    f"(not compared: {', '.join(IGNORED)})."
)
RUN_COLUMNS = ["run", "variant", "seed", "val top-1 %", "dir"]


@dataclass
class Comparison:
    runs: list[Run]
    variants: list[Variant]  # table order: the baseline first
    baseline: str
    data: str
    differences: list[Difference]

    def described(self) -> str:
        models = ", ".join(sorted({r.summary["model"] for r in self.runs}))
        epochs = ", ".join(sorted({str(r.summary["epochs"]) for r in self.runs}))
        return (
            f"Compared {len(self.runs)} runs of {len(self.variants)} variants: {models} on {self.data}, "
            f"{epochs} epochs each; baseline: {self.baseline}."
        )

    def table_rows(self) -> list[dict]:
        return [markdown_row(v) for v in self.variants]

    def csv_rows(self) -> list[dict]:
        return [csv_row(v) for v in self.variants]

    def run_rows(self) -> list[dict]:
        return [
            {
                "run": r.name,
                "variant": r.variant,
                "seed": r.summary["seed"],
                "val top-1 %": f"{r.top1:.2f}",
                "dir": str(r.dir),
            }
            for v in self.variants
            for r in v.runs
        ]

    def config(self) -> dict:
        """What the W&B run records as its config."""
        return {
            "baseline": self.baseline,
            "data": self.data,
            "variants": [v.name for v in self.variants],
            "runs": [
                {
                    "name": r.name,
                    "variant": r.variant,
                    "seed": r.summary["seed"],
                    "wandb_run_id": r.summary.get("wandb_run_id"),
                    "dir": str(r.dir),
                }
                for r in self.runs
            ],
        }


def build(paths: Sequence[str | Path], baseline: str = "none") -> Comparison:
    runs = load_runs(paths)
    data = common_dataset(runs)
    variants = summarize(runs, baseline)
    return Comparison(runs, variants, baseline, data, config_differences(runs))


def render_markdown(c: Comparison) -> str:
    unfair = "\n".join(f"- `{d}`" for d in c.differences) if c.differences else FAIR
    return f"""# {TITLE}

{c.described()}

{markdown_table(c.table_rows(), COLUMNS)}

{NOTE}

## Unfair comparisons

{unfair}

## Plots

![val top-1 per variant](accuracy.png)
![val top-1 per epoch](curves.png)
![accuracy vs throughput](accuracy_vs_throughput.png)

## Runs

{markdown_table(c.run_rows(), RUN_COLUMNS)}
"""


def default_out(paths: Sequence[str | Path]) -> Path:
    """<multirun dir>/compare for one multirun dir, else ./compare."""
    found = find_run_dirs(paths)
    sweeps = {sweep for _, sweep in found}
    if len(paths) == 1 and len(sweeps) == 1 and None not in sweeps:
        return Path(paths[0]) / "compare"
    return Path("compare")


def compare(
    paths: Sequence[str | Path], *, baseline: str = "none", out: Path | None = None, wandb_mode: str | None = "auto"
) -> Comparison:
    """Write comparison.md/.csv/.html and the plots to `out` and print the Markdown; log to W&B unless
    wandb_mode is None."""
    from .plots import write_plots  # matplotlib: imported once the inputs are known to be good

    c = build(paths, baseline)
    out = Path(out) if out is not None else default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    for d in c.differences:
        log.warning("warning: unfair comparison: the runs differ in %s", d)
    markdown = render_markdown(c)
    (out / "comparison.md").write_text(markdown)
    write_csv(out / "comparison.csv", c.csv_rows(), CSV_COLUMNS)
    plots = write_plots(c.variants, out)
    page = render_html(
        title=TITLE,
        described=c.described(),
        table=html_table(c.table_rows(), COLUMNS),
        note=NOTE,
        unfair=[str(d) for d in c.differences],
        fair_note=FAIR,
        runs=html_table(c.run_rows(), RUN_COLUMNS),
        plots=plots,
    )
    (out / "comparison.html").write_text(page)
    print(markdown)
    if wandb_mode is not None:
        from .wandb_log import log_comparison

        log_comparison(
            runs=c.runs,
            mode=wandb_mode,
            out=out,
            config=c.config(),
            columns=CSV_COLUMNS,
            rows=c.csv_rows(),
            plots=plots,
        )
    log.info("comparison written to %s", out)
    return c
