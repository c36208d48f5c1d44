"""The gates of a BatchNorm-free attention as one CPU op (fused_cpu.cpp), built at first use.

`ChannelSpatialAttention` runs through the kernel where its `kernel_args(x)` finds it serves: a CPU tensor in
float32, bfloat16 or float64, NCHW or NHWC, and gates without BatchNorm or a deep spatial stack (cbam and
the presets that share its ops). Everything else, CUDA included, runs the composite PyTorch path, which
is the op's reference. Both directions are ops registered with `torch.library` and joined by an
autograd.Function (`FusedAttention`), so a compiled model keeps one graph.

The kernel is compiled with the C++ compiler torch.compile uses on a CPU (`CXX`, else g++), once per
machine and source, into CBAM_KERNEL_CACHE (default ~/.cache/cbam-ablate); when that fails the composite
path runs, after one warning saying why.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
ACC = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
ARRANGEMENTS = {"channel_spatial": 0, "spatial_channel": 1, "parallel": 2}
CHANNEL_ONLY, SPATIAL_ONLY = 3, 4
POOLS = {"avg": 0, "max": 1}


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def _cache_dir() -> Path:
    return Path(os.environ.get("CBAM_KERNEL_CACHE", Path.home() / ".cache" / "cbam-ablate"))


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (and one warning) when it cannot be built here."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None or sys.platform != "linux":
        log.warning("fused attention kernel unavailable (no C++ compiler on Linux found): using the composite path")
        return None
    # -march=native: the binary is for this CPU, so its flags are part of the key (a shared home dir on a cluster)
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"fused_cpu-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fused_cpu-", suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(
                tmp, path
            )  # atomic: processes building at once (a multirun, torchrun ranks) each see a whole file
        except (OSError, subprocess.CalledProcessError) as e:
            Path(tmp).unlink(missing_ok=True)
            detail = getattr(e, "stderr", None) or str(e)
            log.warning("fused attention kernel failed to build (%s): using the composite path", detail.strip()[-500:])
            return None
    lib = ctypes.CDLL(str(path))
    lib.cbam_saved_size.restype = ctypes.c_long
    lib.cbam_saved_size.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 4]
    lib.cbam_forward.argtypes = [ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 7, *[ctypes.c_int] * 4]
    lib.cbam_backward.argtypes = [ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 10, *[ctypes.c_int] * 4]
    return lib


# ---------------------------------------------------------------------------------------------- the module's side


def spec_and_params(module) -> tuple[list[int], list[Tensor]] | None:
    """The kernel's description of `module` (a ChannelSpatialAttention) and its parameters in the kernel's
    order; None when the kernel does not cover it (BatchNorm in a gate, a deep spatial stack)."""
    from .channel import ChannelGate
    from .spatial import SpatialGate

    channel = module.channel if isinstance(module.channel, ChannelGate) else None
    spatial = module.spatial if isinstance(module.spatial, SpatialGate) else None
    if channel is None and spatial is None:
        return None
    if channel is not None and spatial is not None:
        arrangement = ARRANGEMENTS[module.arrangement]
    else:
        arrangement = CHANNEL_ONLY if channel is not None else SPATIAL_ONLY
    spec, params = [arrangement], []
    if channel is not None:
        mlps = [channel.mlp] if channel.shared_mlp else list(channel.mlps)
        if any(not isinstance(mlp[1], torch.nn.Identity) for mlp in mlps):
            return None  # BatchNorm over the batch's descriptors
        first = mlps[0][0]
        pools = [POOLS[p] for p in channel.pools]
        spec += [len(pools), *pools, *[0] * (2 - len(pools)), int(channel.shared_mlp), first.out_channels]
        spec.append(int(first.bias is not None))
        for mlp in mlps:
            down, up = mlp[0], mlp[3]
            params += [down.weight] + ([down.bias] if down.bias is not None else [])  # (h, C, 1, 1): (h, C)
            params += [up.weight] + ([up.bias] if up.bias is not None else [])
    else:
        spec += [0, 0, 0, 1, 0, 0]
    if spatial is not None:
        convs = [m for m in spatial.conv if isinstance(m, torch.nn.Conv2d)]
        if len(convs) != 1 or len(spatial.conv) != 1:
            return None  # a deep stack, or BatchNorm after the conv
        pools = [POOLS[p] for p in spatial.pools]
        spec += [len(pools), *pools, *[0] * (2 - len(pools)), convs[0].kernel_size[0], int(spatial.residual)]
        params.append(convs[0].weight)  # the ops make it contiguous: channels_last models hold it NHWC
    else:
        spec += [0, 0, 0, 1, 0]
    return spec, params


def layout(x: Tensor) -> int | None:
    """0 for NCHW, 1 for NHWC, None for any other memory layout."""
    if x.is_contiguous():
        return 0
    if x.is_contiguous(memory_format=torch.channels_last):
        return 1
    return None


@torch._dynamo.assume_constant_result  # decided once when torch.compile traces: a constant, not a graph break
def kernel_available() -> bool:
    return library() is not None


def supported(x: Tensor, params: list[Tensor], shortcut: Tensor | None = None) -> bool:
    """Whether the kernel takes this input, these parameters and this shortcut (kernel_available() aside)."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in DTYPES
        and layout(x) is not None
        and all(p.dtype == ACC[x.dtype] and p.device.type == "cpu" for p in params)
        and (shortcut is None or _same_memory(shortcut, x))
    )


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Same device, dtype, shape and memory layout: the kernel walks both with one index."""
    return a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and layout(a) == layout(b)


# ---------------------------------------------------------------------------------------------- the ops


def _pointers(tensors: list[Tensor]):
    return (ctypes.c_void_p * max(len(tensors), 1))(*[t.data_ptr() for t in tensors])


def _spec(spec: list[int]):
    return (ctypes.c_int32 * len(spec))(*spec)


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _forward(
    x: Tensor, shortcut: Tensor | None, params: list[Tensor], spec: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(output: x gated, or relu(x gated + shortcut); per-sample values saved for backward; the channel
    max's argmax)."""
    n, c, h, w = x.shape
    lib = library()
    out = torch.empty_like(x)
    saved = torch.empty(n, lib.cbam_saved_size(_spec(spec), n, c, h, w), dtype=ACC[x.dtype])
    argmax = torch.zeros(n, c, dtype=torch.int32)
    params = [p.contiguous() for p in params]
    status = lib.cbam_forward(
        DTYPES[x.dtype], layout(x), x.data_ptr(), _pointer(shortcut), out.data_ptr(), _pointers(params),
        saved.data_ptr(), argmax.data_ptr(), _spec(spec), n, c, h, w,
    )  # fmt: skip
    assert status == 0, f"cbam_forward: unsupported dtype {x.dtype}"
    return out, saved, argmax


