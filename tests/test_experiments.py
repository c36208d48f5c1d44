"""Every experiment composes, its sweep names real presets, and it runs end to end in debug mode."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import CONF, ROOT, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from cbam.engine.device import native_bf16

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
ATTENTION = {p.stem for p in (CONF / "attention").glob("*.yaml")}
MODELS = {p.stem for p in (CONF / "model").glob("*.yaml")}
ALL_VARIANTS = [
    "none", "se", "cbam", "cbam_separate_bn", "cbam_deep_spatial", "cbam_dynamic_ratio", "cbam_he_init",
    "cbam_parallel", "cbam_improved", "cbam_official",
]  # fmt: skip


def sweep_of(experiment: str) -> dict[str, list]:
    """The experiment's hydra.sweeper.params, each parsed as Hydra parses a command-line sweep."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        params = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True).hydra.sweeper.params
    parser = OverridesParser.create()
    overrides = {k: parser.parse_override(f"{k}={v}") for k, v in params.items()}
    return {k: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()] for k, o in overrides.items()}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_sweeps_name_real_presets(experiment):
    sweep = sweep_of(experiment)
    assert set(sweep.get("attention", [])) <= ATTENTION
    assert set(sweep.get("model", [])) <= MODELS
    assert compose_config("train", f"experiment={experiment}").group == experiment


def test_the_ablations_sweep_every_variant_over_their_seeds():
    for experiment, seeds in (("ablation_fmnist", 5), ("ablation_cifar10", 3), ("ablation_cifar100", 3)):
        sweep = sweep_of(experiment)
        assert sweep["attention"] == ALL_VARIANTS and sweep["seed"] == list(range(seeds)), experiment
    assert compose_config("train", "experiment=ablation_fmnist").trainer.epochs == 3  # the default recipe's
    assert sweep_of("ablation_cifar10")["model"] == ["resnet18", "resnet56"]
    cfg = compose_config("train", "experiment=ablation_cifar10", "model=resnet18")
    assert cfg.model.stem == "cifar" and cfg.data.name == "cifar10"


def test_leave_one_out_sets_back_one_change_at_a_time():
    base = compose_config("train", "attention=cbam_improved").attention
    original = compose_config("train", "attention=cbam").attention
    variants = [v for v in sweep_of("leave_one_out")["attention"] if v.startswith("improved_without_")]
    assert len(variants) == 5
    changed_back = set()
    for variant in variants:
        cfg = compose_config("train", f"attention={variant}").attention
        differ = {k for k in base if cfg[k] != base[k]}
        assert differ and all(cfg[k] == original[k] for k in differ), variant  # only back to the original
        changed_back |= differ
    assert changed_back == {k for k in base if base[k] != original[k]}  # every change, each once


def test_paper_recipe_matches_the_released_code():
    cfg = compose_config("train", "experiment=paper_imagenet_resnet50")
    assert (cfg.model.block, list(cfg.model.layers), cfg.data.name) == ("bottleneck", [3, 4, 6, 3], "imagenet")
    opt = cfg.optim.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay, cfg.data.batch_size) == (0.1, 0.9, 1e-4, 256)
    assert list(cfg.optim.scheduler.milestones) == [30, 60, 90] and cfg.optim.scheduler.gamma == 0.1
    assert sweep_of("paper_imagenet_resnet50")["attention"] == ["none", "se", "cbam"]
    assert sweep_of("paper_table1_channel_pooling")["attention.channel_pools"] == [["avg"], ["max"], ["avg", "max"]]
    assert sweep_of("paper_table2_spatial")["attention.spatial_kernel"] == [3, 7]
    assert sweep_of("paper_table3_arrangement")["attention.arrangement"] == [
        "channel_spatial",
        "spatial_channel",
        "parallel",
    ]


@pytest.mark.parametrize(
    "experiments",
    [
        # one of each backbone: a ResNet-50 job takes ~7 s of the default run's budget, every experiment ~50 s
        ["ablation_fmnist", "paper_imagenet_resnet50"],
        pytest.param(EXPERIMENTS, marks=pytest.mark.slow),
    ],
    ids=["one-per-backbone", "every-experiment"],
)
def test_experiments_run_in_debug_mode_with_the_joblib_launcher(tmp_path, experiments):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), "-m", f"experiment={','.join(experiments)}", "debug=fast",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    ran = [o.removeprefix("experiment=") for s in summaries for o in s["overrides"] if o.startswith("experiment=")]
    assert sorted(ran) == sorted(experiments)
    assert {s["model"] for s in summaries} == {"resnet20", "resnet50"}
    assert all(s["data"] == "synthetic" and s["epochs"] == 1 for s in summaries)
    # the CPU's own precision, whatever the recipe pins (a pinned bf16 is emulated on a CPU without it)
    own = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert {s["fast_path"]["precision"] for s in summaries} == {own}


@pytest.mark.slow  # ~20 s: submitit's own process per job
def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", "debug=fast",
            "attention=none,cbam", f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted((json.loads(p.read_text()) for p in sweep.glob("*/summary.json")), key=lambda s: s["variant"])
    assert [s["variant"] for s in summaries] == ["cbam", "none"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["ablation_fmnist", "leave_one_out"])
def test_whole_ablation_sweep_in_debug_mode(tmp_path, experiment):
    sweep = tmp_path / "sweep"
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", f"experiment={experiment}", "debug=fast",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    runs = {(s["variant"], s["seed"]) for s in (json.loads(p.read_text()) for p in sweep.glob("*/summary.json"))}
    expected = sweep_of(experiment)
    assert runs == {(v, s) for v in expected["attention"] for s in expected["seed"]}
