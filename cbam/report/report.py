"""`compare(paths)`: read finished runs, group them by variant, write the comparison to --out."""

import itertools
import logging
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cbam.errors import ConfigError

from .fairness import IGNORED, Difference, config_differences
from .render import html_table, markdown_table, render_html, write_csv
from .runs import (
    BN_BATCH_STATS_RECORD,
    EVAL_COMMAND,
    BatchStatsEval,
    Run,
    common_dataset,
    find_run_dirs,
    load_runs,
    use_bn_batch_stats,
)
from .table import COLUMNS, CSV_COLUMNS, Variant, csv_row, markdown_row, summarize

log = logging.getLogger(__name__)

TITLE = "Attention variants compared"
ACCURACY = (
    "Accuracy is the final epoch's val top-1 (summary.json final['val/top1']), not the best epoch's: the val "
    "split is the dataset's test split (unless data.holdout > 0), so picking the best epoch on it would give an "
    "optimistic, selected number."
)
BN_ACCURACY = (
    "Accuracy is the val top-1 of the final weights (last.pt) with the BatchNorm layers matching {pattern!r} "
    "normalising each val batch of {batch_size} with its own statistics instead of their running ones, as eval.py "
    f"bn_batch_stats measured it ({BN_BATCH_STATS_RECORD} beside the checkpoint): a diagnostic of what those "
    "running statistics cost, not a deployable model's accuracy. Runs without such layers keep their final-epoch "
    "val top-1 (summary.json), which the diagnostic would not change."
)
NOTE = (
    "{accuracy} Mean ± sample std over seeds. Δ vs baseline: difference of the means, with Welch's 95% "
    "confidence interval and p (unequal variances). Δ paired: the mean of the per-seed differences over the "
    "seeds both share, with its t interval and p (paired t-test); same seed, same data order and "
    "augmentation. p (Holm): the paired p (else Welch's), Holm-adjusted over the table's rows. verdict: "
    "better or worse at p (Holm) < 0.05, equivalent when two one-sided tests (Holm-adjusted) put the "
    "difference within ±{margin:g} points (a row both better or worse and within them says so), else "
    "undecided, with the seeds per variant that would decide at the observed variance (power 0.8). bootstrap "
    "95% CI: BCa bootstrap of the same difference, a check without the normal assumption (n/a below 5 seeds). "
    "d: Cohen's d of the difference (d_z when paired). n/a where a side has one run or no spread. train "
    "img/s: mean training throughput, and its ratio to the baseline's."
)
FAIR = (
    "None: the runs' resolved configs differ only in the attention config and the seed "
    f"(not compared: {', '.join(IGNORED)})."
)
RUN_COLUMNS = ["run", "variant", "seed", "val top-1 %", "train img/s", "dir"]
DEFAULT_BASELINE, DEFAULT_MARGIN = "none", 0.2
COMPARE, COMPARE_BN = "compare", "compare-bn_batch_stats"


