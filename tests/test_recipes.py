"""Every trainer option trained, each test failing when its option is silently ignored: what reaches the
convolutions, the gradients at the optimizer step, the loss the criterion computes, the weights evaluated.
Runs are in-process (train() from a composed config), tiny, on synthetic data."""

import json
import math
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, compose_config
from omegaconf import OmegaConf
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cbam.engine.checkpoint import load_checkpoint
from cbam.engine.restore import evaluated_weights
from cbam.engine.run import RunContext, train
from cbam.errors import ConfigError
from cbam.models import build_model

TINY = [
    "logger=none", "data=synthetic", "data.source.train_size=128", "data.source.val_size=64", "data.batch_size=32",
    "data.image_size=16", "trainer.epochs=1", "trainer.device=cpu", "model.layers=[1,1,1]",
]  # fmt: skip


def run(tmp_path: Path, *overrides: str, attention: str = "cbam") -> tuple[dict, Path]:
    cfg = compose_config("train", *TINY, f"attention={attention}", *overrides)
    run_dir = tmp_path / f"run{len(list(tmp_path.glob('run*'))) if tmp_path.exists() else 0}"
    summary = train(cfg, RunContext(run_dir=run_dir, choices={"attention": attention, "model": "resnet20",
                                                             "data": "synthetic"}))  # fmt: skip
    return summary, run_dir


@contextmanager
def forward_calls(kind: type):
    """(module, inputs, output) of every forward of a `kind` module in train mode, in any model built meanwhile."""
    calls = []

    def hook(module, inputs, output):
        if isinstance(module, kind) and module.training:
            calls.append((module, inputs, output))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def optimizer_steps():
    """The global gradient norm at every optimizer step, as the step sees the gradients."""
    norms = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield norms
    finally:
        handle.remove()


def train_convs(calls) -> list:
    return [(m, i, o) for m, i, o in calls if m.kernel_size == (3, 3)]  # the backbone's


def test_bf16_autocasts_the_convolutions(tmp_path):
    with forward_calls(nn.Conv2d) as calls:
        run(tmp_path, "trainer.precision=bf16", "trainer.channels_last=false")
    assert train_convs(calls) and all(o.dtype == torch.bfloat16 for _, _, o in train_convs(calls))


def test_fp32_keeps_the_convolutions_in_float32(tmp_path):
    with forward_calls(nn.Conv2d) as calls:
        run(tmp_path, "trainer.precision=fp32")
    assert all(o.dtype == torch.float32 for _, _, o in train_convs(calls))


def test_channels_last_reaches_the_convolutions(tmp_path):
    with forward_calls(nn.Conv2d) as calls:
        run(tmp_path, "trainer.precision=fp32", "trainer.channels_last=true")
    convs = train_convs(calls)
    assert convs and all(i[0].is_contiguous(memory_format=torch.channels_last) for _, i, _ in convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m, _, _ in convs)


def test_fp16_runs_the_grad_scaler(tmp_path):
    summary, run_dir = run(tmp_path, "trainer.precision=fp16")
    scaler = load_checkpoint(run_dir / "last.pt")["scaler"]
    assert scaler and scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0  # a disabled scaler saves {}
    assert math.isfinite(summary["final"]["train/loss"])


def test_clipping_leaves_the_global_gradient_norm_at_most_the_limit(tmp_path):
    with optimizer_steps() as unclipped:
        run(tmp_path, "optim.optimizer.lr=0.5")
    with optimizer_steps() as clipped:
        run(tmp_path, "optim.optimizer.lr=0.5", "trainer.grad_clip=0.05")
    assert max(unclipped) > 0.05  # the limit binds
    assert max(clipped) <= 0.05 * (1 + 1e-4)


