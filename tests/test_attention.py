"""Every attention variant against an independent float64 reference of the post's arithmetic."""

import inspect
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, compose_config
from hydra.utils import instantiate
from timm.layers.cbam import CbamModule

from cbam.attention import ChannelSpatialAttention, fused
from cbam.attention.pooling import SPATIAL_POOLS

VARIANTS = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))


def make(variant: str, channels: int, *overrides: str):
    cfg = compose_config("model_stats", f"attention={variant}", *overrides)
    return instantiate(cfg.attention)(channels).double()


def randomize(module: torch.nn.Module, seed: int = 0) -> dict:
    """Give every parameter and BN buffer a random value; return them by state_dict name."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = t
        elif name.endswith("running_var"):
            state[name] = torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5
        else:
            state[name] = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5
    module.load_state_dict(state)
    return {k: v.clone() for k, v in state.items()}


# ---- the reference: the post's formulas, written out with explicit weights ----

EPS = 1e-5


def bn(x, sd, prefix, training):
    """BatchNorm over every axis but the channel axis (dim 1)."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = sd[prefix + "running_mean"], sd[prefix + "running_var"]
    x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS)
    return x_hat * sd[prefix + "weight"].view(shape) + sd[prefix + "bias"].view(shape)


def mlp(v, sd, prefix, *, with_bn=False, with_bias=False, training=False):
    """v: (N, C) pooled descriptor -> (N, C). Layers C -> h [-> BN] -> ReLU -> C [-> BN]."""
    w1, w2 = sd[prefix + "0.weight"].flatten(1), sd[prefix + "3.weight"].flatten(1)
    h = v @ w1.T + (sd[prefix + "0.bias"] if with_bias else 0)
    if with_bn:
        h = bn(h, sd, prefix + "1.", training)
    h = torch.relu(h)
    out = h @ w2.T + (sd[prefix + "3.bias"] if with_bias else 0)
    if with_bn:
        out = bn(out, sd, prefix + "4.", training)
    return out


def channel_map(x, mlp_avg, mlp_max):
    """Mc = sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x))), shaped (N, C, 1, 1)."""
    avg = x.mean(dim=(2, 3))
    mx = x.flatten(2).max(dim=2).values
    return torch.sigmoid(mlp_avg(avg) + mlp_max(mx))[:, :, None, None]


def spatial_map(x, conv_stack, *, max_first=False, residual=False):
    """Ms = sigmoid(f([AvgPool_c(x); MaxPool_c(x)])), shaped (N, 1, H, W)."""
    avg, mx = x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True).values
    cat = torch.cat([mx, avg] if max_first else [avg, mx], dim=1)
    out = conv_stack(cat)
    if residual:
        out = out + cat.mean(dim=1, keepdim=True)
    return torch.sigmoid(out)


