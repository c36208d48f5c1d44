"""Backbones: the paper's parameter counts, torchvision compatibility, attention placement and init."""

import csv
import math
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import CONF, ROOT, compose_config
from hydra import initialize_config_dir
from torch import nn

from cbam.attention import ChannelSpatialAttention
from cbam.cli import attention_presets
from cbam.errors import ConfigError
from cbam.models import build_model, count_flops, count_params


def imagenet_model(model: str, attention: str, *overrides: str) -> nn.Module:
    return build_model(
        compose_config("model_stats", f"model={model}", f"attention={attention}", "data=imagenet", *overrides)
    )


def cbam_params(channels: list[int], *, biases: bool, spatial_bn: bool) -> int:
    """CBAM's parameters over blocks of these widths, from the paper's definition: an MLP C -> C/16 -> C per
    block (with biases in the authors' code), a 7x7 conv of the 2 pooled maps, BN(1) after it (authors' code)."""
    total = 0
    for c in channels:
        h = c // 16
        total += c * h + h * c + (h + c if biases else 0) + 2 * 7 * 7 + (2 if spatial_bn else 0)
    return total


def block_widths(depth: int) -> list[int]:
    """The attention's width in every block of torchvision's ResNet-18 and ResNet-50."""
    layers = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    expansion = 4 if depth == 50 else 1
    return [w * expansion for n, w in zip(layers, [64, 128, 256, 512], strict=True) for _ in range(n)]


@pytest.mark.parametrize("depth", [18, 50])
def test_paper_parameter_counts(depth):
    """torchvision's own ResNet's count; + CBAM as the authors' code builds it (the paper reports 28.09M for
    ResNet-50, 11.78M for ResNet-18: 28,089,624 and 11,779,392); + CBAM as the post builds it (no MLP biases,
    no spatial BN; ResNet-50: 28,073,544)."""
    base = sum(p.numel() for p in getattr(torchvision.models, f"resnet{depth}")().parameters())
    assert count_params(imagenet_model(f"resnet{depth}", "none")) == base
    official = base + cbam_params(block_widths(depth), biases=True, spatial_bn=True)
    assert count_params(imagenet_model(f"resnet{depth}", "cbam_official")) == official
    assert round(official / 1e4) / 100 == {18: 11.78, 50: 28.09}[depth]  # the paper's table, to its digits
    assert count_params(imagenet_model(f"resnet{depth}", "cbam")) == base + cbam_params(
        block_widths(depth), biases=False, spatial_bn=False
    )


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weights_load_strictly_and_give_identical_logits(depth):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")().eval()
    ours = imagenet_model(f"resnet{depth}", "none").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("depth, blocks", [(20, 9), (32, 15), (44, 21), (56, 27), (110, 54)])