fused_attention = torch.library.custom_op("cbam::fused_attention", _forward, mutates_args=())


@fused_attention.register_fake
def _(x, shortcut, params, spec):
    n, c, h, w = x.shape
    size = sum(_saved_parts(spec, c, h * w))
    return torch.empty_like(x), x.new_empty(n, size, dtype=ACC[x.dtype]), x.new_empty(n, c, dtype=torch.int32)


def _saved_parts(spec: list[int], c: int, p: int) -> list[int]:
    """What fused_cpu.cpp's Spec::saved_size adds up, for the fake op (no kernel call under tracing)."""
    arrangement, n_cp, hidden, n_sp = spec[0], spec[1], spec[5], spec[7]
    channel = [c + n_cp * c + n_cp * hidden] if arrangement != SPATIAL_ONLY else []
    spatial = [p + n_sp * p] if arrangement != CHANNEL_ONLY else []
    return channel + spatial


def _backward(
    grad: Tensor, x: Tensor, out: Tensor | None, saved: Tensor, argmax: Tensor, params: list[Tensor], spec: list[int]
) -> list[Tensor]:
    """[grad of x, grads of params], or with `out` (the forward's relu(x gated + shortcut)) [grad of x, grad of
    the shortcut, grads of params]."""
    n, c, h, w = x.shape
    grad = grad.contiguous(memory_format=torch.channels_last if layout(x) == 1 else torch.contiguous_format)
    params = [p.contiguous() for p in params]
    grad_x = torch.empty_like(x)
    grad_shortcut = [] if out is None else [torch.empty_like(x)]
    grad_params = [torch.empty_like(p) for p in params]
    status = library().cbam_backward(
        DTYPES[x.dtype], layout(x), grad.data_ptr(), x.data_ptr(), _pointer(out), grad_x.data_ptr(),
        _pointer(grad_shortcut[0] if grad_shortcut else None), _pointers(params), _pointers(grad_params),
        saved.data_ptr(), argmax.data_ptr(), _spec(spec), n, c, h, w,
    )  # fmt: skip
    assert status == 0, f"cbam_backward: unsupported dtype {x.dtype}"
    return [grad_x, *grad_shortcut, *grad_params]


fused_attention_backward = torch.library.custom_op("cbam::fused_attention_backward", _backward, mutates_args=())


@fused_attention_backward.register_fake
def _(grad, x, out, saved, argmax, params, spec):
    grad_shortcut = [] if out is None else [torch.empty_like(x)]
    return [
        torch.empty_like(x),
        *grad_shortcut,
        *[torch.empty_like(p, memory_format=torch.contiguous_format) for p in params],
    ]


class FusedAttention(torch.autograd.Function):
    """The gates' autograd over the two ops: `FusedAttention.apply(x, shortcut, spec, *params)` is the gated x,
    or with a shortcut tensor relu(gated x + shortcut).

    An autograd.Function rather than the ops' own `register_autograd`: eager, that dispatch cost 0.15-0.4 ms
    more per block and step (measured on 128 x 16 x 1 x 1 inputs, where the kernel itself takes ~0.1 ms; a
    CIFAR ResNet-20 has 9 blocks); torch.compile traces this into one graph all the same. For the same
    reason eager calls go to the ops' implementations directly: through the dispatcher they cost ~0.1 ms
    more per block and step (128-sample ResNet-20 batches, bf16); traced, the registered ops are what the
    graph holds."""

    @staticmethod
    def forward(ctx, x: Tensor, shortcut: Tensor | None, spec: list[int], *params: Tensor) -> Tensor:
        run = fused_attention if torch.compiler.is_compiling() else _forward
        out, saved, argmax = run(x, shortcut, list(params), spec)
        # The relu's gradient needs its output (as nn.ReLU's backward); the gated path needs nothing more.
        ctx.save_for_backward(x, saved, argmax, out if shortcut is not None else None, *params)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, saved, argmax, out, *params = ctx.saved_tensors
        run = fused_attention_backward if torch.compiler.is_compiling() else _backward
        grads = run(grad_out, x, out, saved, argmax, params, ctx.spec)
        grad_x, grad_shortcut = grads[0], (grads[1] if out is not None else None)
        return grad_x, grad_shortcut, None, *grads[1 + (out is not None) :]