def conv(x, w, bias=None):
    return F.conv2d(x, w, bias, padding=w.shape[-1] // 2)


def reference(variant, x, sd, training):
    shared = lambda **kw: lambda v: mlp(v, sd, "channel.mlp.", training=training, **kw)  # noqa: E731
    single_conv = lambda m: conv(m, sd["spatial.conv.0.weight"])  # noqa: E731

    def deep_stack(m):  # improvement 2: 2->32 (k), BN, ReLU, 32->1 (k), BN
        h = torch.relu(bn(conv(m, sd["spatial.conv.0.weight"]), sd, "spatial.conv.1.", training))
        return bn(conv(h, sd["spatial.conv.3.weight"]), sd, "spatial.conv.4.", training)

    def sequential(x, mc, ms):
        y = x * mc(x)
        return y * ms(y)

    if variant in ("cbam", "cbam_dynamic_ratio", "cbam_he_init"):
        return sequential(x, lambda t: channel_map(t, shared(), shared()), lambda t: spatial_map(t, single_conv))
    if variant == "cbam_separate_bn":
        branch = lambda i: lambda v: mlp(v, sd, f"channel.mlps.{i}.", with_bn=True, training=training)  # noqa: E731
        return sequential(x, lambda t: channel_map(t, branch(0), branch(1)), lambda t: spatial_map(t, single_conv))
    if variant == "cbam_deep_spatial":
        return sequential(
            x, lambda t: channel_map(t, shared(), shared()), lambda t: spatial_map(t, deep_stack, residual=True)
        )
    if variant == "cbam_parallel":
        return x + x * channel_map(x, shared(), shared()) + x * spatial_map(x, single_conv)
    if variant.startswith(("cbam_improved", "improved_without_")):
        # The combined listing, and each leave-one-out preset with one change set back to the original.
        # Hidden width (min_hidden) and init change the weights' shapes and values, not the arithmetic.
        bn_mlp = variant != "improved_without_mlp_bn"
        stack = single_conv if variant == "improved_without_deep_spatial" else deep_stack
        mc = lambda t: channel_map(t, shared(with_bn=bn_mlp), shared(with_bn=bn_mlp))  # noqa: E731
        ms = lambda t: spatial_map(t, stack)  # noqa: E731
        if variant == "improved_without_parallel":
            return sequential(x, mc, ms)
        return x + x * mc(x) + x * ms(x)
    if variant == "cbam_official":

        def conv_bn(m):
            return bn(conv(m, sd["spatial.conv.0.weight"]), sd, "spatial.conv.1.", training)

        mc = lambda t: channel_map(t, shared(with_bias=True), shared(with_bias=True))  # noqa: E731
        return sequential(x, mc, lambda t: spatial_map(t, conv_bn, max_first=True))
    if variant == "se":
        w = lambda v: mlp(v, sd, "channel.mlp.")  # noqa: E731
        return x * torch.sigmoid(w(x.mean(dim=(2, 3))))[:, :, None, None]
    if variant == "channel_only":
        return x * channel_map(x, shared(), shared())
    if variant == "spatial_only":
        return x * spatial_map(x, single_conv)
    if variant == "none":
        return x
    raise AssertionError(f"no reference for {variant}")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_reference(variant, training):
    """Forward and every gradient (input and parameters) against autograd through the reference: the
    pools' backward rests on choices made for speed (the channel max keeping its argmax, the spatial max's
    own backward, means as sum x 1/n)."""
    assert_matches_the_reference(variant, 32, training)


@pytest.mark.parametrize("variant", ["cbam", "cbam_parallel", "se"])
def test_a_wide_channel_mlp_matches_the_reference(variant):
    """ResNet-50's last stage gives the channel MLP 2048 channels and 128 hidden units, which the kernel runs a
    vector at a time; the 32-channel tests (2 hidden units) never fill one. 400 channels, 25 hidden units:
    whole vectors and a remainder at any vector width, in float64 and in float32 NHWC."""
    assert make(variant, 400).channel.mlp[0].out_channels == 25
    module = assert_matches_the_reference(variant, 400, True)
    assert module.kernel_args(torch.randn(1, 400, 2, 2, dtype=torch.float64)) is not None  # the kernel ran
    assert_matches_the_float64_reference(variant, 400, torch.float32, True, False)


def assert_matches_the_reference(variant: str, channels: int, training: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    module = make(variant, channels).train(training)
    sd = randomize(module)
    params = dict(module.named_parameters())
    for name in params:
        sd[name].requires_grad_()
    x = torch.randn(4, channels, 9, 7, dtype=torch.float64, requires_grad=True)
    out, expected = module(x), reference(variant, x, sd, training)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *params.values()], upstream)
    want = torch.autograd.grad(expected, [x, *(sd[n] for n in params)], upstream)
    for name, g, w in zip(["input", *params], got, want, strict=True):
        torch.testing.assert_close(g, w, msg=name)
    return module


