"""scripts/compare.py as a user runs it, on a real tiny multirun: numbers, files, fairness, W&B, errors."""

import base64
import csv
import json
import math
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from omegaconf import OmegaConf
from scipy import stats as scipy_stats
from wandb_records import read_run

from cbam.engine.records import RunRecords
from cbam.report import holm, paired, welch
from cbam.report import stats as ours
from cbam.report.report import (
    README_END,
    README_START,
    build,
    default_out,
    plans,
    readme_block,
    readme_marker,
)
from cbam.report.runs import Run, find_run_dirs
from cbam.report.table import csv_row, markdown_row, summarize

SWEEP = [
    "data=synthetic", "data.source.train_size=256", "data.source.val_size=128", "data.batch_size=32",
    "trainer.epochs=2", "trainer.device=cpu", "logger.mode=offline", "attention=none,cbam", "seed=0,1",
]  # fmt: skip
PNGS = ["accuracy.png", "curves.png", "accuracy_vs_throughput.png"]


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # One intra-op thread: tiny batches gain nothing from more, and on a busy shared CPU spinning
    # OpenMP threads made the sweep 10x slower.
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)


def compare(*args, cwd: Path) -> subprocess.CompletedProcess:
    result = run("scripts/compare.py", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def markdown_rows(markdown: str) -> list[dict]:
    """The first Markdown table in `markdown`, as dicts keyed by its header."""
    lines = [line for line in markdown.split("\n\n")[2].splitlines() if line.startswith("|")]
    header, _, *body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, cells, strict=True)) for cells in body]


def copy_sweep(sweep: Path, dest: Path) -> Path:
    shutil.copytree(sweep, dest, ignore=shutil.ignore_patterns("*.pt", "wandb", "compare"))
    return dest


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Four finished runs: attention none and cbam, seeds 0 and 1, two epochs each."""
    sweep = tmp_path_factory.mktemp("compare") / "sweep"
    result = run("train.py", "-m", *SWEEP, f"hydra.sweep.dir={sweep}", cwd=sweep.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def runs_of(sweep: Path) -> dict[tuple[str, int], str]:
    """{(variant, seed): run dir name} (the names are Hydra's sweep subdirs)."""
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))}
    runs = {(s["variant"], s["seed"]): name for name, s in summaries.items()}
    assert sorted(runs) == [("cbam", 0), ("cbam", 1), ("none", 0), ("none", 1)]
    return runs


@pytest.fixture(scope="module")
def report(sweep) -> subprocess.CompletedProcess:
    """compare.py on the sweep with the default --out (<sweep>/compare)."""
    return compare(sweep, "--no-wandb", cwd=sweep.parent)


def expected_rows(sweep: Path) -> dict[str, dict]:
    """The table's numbers, computed here from the summaries alone."""
    summaries = [json.loads((sweep / name / "summary.json").read_text()) for name in runs_of(sweep).values()]
    top1 = {v: [s["final"]["val/top1"] for s in summaries if s["variant"] == v] for v in ("none", "cbam")}
    rate = {v: statistics.mean(s["train_img_per_s"] for s in summaries if s["variant"] == v) for v in top1}
    params = {s["variant"]: s["params"] for s in summaries}
    flops = {s["variant"]: s["flops"] for s in summaries}
    return {
        v: {
            "mean": statistics.mean(top1[v]),
            "std": statistics.stdev(top1[v]),
            "delta": statistics.mean(top1[v]) - statistics.mean(top1["none"]),
            "test": scipy_stats.ttest_ind(top1[v], top1["none"], equal_var=False),
            "params": params[v],
            "flops": flops[v],
            "rate": rate[v],
            "ratio": rate[v] / rate["none"],
        }
        for v in top1
    }


# ---- the report's numbers and files ----