def test_label_smoothing_gives_the_formulas_loss(tmp_path):
    with forward_calls(nn.CrossEntropyLoss) as calls:
        run(tmp_path, "optim.label_smoothing=0.3")
    module, (logits, target), loss = calls[0]
    log_p = F.log_softmax(logits.float(), dim=1)
    k = logits.shape[1]
    expected = -(0.7 * log_p.gather(1, target[:, None]).squeeze(1) + 0.3 / k * log_p.sum(1)).mean()
    assert module.label_smoothing == 0.3
    torch.testing.assert_close(loss.float(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alphas", [("0.8", "0.0"), ("0.0", "1.0")], ids=["mixup", "cutmix"])
def test_mixup_and_cutmix_train_on_soft_targets(tmp_path, alphas):
    with forward_calls(SoftTargetCrossEntropy) as calls:
        run(tmp_path, f"trainer.mixup.mixup_alpha={alphas[0]}", f"trainer.mixup.cutmix_alpha={alphas[1]}")
    assert calls
    for _, (_, target), _ in calls:
        assert target.dim() == 2 and torch.allclose(target.sum(1), torch.ones(len(target)))
        assert (target.max(1).values < 1).any()  # mixed: no longer one-hot


def test_ema_evaluates_weights_that_differ_from_the_trained_ones_and_equal_the_ema(tmp_path):
    summary, run_dir = run(tmp_path, "trainer.ema_decay=0.5", "trainer.epochs=2")
    state = load_checkpoint(run_dir / "last.pt")
    ema, raw = evaluated_weights(state), state["model"]
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert all(torch.equal(ema[k], state["ema"][f"module.{k}"]) for k in raw)
    # The run validated the EMA weights: eval.py, which restores them, gives the run's numbers.
    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, str(ROOT / "eval.py"), f"checkpoint={run_dir / 'last.pt'}", "device=cpu",
                    f"output={out}", "wandb=false"], check=True, capture_output=True)  # fmt: skip
    assert json.loads(out.read_text())["val/top1"] == summary["final"]["val/top1"]


def test_no_decay_for_norms_and_biases_reaches_the_optimizer_that_trained(tmp_path):
    _, run_dir = run(tmp_path, "optim.no_decay_norm_and_bias=true")
    groups = load_checkpoint(run_dir / "last.pt")["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 5e-4]
    model = build_model(compose_config("train", *TINY))
    sizes = {g["weight_decay"]: len(g["params"]) for g in groups}
    assert sizes == {
        0.0: sum(p.ndim == 1 for p in model.parameters()),
        5e-4: sum(p.ndim > 1 for p in model.parameters()),
    }


def lr_of_epochs(tmp_path, *overrides: str) -> list[float]:
    _, run_dir = run(tmp_path, "trainer.epochs=4", *overrides)
    return [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_multistep_and_one_cycle_schedules_shape_the_trained_lr(tmp_path):
    # 4 steps an epoch: the LR after each epoch's last step
    lrs = lr_of_epochs(tmp_path / "multistep", "optim/scheduler=multistep", "optim.scheduler.milestones=[1,3]")
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001])  # x0.1 at epoch 1 and 3 (the LR once an epoch is done)
    # one-cycle: up to the peak (0.1) in the first epoch, then annealed far below the start (0.1 / 25)
    lrs = lr_of_epochs(tmp_path / "onecycle", "optim/scheduler=onecycle", "optim.scheduler.warmup_epochs=1")
    assert 0.09 < lrs[0] <= 0.1 and lrs[0] > lrs[1] > lrs[2] > lrs[3] and lrs[3] < 0.1 / 25


def test_a_compiled_model_trains_through_a_compiled_graph(tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    summary, _ = run(tmp_path, "trainer.compile=true", "trainer.precision=fp32", attention="none")
    assert counters["stats"]["unique_graphs"] >= 1 and math.isfinite(summary["final"]["train/loss"])


ABLATION = OmegaConf.load(ROOT / "conf" / "sweeps" / "ablation.yaml").attention.split(",")


# cbam_improved, which has every module the others use, in `make test`; the rest in `make nightly`.
@pytest.mark.parametrize(
    "variant", [v if v == "cbam_improved" else pytest.param(v, marks=pytest.mark.slow) for v in ABLATION]
)
def test_every_ablation_variant_trains_end_to_end(tmp_path, variant):
    summary, _ = run(tmp_path, attention=variant)
    assert summary["variant"] == variant and math.isfinite(summary["final"]["train/loss"])


def test_mixup_with_an_odd_batch_size_is_refused_before_anything_is_written(tmp_path):
    """timm's Mixup pairs each image with the batch's mirror image: an odd batch fails its assert mid-run."""
    with pytest.raises(ConfigError, match="data.batch_size=31 is odd.*use an even data.batch_size with trainer.mixup"):
        run(tmp_path, "trainer.mixup.cutmix_alpha=1.0", "data.batch_size=31")
    assert not (tmp_path / "run0").exists()