def test_original_matches_timm_cbam_module():
    channels = 64
    ours = make("cbam", channels).eval()
    sd = randomize(ours)
    theirs = CbamModule(channels, rd_ratio=1 / 16, spatial_kernel_size=7).double().eval()
    # Explicit mapping: timm names the MLP fc1/fc2, and its spatial conv is followed by a BN that the
    # original CBAM does not have; running_var = 1 - eps turns that BN into the identity exactly.
    with torch.no_grad():
        theirs.channel.fc1.weight.copy_(sd["channel.mlp.0.weight"])
        theirs.channel.fc2.weight.copy_(sd["channel.mlp.3.weight"])
        theirs.spatial.conv.conv.weight.copy_(sd["spatial.conv.0.weight"])
        spatial_bn = theirs.spatial.conv.bn
        spatial_bn.running_mean.zero_()
        spatial_bn.running_var.fill_(1 - spatial_bn.eps)
        spatial_bn.weight.fill_(1)
        spatial_bn.bias.zero_()
    x = torch.randn(3, channels, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_dynamic_ratio_floors_hidden_width_at_four():
    assert make("cbam_dynamic_ratio", 32).channel.mlp[0].out_channels == 4  # 32 // 16 = 2 -> 4
    assert make("cbam_improved", 32).channel.mlp[0].out_channels == 4
    assert make("improved_without_min_hidden", 32).channel.mlp[0].out_channels == 2
    assert make("cbam_dynamic_ratio", 256).channel.mlp[0].out_channels == 16
    assert make("cbam", 32).channel.mlp[0].out_channels == 2


def test_cbam_preset_is_the_paper_and_the_class_default():
    cfg = compose_config("model_stats", "attention=cbam").attention
    defaults = {
        name: p.default
        for name, p in inspect.signature(ChannelSpatialAttention).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    preset = {
        k: (list(v) if not isinstance(v, (str, int, bool)) else v) for k, v in cfg.items() if not k.startswith("_")
    }
    assert preset == {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()}
    # The paper's values: r = 16, k = 7, avg & max pooling, channel then spatial, no MLP bias, no BN.
    assert (cfg.reduction, cfg.spatial_kernel, cfg.arrangement) == (16, 7, "channel_spatial")
    assert list(cfg.channel_pools) == ["avg", "max"] and list(cfg.spatial_pools) == ["avg", "max"]
    assert not (cfg.mlp_bias or cfg.mlp_bn or cfg.spatial_bn or cfg.spatial_residual) and cfg.spatial_depth == 1


def test_command_line_option_on_top_of_a_preset():
    module = make("cbam", 32, "attention.arrangement=parallel", "attention.spatial_kernel=3")
    assert module.arrangement == "parallel"
    assert module.spatial.conv[0].kernel_size == (3, 3)
    sd = randomize(module)
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    three = lambda m: conv(m, sd["spatial.conv.0.weight"])  # noqa: E731
    mc = channel_map(x, lambda v: mlp(v, sd, "channel.mlp."), lambda v: mlp(v, sd, "channel.mlp."))
    torch.testing.assert_close(module(x), x + x * mc + x * spatial_map(x, three))


def test_spatial_then_channel_arrangement():
    module = make("cbam", 16, "attention.arrangement=spatial_channel")
    sd = randomize(module)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    y = x * spatial_map(x, lambda m: conv(m, sd["spatial.conv.0.weight"]))
    shared = lambda v: mlp(v, sd, "channel.mlp.")  # noqa: E731
    torch.testing.assert_close(module(x), y * channel_map(y, shared, shared))


@pytest.mark.parametrize("channels", [16, 64, 256])
@pytest.mark.parametrize("variant", VARIANTS)
def test_shape_and_gradient_flow(variant, channels):
    module = make(variant, channels).train()
    randomize(module)  # a zero-initialised BN weight (cbam_official) would block gradients by design
    with torch.no_grad():  # and keep the MLP's hidden ReLUs alive: at C = 16 there is a single one
        for name, p in module.named_parameters():
            if ".mlp" in name and (".0." in name):
                p.abs_()
    x = torch.randn(
        8, channels, 6, 6, dtype=torch.float64, requires_grad=True
    )  # enough samples that no ReLU is dead for all
    out = module(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_spatial_max_gives_amax_gradient_at_ties():
    """The spatial gate's max over channels has its own backward; where several channels share the
    maximum (ReLU zeros, duplicated channels) it must split the gradient as autograd's amax does."""
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64).relu().round()  # zeros and small integers: many ties
    x[:, 3:] = x[:, :3]  # and every maximum at least twice
    assert ((x == x.amax(1, keepdim=True)).sum(1) >= 2).all()
    grad = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    SPATIAL_POOLS["max"](ours).backward(grad)
    reference.amax(1, keepdim=True).backward(grad)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=0, atol=1e-15)
    torch.autograd.gradcheck(SPATIAL_POOLS["max"], torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True))