def test_table_and_csv_match_the_runs_summaries(sweep, report):
    out = sweep / "compare"
    markdown = (out / "comparison.md").read_text()
    assert markdown in report.stdout  # printed as written
    assert "Compared 4 runs of 2 variants: resnet20 on synthetic, 2 epochs each; baseline: none." in markdown
    expected = expected_rows(sweep)
    rows = markdown_rows(markdown)
    assert [r["variant"] for r in rows] == ["none", "cbam"]  # the baseline first
    for row in rows:
        e = expected[row["variant"]]
        assert row["seeds (n)"] == "0, 1 (2)"
        assert row["val top-1 % (mean ± std)"] == f"{e['mean']:.2f} ± {e['std']:.2f}"
        assert row["params"] == f"{e['params']:,}"
        assert row["img/s vs baseline"] == f"{e['ratio']:.2f}×"
        assert row["train img/s"] == f"{e['rate']:,.0f}"
        assert row["epochs"] == "2"
    assert rows[0]["Δ vs baseline [95% CI]"] == "baseline"
    assert rows[1]["Δ vs baseline [95% CI]"].startswith(f"{expected['cbam']['delta']:+.2f} [")
    assert expected["cbam"]["params"] > expected["none"]["params"]

    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["none", "cbam"]
    for r in table:
        e = expected[r["variant"]]
        assert float(r["val_top1_mean"]) == pytest.approx(e["mean"])
        assert float(r["val_top1_std"]) == pytest.approx(e["std"])
        assert int(r["params"]) == e["params"] and int(r["flops"]) == e["flops"]
        assert r["n"] == "2" and r["seeds"] == "0 1" and r["accuracy"] == "final_epoch"
        assert float(r["train_img_per_s"]) == pytest.approx(e["rate"])
        assert float(r["train_img_per_s_ratio"]) == pytest.approx(e["ratio"])
    base, cbam = table
    assert base["delta_vs_baseline"] == base["p_welch"] == ""  # the baseline is not tested against itself
    e = expected["cbam"]
    assert float(cbam["delta_vs_baseline"]) == pytest.approx(e["delta"])
    # Seeds 0 and 1 give different accuracies here, so Welch's test is defined; the constant case is
    # test_constant_samples_give_na_not_a_number.
    assert e["std"] > 0 and expected["none"]["std"] > 0
    ci = e["test"].confidence_interval(0.95)
    assert float(cbam["p_welch"]) == pytest.approx(e["test"].pvalue)
    assert rows[1]["Δ vs baseline [95% CI]"] == f"{e['delta']:+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]"
    assert float(cbam["delta_ci95_low"]) == pytest.approx(ci.low)
    assert float(cbam["delta_ci95_high"]) == pytest.approx(ci.high)


def test_plots_are_pngs_and_the_html_embeds_them_with_the_table(sweep, report):
    out = sweep / "compare"
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    page = (out / "comparison.html").read_text()
    for name in PNGS:
        assert base64.b64encode((out / name).read_bytes()).decode() in page, name
    assert "<table>" in page and "<th>val top-1 % (mean ± std)</th>" in page
    for row in markdown_rows((out / "comparison.md").read_text()):
        assert f"<td>{row['val top-1 % (mean ± std)']}</td>" in page
    assert "Compared 4 runs of 2 variants" in page and "Unfair comparisons" in page and "final epoch" in page
    assert 'src="accuracy.png"' not in page  # nothing refers to a file beside it


def test_one_seed_per_variant_gives_na_not_a_crash(sweep, tmp_path):
    runs = runs_of(sweep)
    result = compare(sweep / runs["none", 0], sweep / runs["cbam", 0], "--no-wandb", cwd=tmp_path)
    markdown = (tmp_path / "compare" / "comparison.md").read_text()  # several run dirs: ./compare
    base, cbam = markdown_rows(markdown)
    assert base["val top-1 % (mean ± std)"].endswith("± n/a") and cbam["val top-1 % (mean ± std)"].endswith("± n/a")
    assert cbam["Δ vs baseline [95% CI]"].endswith("[n/a]") and cbam["p (Welch)"] == "n/a"
    assert "Unfair comparisons" in result.stdout