def test_cifar_resnets_follow_he_et_al(depth, blocks):
    model = build_model(compose_config("model_stats", f"model=resnet{depth}", "attention=none", "data=cifar10"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 6 * ((depth - 2) // 6) + 1  # 6n 3x3 convs + the stem: depth = 6n + 2 with the fc
    assert len(model.blocks()) == blocks
    assert [getattr(model, f"layer{i}")[-1].conv2.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # He et al. report 0.27M parameters for ResNet-20 with identity shortcuts; projections add a little.
    if depth == 20:
        assert 0.27e6 < count_params(model) < 0.28e6


def test_data_config_sets_channels_classes_and_small_image_stem():
    model = build_model(compose_config("model_stats", "model=resnet18", "attention=cbam", "data=fashion_mnist"))
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)  # stem from image size
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert imagenet_model("resnet18", "none").conv1.kernel_size == (7, 7)


@pytest.mark.parametrize(
    "model, block_name, last_bn, shape",
    [("resnet20", "layer2.1", "bn2", (2, 32, 16, 16)),  # a basic block
     ("resnet50", "layer3.2", "bn3", (2, 1024, 8, 8))],  # a bottleneck: after its third BN
)  # fmt: skip
def test_attention_sits_after_the_last_bn_before_the_addition(model, block_name, last_bn, shape):
    if model == "resnet20":
        net = build_model(compose_config("model_stats", "model=resnet20", "attention=cbam", "data=cifar10")).eval()
    else:
        net = imagenet_model(model, "cbam").eval()
    block = net.get_submodule(block_name)  # identity shortcut: no downsampling here
    seen = {}
    getattr(block, last_bn).register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
    block.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn_in", i[0].clone()))
    x = torch.randn(*shape)
    with torch.no_grad():
        out = block(x)
        expected = torch.relu(block.attn(seen["bn"]) + x)
    assert torch.equal(seen["attn_in"], seen["bn"]) and block.attn.channel.mlp[0].in_channels == shape[1]
    torch.testing.assert_close(out, expected)


def test_official_init_holds_inside_a_full_resnet():
    """The backbone's init skips the attention: the authors' zero spatial BN weight and zero biases survive."""
    model = imagenet_model("resnet50", "cbam_official")
    for blk in model.blocks():
        assert torch.all(blk.attn.spatial.conv[1].weight == 0)
        assert torch.all(blk.attn.channel.mlp[0].bias == 0) and torch.all(blk.attn.channel.mlp[3].bias == 0)
        assert blk.attn.spatial.conv[0].weight.abs().sum() > 0  # He-normal, not the backbone's zero-init


def test_attention_stages_option():
    model = imagenet_model("resnet18", "cbam", "model.attention_stages=[3,4]")
    has_attention = [isinstance(blk.attn, ChannelSpatialAttention) for blk in model.blocks()]
    assert has_attention == [False, False, False, False, True, True, True, True]
    with pytest.raises(ValueError, match=r"attention_stages=\[5\]"):
        imagenet_model("resnet18", "cbam", "model.attention_stages=[5]")


def _std_ratio(weights: list[torch.Tensor], expected_std: float) -> float:
    return torch.cat([w.flatten() for w in weights]).std().item() / expected_std


def test_attention_owns_its_init_inside_a_full_resnet():
    torch.manual_seed(0)
    default = imagenet_model("resnet50", "cbam")
    he = imagenet_model("resnet50", "cbam_he_init")
    for model in (default, he):  # the backbone's own convs: He-normal, fan_out
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and ".attn." not in name and m.weight.numel() > 10_000:
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                assert _std_ratio([m.weight], math.sqrt(2 / fan_out)) == pytest.approx(1, abs=0.05), name

    def attention_convs(model, kind):
        return [m for blk in model.blocks() for m in getattr(blk.attn, kind).modules() if isinstance(m, nn.Conv2d)]

    for kind in ("channel", "spatial"):
        # cbam keeps PyTorch's default: uniform in +-1/sqrt(fan_in), std = bound / sqrt(3).
        for m in attention_convs(default, kind):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            assert m.weight.abs().max() <= bound
            if m.weight.numel() > 10_000:
                assert _std_ratio([m.weight], bound / math.sqrt(3)) == pytest.approx(1, abs=0.05)
        # cbam_he_init: He-normal with fan_out = out_channels * k * k, pooled per layer shape.
        by_shape = {}
        for m in attention_convs(he, kind):
            by_shape.setdefault(m.weight.shape, []).append(m.weight)
        for shape, weights in by_shape.items():
            fan_out = shape[0] * shape[2] * shape[3]
            assert _std_ratio(weights, math.sqrt(2 / fan_out)) == pytest.approx(1, abs=0.1), shape


def test_flops_count_the_attention_whichever_path_runs_it():
    """The CPU kernel is opaque to torch.utils.flop_counter: counting runs the op-by-op path. CBAM on the
    Fashion-MNIST ResNet-20 adds, per block of width C at H x W, its MLP on two descriptors (2 x 2 x C x C/16
    multiply-adds) and the 7 x 7 conv from two maps (2 x 49 x H x W), at 2 FLOPs each."""
    counts = {}
    for attention in ("none", "cbam", "cbam_official"):
        cfg = compose_config("train", "data=fashion_mnist", "model=resnet20", f"attention={attention}")
        counts[attention] = count_flops(build_model(cfg), cfg.data.in_chans, cfg.data.image_size)
    stages = [(16, 28), (32, 14), (64, 7)]  # width, side: three blocks each
    added = sum(3 * 2 * (2 * 2 * c * (c // 16) + 2 * 49 * side * side) for c, side in stages)
    assert counts["cbam"] - counts["none"] == added == 613_116
    assert counts["cbam_official"] == counts["cbam"]  # its biases and spatial BN are not multiply-adds


def test_hooks_on_any_part_of_the_attention_see_it_run():
    """A hook on a gate's conv or MLP (a profiler's, a user's) fires: the CPU kernel would skip those modules."""
    cfg = compose_config("train", "data=synthetic", "model=resnet20", "attention=cbam", "model.layers=[1,1,1]")
    model = build_model(cfg).eval()
    seen = []
    attn = model.layer1[0].attn
    conv, mlp_down = attn.spatial.conv[0], attn.channel.mlp[0]
    for part in (conv, mlp_down):
        part.register_forward_hook(lambda module, inputs, output: seen.append(module))
    with torch.no_grad():
        model(torch.randn(2, cfg.data.in_chans, 32, 32))
    assert (seen.count(conv), seen.count(mlp_down)) == (1, 2)  # the shared MLP: once per pooled descriptor


def test_the_scripts_variants_are_a_list_a_comma_separated_string_or_every_preset():
    """model_stats.py and benchmark.py: `variants=cbam` reaches them as a string, not a list of letters."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert attention_presets("cbam") == attention_presets(["cbam"]) == ["none", "cbam"]
        assert attention_presets("cbam_parallel,none,cbam") == ["none", "cbam", "cbam_parallel"]
        every = attention_presets(None)
        assert every[0] == "none" and sorted(every) == sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))
        with pytest.raises(ConfigError, match="variants: nope not in conf/attention/ \\(there: cbam, "):
            attention_presets("cbam,nope")


def test_model_stats_prints_and_writes_the_paper_counts(tmp_path):
    csv_path = tmp_path / "stats.csv"
    result = subprocess.run(
        [sys.executable, "scripts/model_stats.py", "model=resnet50", "variants=[none,cbam,cbam_official]",
         f"csv={csv_path}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    # The counts test_paper_parameter_counts derives: torchvision's ResNet-50, + CBAM as the post builds it
    # (no MLP biases, no spatial BN), + CBAM as the authors' code builds it (the paper's 28.09M).
    base = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    post = base + cbam_params(block_widths(50), biases=False, spatial_bn=False)
    official = base + cbam_params(block_widths(50), biases=True, spatial_bn=True)
    printed = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert f"| {base:,} |" in printed["none"]
    assert f"| {post:,} | +{post - base:,} ({100 * (post - base) / base:+.2f}%) |" in printed["cbam"]
    assert f"| {official:,} |" in printed["cbam_official"]
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "attention,params,params vs none,GFLOPs,GFLOPs vs none"
    rows = {row["attention"]: row for row in csv.DictReader(lines)}
    assert {name: row["params"] for name, row in rows.items()} == {
        "none": f"{base:,}", "cbam": f"{post:,}", "cbam_official": f"{official:,}"
    }  # fmt: skip
    assert rows["none"]["params vs none"] == "+0 (+0.00%)"
    assert rows["cbam"]["params vs none"] == f"+{post - base:,} (+{100 * (post - base) / base:.2f}%)"