def test_none_adds_no_parameters_and_is_identity():
    module = make("none", 64)
    assert sum(p.numel() for p in module.parameters()) == 0
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    assert torch.equal(module(x), x)


def test_official_init_starts_spatial_gate_at_one_half():
    module = make("cbam_official", 64).eval()
    assert torch.all(module.spatial.conv[1].weight == 0)
    assert torch.all(module.channel.mlp[0].bias == 0) and torch.all(module.channel.mlp[3].bias == 0)
    x = torch.randn(2, 64, 5, 5, dtype=torch.float64)
    spatial_logits = module.spatial.conv(torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1))
    torch.testing.assert_close(torch.sigmoid(spatial_logits), torch.full_like(spatial_logits, 0.5))


@pytest.mark.parametrize(
    "overrides, channels, match",
    [
        ((), 8, r"reduction.*min_hidden"),  # 8 // 16 = 0
        (("attention.reduction=0",), 64, r"attention\.reduction=0"),
        (("attention.spatial_kernel=4",), 64, r"attention\.spatial_kernel=4.*odd"),
        (("attention.channel_pools=[avg,median]",), 64, r"attention\.channel_pools.*avg.*max"),
        (("attention.spatial_pools=[]",), 64, r"attention\.spatial_pools"),
        (("attention.arrangement=diagonal",), 64, r"attention\.arrangement='diagonal'.*parallel"),
        (("attention.init=xavier",), 64, r"attention\.init='xavier'.*he"),
        (("attention.spatial=false", "attention.arrangement=parallel"), 64, r"parallel.*attention\.spatial=true"),
    ],
)
def test_bad_options_name_the_option_and_the_fix(overrides, channels, match):
    with pytest.raises(ValueError, match=match):
        make("cbam", channels, *overrides)


def test_hidden_width_error_is_raised_from_a_preset_too():
    with pytest.raises(ValueError, match=r"set attention\.reduction <= 8 or attention\.min_hidden >= 1"):
        make("cbam_separate_bn", 8)
    assert make("cbam_dynamic_ratio", 8).channel.mlp[0].out_channels == 4  # the floor is the documented fix


@pytest.mark.parametrize("variant", ["cbam_separate_bn", "cbam_improved"])
def test_bn_mlp_with_batch_of_one_in_train_mode_says_why(variant):
    module = make(variant, 32).train()
    with pytest.raises(ValueError, match=r"more than one sample.*batch size >= 2.*mlp_bn=false"):
        module(torch.randn(1, 32, 4, 4, dtype=torch.float64))
    assert module.eval()(torch.randn(1, 32, 4, 4, dtype=torch.float64)).shape == (1, 32, 4, 4)


# The presets whose gates have no BatchNorm and one spatial conv: on a CPU they run the fused kernel.
FUSED = ["cbam", "cbam_dynamic_ratio", "cbam_he_init", "cbam_parallel", "channel_only", "se", "spatial_only"]
# What a float32 or bfloat16 gate (inputs and outputs rounded, float32 inside) can match float64 to, relative
# to the largest entry of each compared tensor. Measured (tests as below): float32 errors up to 4e-7 without
# BatchNorm in the gates and 6e-5 with it (train-mode BN over 4 pooled descriptors divides by their small
# spread); bfloat16 up to 5e-3 without, and with it 5-40% of a gradient's largest entry: BN's centring
# cancels most of bfloat16's 8 bits. That bound still catches a wrong or missing term, an error of order 1.
TOLERANCE = {
    (torch.float32, False): 1e-5,
    (torch.float32, True): 5e-4,
    (torch.bfloat16, False): 2e-2,
    (torch.bfloat16, True): 6e-1,
}