def test_logs_one_offline_wandb_run_with_the_table_and_plots(sweep, tmp_path):
    out = tmp_path / "report"
    compare(sweep, "--wandb-mode", "offline", "--out", out, cwd=tmp_path)
    wandb_run = read_run(out)
    assert wandb_run["name"] == "compare" and wandb_run["group"] == "sweep" and wandb_run["exit_code"] == 0
    assert wandb_run["job_type"] == "compare"
    [logged] = wandb_run["history"]
    assert logged["comparison/_type"] == "table-file" and logged["comparison/nrows"] == 2
    for name in ("accuracy", "curves", "accuracy_vs_throughput"):
        assert logged[f"{name}/_type"] == "image-file" and logged[f"{name}/format"] == "png", name
    [table_file] = out.glob("wandb/offline-run-*/files/" + logged["comparison/path"])
    table = json.loads(table_file.read_text())
    with (out / "comparison.csv").open() as f:
        expected = list(csv.DictReader(f))
    assert table["columns"] == list(expected[0])
    assert [row[0] for row in table["data"]] == [r["variant"] for r in expected]
    assert [row[3] for row in table["data"]] == pytest.approx([float(r["val_top1_mean"]) for r in expected])
    assert sorted(r["name"] for r in wandb_run["config"]["runs"]) == sorted(runs_of(sweep).values())


# ---- statistics ----


@pytest.mark.parametrize(
    "a, b",
    [
        ([91.2, 91.5, 90.9], [90.1, 90.4, 90.2]),  # equal n
        ([91.2, 91.5, 90.9, 92.3, 91.0], [90.1, 93.4]),  # unequal n, unequal variances
        ([75.0, 75.1], [80.0, 70.0, 85.0, 60.0]),  # negative difference, very unequal variances
        ([99.0, 99.1, 99.05], [50.0, 50.2, 49.9]),  # a tiny p-value
    ],
)
def test_welch_matches_scipy(a, b):
    ours = welch(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-8)
    assert ours.df == pytest.approx(ref.df, rel=1e-10)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert ours.diff == pytest.approx(statistics.mean(a) - statistics.mean(b))


def test_welch_needs_two_values_per_side_and_some_variance():
    with pytest.raises(ValueError, match=">= 2 values per sample"):
        welch([90.0], [89.0, 90.0])
    constant = welch([90.0, 90.0], [91.0, 91.0])
    assert constant.diff == -1.0 and math.isnan(constant.p) and math.isnan(constant.ci_low)


def test_constant_samples_give_na_not_a_number(tmp_path):
    """Two variants each with the same accuracy at every seed: no test is defined, and the table says so."""
    runs = [fake_run(v, s, top1, tmp_path) for v, top1 in (("none", 90.0), ("cbam", 91.0)) for s in range(3)]
    none, cbam = summarize(runs, "none")
    assert cbam.diff == pytest.approx(1.0) and math.isnan(cbam.welch.p) and math.isnan(cbam.paired.p)
    row, values = markdown_row(cbam, 0.2), csv_row(cbam)
    assert row["Δ vs baseline [95% CI]"] == "+1.00 [n/a]" and row["p (Welch)"] == row["p (paired)"] == "n/a"
    assert row["val top-1 % (mean ± std)"] == "91.00 ± 0.00"
    assert values["p_welch"] is values["delta_ci95_low"] is values["p_paired"] is None
    assert values["delta_vs_baseline"] == pytest.approx(1.0) and values["verdict"] == "undecided"