@dataclass
class Comparison:
    runs: list[Run]
    variants: list[Variant]  # table order: the baseline first
    baseline: str
    data: str
    differences: list[Difference]
    margin: float = DEFAULT_MARGIN
    plans: list[str] = field(default_factory=list)  # train.py commands that run the seeds undecided rows need
    bn: BatchStatsEval | None = None  # compared with these BatchNorm layers on batch statistics (--bn-batch-stats)

    def described(self) -> str:
        models = ", ".join(sorted({r.summary["model"] for r in self.runs}))
        epochs = ", ".join(sorted({str(r.summary["epochs"]) for r in self.runs}))
        described = (
            f"Compared {len(self.runs)} runs of {len(self.variants)} variants: {models} on {self.data}, "
            f"{epochs} epochs each; baseline: {self.baseline}."
        )
        if self.bn is None:
            return described
        unchanged = [v.name for v in self.variants if all(r.evaluated_top1 is None for r in v.runs)]
        return described + (
            f" Accuracy: the final weights' val top-1 with the BatchNorm layers matching {self.bn.pattern!r} on the "
            f"statistics of each val batch of {self.bn.batch_size} (eval.py bn_batch_stats)"
            + (f"; without such layers, {', '.join(unchanged)} keep their final-epoch top-1." if unchanged else ".")
        )

    def name(self) -> str:
        """Its default output dir's name and its W&B run's: the two comparisons of one sweep never collide."""
        return COMPARE if self.bn is None else COMPARE_BN

    def accuracy_label(self) -> str:
        """What the plots' accuracy axes show."""
        return "final-epoch val top-1 (%)" if self.bn is None else "val top-1, chosen BN on batch statistics (%)"

    def note(self) -> str:
        accuracy = ACCURACY if self.bn is None else BN_ACCURACY.format(**vars(self.bn))
        return NOTE.format(accuracy=accuracy, margin=self.margin)

    def seed_rows(self) -> list[dict]:
        """Variant x seed: each run's final-epoch val top-1, and where the comparison evaluates it otherwise, → that."""
        seeds = sorted({s for v in self.variants for s in v.seeds})
        rows = []
        for v in self.variants:
            by_seed = {r.summary["seed"]: r for r in v.runs}
            cells = {f"seed {s}": _evaluated(by_seed[s]) if s in by_seed else "-" for s in seeds}
            rows.append({"variant": v.name} | cells)
        return rows

    def table_rows(self) -> list[dict]:
        return [markdown_row(v, self.margin) for v in self.variants]

    def csv_rows(self) -> list[dict]:
        return [csv_row(v) for v in self.variants]

    def run_rows(self) -> list[dict]:
        return [
            {
                "run": r.name,
                "variant": r.variant,
                "seed": r.summary["seed"],
                "val top-1 %": _evaluated(r),
                "train img/s": f"{r.summary['train_img_per_s']:,.0f}" if r.summary.get("train_img_per_s") else "n/a",
                "dir": _shown(r.dir),
            }
            for v in self.variants
            for r in v.runs
        ]

    def config(self) -> dict:
        """What the W&B run records as its config."""
        return {
            "baseline": self.baseline,
            "data": self.data,
            "bn_batch_stats": vars(self.bn) if self.bn else None,
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


def _evaluated(run: Run) -> str:
    """A run's final-epoch val top-1, and the top-1 compared where that differs: '84.27 → 88.70'."""
    final = f"{run.final_top1:.2f}"
    return final if run.evaluated_top1 is None else f"{final} → {run.evaluated_top1:.2f}"


def _shown(path: Path) -> str:
    """A path as given from here: relative when under the working dir (records moved with a clone still read)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _seed_list(seeds) -> str:
    return ",".join(map(str, sorted(seeds)))


def plans(variants: list[Variant]) -> list[str]:
    """For each undecided row: `python train.py -m ...` running just the seeds its variant and the baseline
    lack, into the sweep its runs came from (resume=auto leaves the finished ones alone). Built from the
    runs' own overrides (summary.json), so the recipe is the one they ran."""
    base = variants[0]
    commands, base_missing = [], set()
    for v in variants[1:]:
        d = v.decision
        if d.verdict != "undecided" or d.seeds_needed is None:
            continue
        own, theirs, n = set(v.seeds), set(base.seeds), d.seeds_needed
        first_new = max(own | theirs, default=-1) + 1
        # A seed that one side already ran is the cheapest next one for the other: the new runs then pair.
        if d.test.kind == "paired":  # the pairs count
            target = _grown(own & theirs, own ^ theirs, n, first_new)
            own_target, base_target = target, target
        else:  # fewer than two seeds shared: each side's own count
            own_target = _grown(own, theirs - own, n, first_new)
            base_target = _grown(theirs, own - theirs, n, first_new)
        if new := own_target - own:
            commands.append(_command(v, new))
        base_missing |= base_target - theirs
    if base_missing:
        commands.insert(0, _command(base, base_missing))
    return commands


def _grown(seeds: set, preferred: set, n: int, first_new: int) -> set:
    """`seeds` grown to `n`: first by the `preferred` ones (lowest first, none of them in `seeds`), then by
    first_new, first_new + 1, ... (above every seed run)."""
    candidates = itertools.chain(sorted(preferred), itertools.count(first_new))
    return seeds | set(itertools.islice(candidates, max(0, n - len(seeds))))


def _command(v: Variant, seeds: set) -> str:
    run = v.runs[0]
    kept = [o for o in run.summary.get("overrides", []) if not o.startswith(("seed=", "resume=", "hydra."))]
    sweep = [f"hydra.sweep.dir={_shown(run.sweep)}"] if run.sweep is not None else []
    args = [*kept, f"seed={_seed_list(seeds)}", *sweep, "resume=auto"]
    return "python train.py -m " + " ".join(shlex.quote(a) for a in args)


def build(
    paths: Sequence[str | Path],
    baseline: str = DEFAULT_BASELINE,
    margin: float = DEFAULT_MARGIN,
    finished_only: bool = False,
    bn_batch_stats: bool = False,
) -> Comparison:
    runs = load_runs(paths, finished_only)
    data = common_dataset(runs)
    bn = use_bn_batch_stats(runs) if bn_batch_stats else None
    variants = summarize(runs, baseline, margin)
    return Comparison(runs, variants, baseline, data, config_differences(runs), margin, plans(variants), bn)


def render_markdown(c: Comparison) -> str:
    unfair = "\n".join(f"- `{d}`" for d in c.differences) if c.differences else FAIR
    return f"""# {TITLE}

{c.described()}

{markdown_table(c.table_rows(), COLUMNS)}

{c.note()}
{_plans_section(c)}
## Unfair comparisons

{unfair}

## Plots

![val top-1 per variant](accuracy.png)
![val top-1 per epoch](curves.png)
![accuracy vs throughput](accuracy_vs_throughput.png)

## Runs

{markdown_table(c.run_rows(), RUN_COLUMNS)}
"""


def _plans_section(c: Comparison, within_section: bool = False) -> str:
    """The commands that decide the undecided rows; `within_section`: for a block inside a document's own
    section (a README's result), led by a bold title rather than a heading that would split that section."""
    if not c.plans:
        return ""
    title = "**Deciding the undecided rows.** " if within_section else "## Deciding the undecided rows\n\n"
    commands = "\n".join(c.plans)
    evaluate = (
        "\nThen evaluate each new run that has such BatchNorm layers, as the others were: "
        f"`{EVAL_COMMAND.format(run='<run dir>', pattern=c.bn.pattern)}`.\n"
        if c.bn is not None
        else ""
    )
    return f"""
{title}Each command runs only the seeds missing for a decision at the observed variance:

```bash
{commands}
```
{evaluate}"""


README_START, README_END = "<!-- compare.py ", "<!-- /compare.py -->"


def readme_marker(
    paths: Sequence[str | Path],
    baseline: str = DEFAULT_BASELINE,
    margin: float = DEFAULT_MARGIN,
    bn_batch_stats: bool = False,
) -> str:
    """The line above a comparison kept in a Markdown file: the compare.py arguments that make it (the paths,
    and the options that are not the defaults), so the table can be remade from the line."""
    args = [str(p) for p in paths]
    if baseline != DEFAULT_BASELINE:
        args += ["--baseline", baseline]
    if margin != DEFAULT_MARGIN:
        args += ["--margin", f"{margin:g}"]
    if bn_batch_stats:
        args.append("--bn-batch-stats")
    return f"{README_START}{shlex.join(args)} -->"


def readme_block(c: Comparison) -> str:
    """What a Markdown file keeps of a comparison: what was compared, the table, the commands that decide;
    for a comparison that evaluates the runs otherwise, each run's two accuracies by seed too."""
    per_seed = ""
    if c.bn is not None:
        rows = c.seed_rows()
        per_seed = (
            "\nBy seed: each run's final-epoch val top-1 → with those layers on batch statistics.\n\n"
            f"{markdown_table(rows, list(rows[0]))}\n"
        )
    return (
        f"{c.described()}\n\n{markdown_table(c.table_rows(), COLUMNS)}\n{per_seed}"
        f"{_plans_section(c, within_section=True)}"
    )


def update_readme(readme: Path, paths: Sequence[str | Path], c: Comparison) -> None:
    """Replace the block between the comparison's readme_marker and README_END in `readme` with it."""
    marker = readme_marker(paths, c.baseline, c.margin, c.bn is not None)
    text = readme.read_text() if readme.is_file() else ""
    found = re.search(f"^{re.escape(marker)}\n", text, re.M)  # on a line of its own: not a mention in the text
    start = found.start() if found else -1
    end = text.find(README_END, start)
    if start < 0 or end < 0:
        raise ConfigError(
            f"{readme} has no {marker!r} line with {README_END!r} below it: put the two where the table goes"
        )
    body = start + len(marker) + 1
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(text[:body] + readme_block(c) + text[end:])
    tmp.replace(readme)  # the file is whole at every moment
    log.info("table written to %s", readme)


def default_out(paths: Sequence[str | Path], name: str = COMPARE) -> Path:
    """<multirun dir>/<name> for one multirun dir, else ./<name> (also for some of a sweep's run dirs: the
    whole sweep's comparison keeps its own); `name` is the comparison's (Comparison.name)."""
    if len(paths) == 1 and Path(paths[0]).resolve() in {sweep for _, sweep in find_run_dirs(paths)}:
        return Path(paths[0]) / name
    return Path(name)


def compare(
    paths: Sequence[str | Path],
    *,
    baseline: str = DEFAULT_BASELINE,
    margin: float = DEFAULT_MARGIN,
    out: Path | None = None,
    wandb_mode: str | None = "auto",
    readme: Path | None = None,
    finished_only: bool = False,
    bn_batch_stats: bool = False,
) -> Comparison:
    """Write comparison.md/.csv/.html and the plots to `out` and print the Markdown; log to W&B unless
    wandb_mode is None; replace the table kept for these paths in `readme` when given."""
    from .plots import write_plots  # matplotlib: imported once the inputs are known to be good

    c = build(paths, baseline, margin, finished_only, bn_batch_stats)
    if readme is not None:
        update_readme(Path(readme), paths, c)
    out = Path(out) if out is not None else default_out(paths, c.name())
    out.mkdir(parents=True, exist_ok=True)
    for d in c.differences:
        log.warning("warning: unfair comparison: the runs differ in %s", d)
    markdown = render_markdown(c)
    (out / "comparison.md").write_text(markdown)
    write_csv(out / "comparison.csv", c.csv_rows(), CSV_COLUMNS)
    plots = write_plots(c.variants, out, c.accuracy_label())
    page = render_html(
        title=TITLE,
        described=c.described(),
        table=html_table(c.table_rows(), COLUMNS),
        note=c.note(),
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
            name=c.name(),
            mode=wandb_mode,
            out=out,
            config=c.config(),
            columns=CSV_COLUMNS,
            rows=c.csv_rows(),
            run_rows=[
                {
                    "variant": r.variant,
                    "seed": r.summary["seed"],
                    "val_top1": r.top1,
                    "final_val_top1": r.final_top1,
                    "train_img_per_s": r.summary.get("train_img_per_s"),
                }
                for r in c.runs
            ],  # fmt: skip
            plots=plots,
        )
    log.info("comparison written to %s", out)
    return c
