"""scripts/benchmark.py at toy size: every section, modes, ratios with their per-repeat range, CSV, bad input."""

import csv
import re
import subprocess
import sys

import pytest
from conftest import ROOT

TOY = [
    "data=synthetic", "data.image_size=16", "batch_size=8", "variants=[none,cbam]", "steps=1", "warmup=1",
    "repeats=2", "loader_batches=2",
]  # fmt: skip
RATIO = r"\d+\.\d{3} \[\d+\.\d{3}–\d+\.\d{3}\]"  # median [low–high] of the per-repeat ratios
MULTIPLE = r"\d+\.\d \[\d+\.\d–\d+\.\d\]"  # the same, to 0.1: the loader's multiple of the model's img/s


def benchmark(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/benchmark.py"), *args], cwd=ROOT, capture_output=True, text=True
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return benchmark(*TOY, "modes=[fp32,auto]", f"csv={out}"), out


def test_every_variant_and_mode_gets_a_row_with_its_ratio_and_range(report):
    result, _ = report
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| (none|cbam) \| (fp32|auto) \|", line)]
    assert sorted(r.split("|")[1:3] for r in rows) == sorted(
        [[" none ", " fp32 "], [" cbam ", " fp32 "], [" none ", " auto "], [" cbam ", " auto "]]
    )
    for row in rows:
        assert len(re.findall(RATIO, row)) == 2, row  # train vs none, infer vs none
    assert "`auto` = " in result.stdout and "`fp32` = fp32, NCHW, eager" in result.stdout
    step_table = result.stdout.split("Our training step")[1].split("Loaders:")[0]
    steps = [line for line in step_table.splitlines() if re.match(r"\| (fp32|auto) \| \d", line)]
    assert len(steps) == 2 and all(re.search(RATIO, s) for s in steps)
    memory = next(line for line in result.stdout.splitlines() if line.startswith("| memory (on the device) |"))
    assert re.search(rf"\| {MULTIPLE} \|$", memory)  # x model train img/s, repeat by repeat


def test_the_targets_say_what_was_measured_and_how_often_it_held(report):
    result, _ = report
    targets = result.stdout.split("Targets:")[1]
    assert re.search(rf"CBAM / none train ≥ 0.85 \(resnet20, eager fp32\): {RATIO} [✓✗] \(\d of 2 repeats", targets)
    assert re.search(rf"CBAM / none train ≥ 0.9 \(resnet20, fastest mode for cbam: (fp32|auto)\): {RATIO}", targets)
    assert targets.count("our step / bare loop ≥ 0.98") == 2
    loader = rf"in-memory loader ≥ 20x the model's train img/s \(CPU\): {MULTIPLE} [✓✗] \(\d of 2 repeats"
    assert re.search(loader, targets)


def test_the_attention_op_is_timed_per_input_shape_on_both_paths(report):
    """ResNet-20's three stages at 16 px: 16 x 16, 32 x 8 and 64 x 4 x 4 inputs, three blocks each, in each
    layout, each with its block's shortcut (the op ends the block); the fused kernel (a C++ compiler is part of
    the test set-up) beside the composite path."""
    result, out = report
    table = result.stdout.split("The attention op (cbam) alone")[1].split("Targets:")[0]
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in table.splitlines()
        if re.match(r"\| (fp32|auto) \|", line)
    ]
    auto = re.search(r"`auto` = (\w+),", result.stdout)[1]  # bf16 on a CPU that runs it natively, else fp32
    dtype = {"fp32": "float32", "auto": {"fp32": "float32", "bf16": "bfloat16"}[auto]}
    expected = [
        (mode, f"8 x {c} x {hw} x {hw} {dtype[mode]} + shortcut", "3", path)
        for mode in ("fp32", "auto") for c, hw in ((16, 16), (32, 8), (64, 4)) for path in ("kernel", "composite")
    ]  # fmt: skip
    assert [tuple(r[:4]) for r in rows] == expected
    for row in rows:
        forward, backward, passes, per_step = float(row[4]), float(row[5]), float(row[6][:-1]), float(row[7])
        assert forward > 0 and backward > 0 and passes > 0
        assert per_step == pytest.approx(3 * (forward + backward), rel=0.5)  # medians of sums, not sums of medians
        assert re.fullmatch(RATIO, row[8])
    with (out / "op.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(expected)


def test_csv_has_the_tables_numbers(report):
    _, out = report
    with (out / "variants.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["attention"], r["mode"]) for r in rows] == [("none", "fp32"), ("cbam", "fp32"), ("none", "auto"),
                                                            ("cbam", "auto")]  # fmt: skip
    assert all(float(r["train img/s"]) > 0 and float(r["train img/s (CPU time)"]) > 0 for r in rows)
    assert float(rows[0]["train vs none"]) == 1.0 and 0 < float(rows[1]["train vs none"])
    assert (out / "step.csv").exists() and (out / "loader.csv").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["modes=[fp32+fast]"], "modes: 'fp32+fast' is not a mode: use <fp32|bf16|fp16|auto>[+cl][+compile]"),
        # refused before the minutes of measuring, not after them
        ([f"csv={ROOT / 'README.md'}"], f"cannot write to {ROOT / 'README.md'} (File exists: "),
        pytest.param(["modes=[fp32+compile]", "warmup=0"], "a +compile mode needs warmup >= 1", marks=pytest.mark.slow),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = benchmark(*TOY, *args, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