def test_a_difference_of_the_same_count_at_every_seed_is_no_spread_and_welch_decides(tmp_path):
    """20 more of 10,000 images right at every seed: the per-seed differences are 0.2 up to rounding (their
    float sd is ~1e-14, not 0), which must not make a paired test (scipy: p ~ 1e-28); Welch's decides."""
    base_counts = [9031, 9006, 9052, 9021, 9044]  # some of these differences round to 0.19999999999998863
    accuracy = [c / 10_000 * 100 for c in base_counts]
    shifted = [(c + 20) / 10_000 * 100 for c in base_counts]
    assert np.std(np.subtract(shifted, accuracy), ddof=1) > 0  # the rounding this test is about
    runs = [fake_run("none", s, t, tmp_path) for s, t in enumerate(accuracy)]
    runs += [fake_run("x", s, t, tmp_path) for s, t in enumerate(shifted)]
    runs += [fake_run("same", s, t, tmp_path) for s, t in enumerate(accuracy)]
    variants = {v.name: v for v in summarize(runs, "none", margin=0.2)}
    for name in ("x", "same"):
        d = variants[name].decision
        assert math.isnan(variants[name].paired.p) and d.test.kind == "welch"
        assert d.test.p == pytest.approx(scipy_stats.ttest_ind(variants[name].top1, accuracy, equal_var=False).pvalue)
        assert math.isnan(d.effect_size) or abs(d.effect_size) < 10
    assert variants["x"].decision.verdict == "undecided" and variants["x"].decision.seeds_needed > 5
    assert markdown_row(variants["same"], 0.2)["verdict"] != f"undecided: > {ours.MAX_SEEDS} seeds"


# ---- fairness and bad input ----


def test_a_changed_learning_rate_is_flagged_with_both_values(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path / "sweep")
    names = sorted(runs_of(sweep).values())  # the table lists runs in dir order
    config = OmegaConf.load(copy / names[-1] / "config.yaml")
    assert config.optim.optimizer.lr == 0.1
    config.optim.optimizer.lr = 0.05
    OmegaConf.save(config, copy / names[-1] / "config.yaml")
    result = compare(copy, "--no-wandb", cwd=tmp_path)
    flagged = f"optim.optimizer.lr: 0.1 ({', '.join(names[:-1])}) vs 0.05 ({names[-1]})"
    unfair = result.stdout.split("## Unfair comparisons")[1].split("##")[0]
    assert unfair.strip().splitlines() == [f"- `{flagged}`"]  # nothing else: seeds and attention may differ
    assert f"warning: unfair comparison: the runs differ in {flagged}" in result.stderr
    assert flagged in (copy / "compare" / "comparison.html").read_text()


def no_summary(copy: Path, runs: dict) -> None:
    (copy / runs["none", 1] / "summary.json").unlink()


def other_dataset(copy: Path, runs: dict) -> None:
    path = copy / runs["cbam", 0] / "summary.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"data": "cifar10"}))


def slow(*case):
    return pytest.param(*case, marks=pytest.mark.slow)