def modes() -> list:
    """Every combination; compiled runs in the layout a CPU trains in by default (NHWC: fp32 where the CPU has no
    native bf16, bf16 where it has) in `make test`, the NCHW ones in `make nightly`."""
    found = []
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("nchw", "nhwc"):
            for compiled in (False, True):
                mode = f"{'compiled' if compiled else 'eager'}-{str(dtype)[6:]}-{layout}"
                nightly = compiled and layout == "nchw"
                found.append(
                    pytest.param(dtype, layout == "nhwc", compiled, id=mode, marks=[pytest.mark.slow] * nightly)
                )
    return found


@pytest.mark.parametrize("dtype, channels_last, compiled", modes())
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_preset_in_every_mode_matches_the_float64_reference(variant, dtype, channels_last, compiled):
    """Values and every gradient, in float32 and bfloat16 (autocast, as training runs it), NCHW and NHWC, eager
    and through torch.compile (fullgraph: one graph, the fused op included; aot_eager traces forward and
    backward without codegen, so this stays fast on a CPU)."""
    assert_matches_the_float64_reference(variant, 32, dtype, channels_last, compiled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [20, 24, 48])
def test_nhwc_samples_of_any_channel_count_match_the_float64_reference(channels, dtype):
    """The kernel moves NHWC samples in blocks of 16 channels where the CPU has AVX-512, of 8 where it has AVX2,
    when C allows (48: three blocks of 16 or six of 8; 24: three of 8 on AVX2), element by element otherwise
    (20 on either, 24 on AVX-512); 32 (above) is whole blocks on both. The 9 x 7 maps leave a partial block of
    positions."""
    assert_matches_the_float64_reference("cbam", channels, dtype, True, False)


def assert_matches_the_float64_reference(variant, channels, dtype, channels_last, compiled):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = make(variant, channels).train()
    sd = randomize(module)
    module = module.float()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    run = torch.compile(module, backend="aot_eager", fullgraph=True) if compiled else module
    x64 = torch.randn(4, channels, 9, 7, dtype=torch.float64)
    x = x64.to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = run(x)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    params = dict(module.named_parameters())
    got = torch.autograd.grad(out, [x, *params.values()], upstream.to(out.dtype))

    x_ref = x.detach().double().requires_grad_()  # the rounded input, so only the gate's own error is measured
    for name in params:
        sd[name] = params[name].detach().double().requires_grad_()
    expected = reference(variant, x_ref, sd, True)
    want = torch.autograd.grad(expected, [x_ref, *(sd[n] for n in params)], upstream)
    tol = TOLERANCE[dtype, any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())]
    for name, g, w in zip(["output", "input", *params], [out, *got], [expected, *want], strict=True):
        scale = max(w.abs().max().item(), 1.0)  # a gradient that is zero in exact arithmetic: absolute
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variant", [*FUSED, "cbam_improved"])
def test_the_residual_end_in_the_kernel_is_the_sum_and_relu_bit_for_bit(variant, dtype, channels_last):
    """attention(x, shortcut), relu(gated x + shortcut) in the kernel's pass, against the gated output then
    torch's add and relu (how the blocks ended before): the same bits in the output and in every gradient,
    ties at zero and negative zeros included. cbam_improved runs the composite path both ways."""
    torch.manual_seed(0)
    module = make(variant, 32).to(torch.float64 if dtype == torch.float64 else torch.float32).train()
    randomize(module)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 32, 9, 7).to(dtype).contiguous(memory_format=fmt)
    shortcut = torch.randn(3, 32, 9, 7).to(dtype).contiguous(memory_format=fmt)
    shortcut[0] = 0.0  # relu(gated + 0) where gated is 0 below: the tie at zero
    shortcut[1, :4] = -0.0
    x[0, :8] = 0.0
    upstream = torch.randn(3, 32, 9, 7).to(dtype).contiguous(memory_format=fmt)
    results = []
    for fused_end in (True, False):
        xi, si = x.clone().requires_grad_(), shortcut.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = module(xi, si) if fused_end else torch.relu(module(xi) + si)
        grads = torch.autograd.grad(out, [xi, si, *module.parameters()], upstream)
        results.append([out, *grads])
    assert module.kernel_args(x, shortcut) is not None or variant == "cbam_improved"
    for name, got, want in zip(["output", "x", "shortcut", *dict(module.named_parameters())], *results, strict=True):
        assert torch.equal(got, want) and got.stride() == want.stride(), name
        assert torch.equal(torch.signbit(got), torch.signbit(want)), name


@pytest.mark.parametrize(
    "dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-nhwc"]
)
def test_the_residual_end_compiles_into_one_graph(dtype, channels_last):
    """torch.compile(fullgraph=True) of attention(x, shortcut): the op with its optional shortcut traces as
    one graph (aot_eager: the same ops, so the same bits as eager)."""
    torch._dynamo.reset()
    module = make("cbam", 32).float().train()
    randomize(module)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, shortcut, upstream = (torch.randn(3, 32, 9, 7).to(dtype).contiguous(memory_format=fmt) for _ in range(3))
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    results = []
    for run in (module, compiled):
        xi, si = x.clone().requires_grad_(), shortcut.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = run(xi, si)
        results.append([out, *torch.autograd.grad(out, [xi, si, *module.parameters()], upstream)])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("variant", FUSED)
def test_the_fused_presets_run_the_kernel_on_a_cpu(variant, monkeypatch):
    calls = []
    lib = fused.library()
    kernel = lib.cbam_forward
    monkeypatch.setattr(lib, "cbam_forward", lambda *a: calls.append(1) or kernel(*a))
    module = make(variant, 32)
    module(torch.randn(2, 32, 5, 5, dtype=torch.float64))
    assert calls == [1]
    with capture_attention_of(module):  # a forward hook on a gate: the composite path runs, whose modules it sees
        module(torch.randn(2, 32, 5, 5, dtype=torch.float64))
    assert calls == [1]


@contextmanager
def capture_attention_of(module):
    gates = [g.gate for g in (module.channel, module.spatial) if hasattr(g, "gate")]
    handles = [gate.register_forward_hook(lambda *a: None) for gate in gates]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arrangement", ["channel_spatial", "spatial_channel", "parallel"])
def test_the_fused_kernel_splits_tied_maxima_as_the_composite_path(arrangement):
    """Ties at a maximum: the channel max gives its gradient to the first position (adaptive_max_pool2d),
    the spatial max splits it over the tied channels (amax). Inputs made of few values tie everywhere."""
    module = make("cbam", 16, f"attention.arrangement={arrangement}").train()
    randomize(module)
    x = torch.randint(-2, 3, (3, 16, 6, 6)).double()
    x[:, 8:] = x[:, :8]  # every spatial maximum at least twice
    grads = []
    for run in (module, module.composite):
        xi = x.clone().requires_grad_()
        out = run(xi)
        grads.append(torch.autograd.grad(out, [xi, *module.parameters()], torch.ones_like(out)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


def test_without_a_compiler_the_composite_path_runs_after_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CBAM_KERNEL_CACHE", str(tmp_path / "cache"))
    fused.library.cache_clear()
    try:
        module = make("cbam", 32)
        x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
        with caplog.at_level("WARNING"):
            out = module(x)
            module(x)
        torch.testing.assert_close(out, module.composite(x))
        assert [r.message for r in caplog.records if "fused attention kernel" in r.message] == [
            next(r.message for r in caplog.records if "fused attention kernel" in r.message)
        ]
        assert "using the composite path" in caplog.text
    finally:
        fused.library.cache_clear()


@pytest.mark.slow
def test_inductor_compiles_a_cbam_resnet_on_cpu():
    from cbam.models import build_model

    torch._dynamo.reset()
    model = build_model(compose_config("model_stats", "model=resnet20", "attention=cbam", "data=cifar10")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)