# Each case is a process start (~5 s): three in `make test`, the others in `make nightly`.
@pytest.mark.parametrize(
    "change, args, message",
    [
        (None, ["NOPE"], "does not exist"),
        slow(None, ["EMPTY"], "no run records found in"),
        slow(None, ["EMPTY"], "a run dir holds summary.json, metrics.jsonl and config.yaml"),
        (no_summary, ["COPY"], "1 run(s) did not finish (no summary.json): "),
        slow(no_summary, ["COPY"], "{none-s1}; resume them"),
        slow(
            other_dataset,
            ["COPY"],
            "different datasets (synthetic: {none-s0}, {none-s1}, {cbam-s1}; cifar10: {cbam-s0})",
        ),
        slow(
            None,
            ["COPY", "--baseline", "cbam_parallel"],
            "the baseline variant 'cbam_parallel' is not among the runs (cbam, none)",
        ),
        (None, ["COPY", "--readme", "NOTES"], "has no '<!-- compare.py "),
    ],
)
def test_bad_input_is_one_line_and_exit_2(sweep, tmp_path, change, args, message):
    copy = copy_sweep(sweep, tmp_path / "sweep")
    (tmp_path / "empty").mkdir()
    runs = runs_of(sweep)
    if change:
        change(copy, runs)
    message = message.format_map(
        {f"{v}-s{seed}": str(copy / name) if change is no_summary else name for (v, seed), name in runs.items()}
    )
    notes = tmp_path / "notes.md"
    notes.write_text("# notes without a table marker\n")
    paths = {"NOPE": tmp_path / "nope", "EMPTY": tmp_path / "empty", "COPY": copy, "NOTES": notes}
    result = run("scripts/compare.py", *[paths.get(a, a) for a in args], "--no-wandb", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (copy / "compare").exists() and result.stdout == ""
    assert notes.read_text() == "# notes without a table marker\n"


def test_finished_only_compares_a_sweep_still_running_and_names_what_it_leaves_out(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path / "sweep")
    running, stopped = copy / runs_of(sweep)["cbam", 1], copy / runs_of(sweep)["none", 1]
    for run_dir in (running, stopped):
        (run_dir / "summary.json").unlink()  # as a run still training, or stopped, has none yet
    killed = subprocess.Popen(["true"])
    killed.wait()
    (stopped / "train.lock").write_text(f"pid {killed.pid} on {socket.gethostname()} since 2026-12-07 10:00:00")
    with RunRecords(running).claimed() as holder:  # held as a training process holds it
        assert holder is None
        refused = run("scripts/compare.py", copy, "--no-wandb", cwd=tmp_path)
        result = compare(copy, "--finished-only", "--no-wandb", cwd=tmp_path)
    training = f"{running} (pid {os.getpid()} on {socket.gethostname()} since "
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"error: 1 run(s) are training now: {training}" in refused.stderr
    assert "wait for them to finish or pass --finished-only; " in refused.stderr
    assert f"1 run(s) did not finish (no summary.json): {stopped}; resume them" in refused.stderr  # a killed holder's
    assert f"warning: leaving out 1 run(s) training now: {training}" in result.stderr
    assert "may train one of theirs again under another job number" in result.stderr
    assert f"warning: leaving out 1 unfinished run(s): {stopped}\n" in result.stderr
    assert "Compared 2 runs of 2 variants" in result.stdout
    rows = {r["variant"]: r for r in csv.DictReader((copy / "compare" / "comparison.csv").open())}
    assert rows["cbam"]["seeds"] == rows["none"]["seeds"] == "0"


def readme_blocks(text: str) -> dict[str, str]:
    """{the paths named in a README marker: the block below it}."""
    pattern = f"^{re.escape(README_START)}([^\\n]+) -->\\n(.*?){re.escape(README_END)}"
    return dict(re.findall(pattern, text, re.M | re.S))


def test_readme_option_replaces_only_its_block(sweep, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Results\n\nIntro.\n\n", "\nReading it: the text around the table stays.\n"
    other = f"\n{readme_marker([sweep], baseline='cbam')}\nthe table against cbam\n{README_END}\n"
    readme.write_text(f"{before}{readme_marker([sweep])}\nan old table\n{README_END}{other}{after}")
    compare(sweep, "--no-wandb", "--out", tmp_path / "out", "--readme", readme, cwd=tmp_path)
    text = readme.read_text()
    assert text.startswith(before + readme_marker([sweep]) + "\n") and text.endswith(README_END + other + after)
    block = readme_blocks(text)[str(sweep)]
    assert block == readme_block(build([sweep])) and "an old table" not in text
    assert block.split("\n\n")[1] in (tmp_path / "out" / "comparison.md").read_text()  # the table compare.py prints

    # The same runs against another baseline are another table: its marker names the baseline.
    compare(sweep, "--baseline", "cbam", "--no-wandb", "--out", tmp_path / "out", "--readme", readme, cwd=tmp_path)
    blocks = readme_blocks(readme.read_text())
    assert blocks[str(sweep)] == block  # the table against none is left as it was
    assert blocks[f"{sweep} --baseline cbam"] == readme_block(build([sweep], baseline="cbam"))
    assert "baseline: cbam." in blocks[f"{sweep} --baseline cbam"]


def test_the_readme_result_tables_are_what_compare_makes_of_the_committed_records(tmp_path):
    """README.md's published tables are regenerated from results/ by compare.py, never typed in: each
    marker's own arguments, run as a user runs them, leave README.md as it is."""
    published = (ROOT / "README.md").read_text()
    blocks = readme_blocks(published)
    published_markers = {
        "results/ablation_fmnist",
        "results/leave_one_out --baseline cbam_improved",
        "results/leave_one_out --baseline cbam_improved --bn-batch-stats",
    }
    assert published_markers <= set(blocks)
    readme = tmp_path / "README.md"
    readme.write_text(published)
    for args in blocks:  # the marker's paths, and the plans' commands, are relative to the clone
        compare(*shlex.split(args), "--finished-only", "--no-wandb", "--out", tmp_path / "out", "--readme", readme,
                cwd=ROOT)  # fmt: skip
        assert readme.read_text() == published, (
            f"README.md's table for {args} is not what its records give: "
            f"python scripts/compare.py {args} --finished-only --no-wandb --readme README.md"
        )


# ---- paired statistics, Holm, equivalence, planning


@pytest.mark.parametrize(
    "a, b",
    [
        ([91.2, 91.5, 90.9, 91.8], [90.1, 90.4, 90.2, 91.0]),
        ([75.0, 75.1, 74.2], [80.0, 70.0, 85.0]),
        ([99.0, 99.1, 99.05, 98.9, 99.3], [98.7, 99.0, 98.95, 98.8, 99.0]),
    ],
)
def test_paired_matches_scipy(a, b):
    ref = scipy_stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    got = paired(a, b)
    assert got.kind == "paired" and got.n == len(a)
    assert got.diff == pytest.approx(statistics.mean(np.subtract(a, b)))
    assert got.p == pytest.approx(ref.pvalue, rel=1e-10) and got.df == len(a) - 1
    assert (got.ci_low, got.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_holm_adjusts_step_down_and_skips_undefined_tests():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> kept monotone at 0.06
    got = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(got[4])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_equivalence_is_two_one_sided_tests():
    a = [91.20, 91.31, 91.18, 91.25, 91.27, 91.22]
    b = [91.22, 91.25, 91.20, 91.21, 91.30, 91.19]
    d = np.subtract(a, b)
    margin = 0.2
    lower = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue
    assert ours.tost(paired(a, b), margin) == pytest.approx(max(lower, upper), rel=1e-9)
    assert ours.tost(paired(a, b), margin) < 0.05  # within +-0.2: equivalent
    assert ours.tost(paired(a, b), 0.01) > 0.05


def test_the_seeds_a_decision_needs_give_the_power_they_claim():
    """Simulated paired experiments at the returned number of seeds decide 80% of the time, one fewer less."""
    rng = np.random.default_rng(0)
    true_diff, sd, alpha = 0.3, 0.5, 0.05 / 9
    se = sd / math.sqrt(5)
    observed = ours.Test(
        "paired", 5, true_diff, se, df=4, t=true_diff / se, p=0.2, ci_low=-1, ci_high=1, confidence=0.95
    )
    n = ours.seeds_needed(observed, sd, margin=0.01, alpha=alpha)  # a tiny margin: only a difference decides

    def power(k: int) -> float:
        d = rng.normal(true_diff, sd, size=(20000, k))
        return float((scipy_stats.ttest_1samp(d, 0, axis=1).pvalue < alpha).mean())

    assert power(n) >= ours.POWER - 0.02 and power(n - 1) < ours.POWER + 0.02


def test_bootstrap_is_scipys_and_needs_five_seeds():
    d = [0.31, -0.12, 0.25, 0.4, 0.05, 0.18]
    low, high = ours.bootstrap_ci(d, None)
    ref = scipy_stats.bootstrap((np.asarray(d),), np.mean, confidence_level=0.95, n_resamples=9999, method="BCa",
                                rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
    assert (low, high) == pytest.approx((ref.low, ref.high))
    assert low < statistics.mean(d) < high
    assert all(math.isnan(v) for v in ours.bootstrap_ci(d[:4], None))


def fake_run(variant: str, seed: int, top1: float, sweep: Path) -> Run:
    summary = {"variant": variant, "seed": seed, "final": {"val/top1": top1}, "train_img_per_s": 100.0,
               "overrides": [f"attention={variant}", f"seed={seed}", "trainer.epochs=3", "resume=auto"]}  # fmt: skip
    return Run(f"{variant}-s{seed}", sweep / f"{variant}-s{seed}", summary, {}, [], sweep)


def test_verdicts_and_the_command_that_decides_an_undecided_row(tmp_path):
    base = [90.0, 90.4, 89.8, 90.2, 90.1]
    rows = {
        "better": [b + 1.0 + e for b, e in zip(base, [0.05, -0.04, 0.02, 0.0, -0.03], strict=True)],
        "slightly_better": [b + 0.1 + e for b, e in zip(base, [0.01, -0.01, 0.0, 0.01, -0.01], strict=True)],
        "same": [b + e for b, e in zip(base, [0.02, -0.03, 0.01, 0.0, -0.01], strict=True)],
        "unclear": [b + e for b, e in zip(base, [0.5, -0.3, 0.6, -0.1, 0.2], strict=True)],
    }
    runs = [fake_run("none", s, t, tmp_path) for s, t in enumerate(base)]
    runs += [fake_run(v, s, t, tmp_path) for v, tops in rows.items() for s, t in enumerate(tops)]
    variants = {v.name: v for v in summarize(runs, "none", margin=0.2)}
    assert variants["better"].decision.verdict == "better"
    assert variants["same"].decision.verdict == "equivalent"
    # Better, and by less than the margin: the CSV says better, the table both.
    assert variants["slightly_better"].decision.verdict == "better"
    assert markdown_row(variants["slightly_better"], 0.2)["verdict"] == "better, within ±0.2"
    assert markdown_row(variants["better"], 0.2)["verdict"] == "better"
    unclear = variants["unclear"].decision
    assert unclear.verdict == "undecided" and unclear.seeds_needed > 5
    ps = [variants[v].paired.p for v in rows]
    assert [variants[v].decision.p_holm for v in rows] == pytest.approx(holm(ps))
    commands = plans(list(variants.values()))
    missing = ",".join(map(str, range(5, unclear.seeds_needed)))
    assert commands == [
        f"python train.py -m attention=none trainer.epochs=3 seed={missing} hydra.sweep.dir={tmp_path} resume=auto",
        f"python train.py -m attention=unclear trainer.epochs=3 seed={missing} hydra.sweep.dir={tmp_path} resume=auto",
    ]


def test_a_paired_plan_pairs_first_the_seeds_one_side_already_ran(tmp_path):
    """The variant ran seed 4, the baseline not: the next pair is seed 4, which only the baseline runs."""
    base = [90.0, 90.4, 89.8, 90.2]
    variant = [b + e for b, e in zip([*base, 90.1], [0.9, 0.2, 1.5, 0.6, 0.8], strict=True)]
    runs = [fake_run("none", s, t, tmp_path) for s, t in enumerate(base)]
    runs += [fake_run("x", s, t, tmp_path) for s, t in enumerate(variant)]
    variants = summarize(runs, "none")
    d = variants[1].decision
    assert (d.test.kind, d.test.n, d.verdict, d.seeds_needed) == ("paired", 4, "undecided", 6)
    assert plans(variants) == [
        f"python train.py -m attention=none trainer.epochs=3 seed=4,5 hydra.sweep.dir={tmp_path} resume=auto",
        f"python train.py -m attention=x trainer.epochs=3 seed=5 hydra.sweep.dir={tmp_path} resume=auto",
    ]


def test_an_unpaired_row_gets_cohens_d_and_each_side_its_missing_seeds_paired(tmp_path):
    """No seed shared (Welch): the variant has the seeds a decision needs, the baseline not; the baseline's
    command runs seeds the variant ran, so that the next comparison pairs them."""
    base = [90.0, 90.5, 89.7]
    variant = [90.6, 90.9, 90.2, 90.8, 90.4, 91.0, 90.5, 90.7, 90.3, 90.9]
    runs = [fake_run("none", s, t, tmp_path) for s, t in enumerate(base)]
    runs += [fake_run("x", 10 + s, t, tmp_path) for s, t in enumerate(variant)]
    variants = summarize(runs, "none")
    d = variants[1].decision
    assert (d.test.kind, d.test.n, d.verdict, d.seeds_needed) == ("welch", 3, "undecided", 8)
    n, m = len(variant), len(base)  # Cohen's d: over the sd pooled by degrees of freedom
    pooled = math.sqrt(((n - 1) * statistics.variance(variant) + (m - 1) * statistics.variance(base)) / (n + m - 2))
    assert d.effect_size == pytest.approx((statistics.mean(variant) - statistics.mean(base)) / pooled)
    assert plans(variants) == [
        f"python train.py -m attention=none trainer.epochs=3 seed=10,11,12,13,14 hydra.sweep.dir={tmp_path} resume=auto"
    ]


def test_run_dirs_given_one_by_one_still_belong_to_their_sweep(sweep, tmp_path):
    """`compare.py multirun/x/*-resnet56-*` (a backbone at a time, as the README says): the commands that
    decide a row continue that sweep, not a new timestamped one. A single run's dir is in no sweep."""
    job_dirs = sorted(sweep.resolve() / name for name in runs_of(sweep).values())
    assert find_run_dirs(job_dirs) == [(d, sweep.resolve()) for d in job_dirs]
    single = shutil.copytree(job_dirs[0], tmp_path.resolve() / "2026-12-07_17-00-00")  # hydra.run.dir's naming
    assert find_run_dirs([single]) == [(single, None)]
    # The report of some of a sweep's runs is not written into one of them, nor over the sweep's own report.
    assert default_out(job_dirs[:1]) == default_out(job_dirs) == Path("compare")
    assert default_out([sweep]) == sweep / "compare"


def test_paired_columns_match_the_runs_and_undecided_rows_get_a_command(sweep, report):
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    top1 = {(s["variant"], s["seed"]): s["final"]["val/top1"] for s in summaries}
    a, b = [top1["cbam", s] for s in (0, 1)], [top1["none", s] for s in (0, 1)]
    with (sweep / "compare" / "comparison.csv").open() as f:
        base, cbam = list(csv.DictReader(f))
    assert base["delta_paired"] == base["p_holm"] == base["verdict"] == ""
    assert float(cbam["delta_paired"]) == pytest.approx(statistics.mean(np.subtract(a, b)))
    if len(set(np.subtract(a, b))) > 1:  # two seeds that differ by the same amount leave the test undefined
        assert float(cbam["p_paired"]) == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
        assert float(cbam["p_holm"]) == pytest.approx(float(cbam["p_paired"]))  # one comparison: Holm changes nothing
    assert cbam["verdict"] in ("better", "worse", "equivalent", "undecided") and cbam["n_paired"] == "2"
    markdown = (sweep / "compare" / "comparison.md").read_text()
    if cbam["verdict"] == "undecided" and cbam["seeds_needed"]:
        commands = markdown.split("```bash\n")[1].split("```")[0].strip().splitlines()
        assert all(c.startswith("python train.py -m ") and "resume=auto" in c for c in commands)
        assert any("attention=cbam" in c for c in commands) and all("hydra.sweep.dir=" in c for c in commands)


def test_a_sweep_continued_from_its_records_alone_runs_only_what_is_missing(sweep, tmp_path):
    """What results/ holds (config.yaml, metrics.jsonl, summary.json, no checkpoint) is enough: the same
    command with resume=auto and that sweep dir leaves those runs as they are and runs the others."""
    continued = tmp_path / "continued"
    names = sorted(runs_of(sweep).values())
    done = names[0]
    (continued / done).mkdir(parents=True)
    for f in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(sweep / done / f, continued / done / f)
    before = {f: (continued / done / f).read_bytes() for f in ("config.yaml", "metrics.jsonl", "summary.json")}
    result = run("train.py", "-m", *SWEEP, f"hydra.sweep.dir={continued}", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {f: (continued / done / f).read_bytes() for f in before} == before
    assert not (continued / done / "last.pt").exists()  # not run again
    assert sorted(p.parent.name for p in continued.glob("*/summary.json")) == names
