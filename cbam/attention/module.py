"""The configurable attention family: every variant in conf/attention/ is a preset of this class."""

import torch
from torch import nn

from cbam.errors import ConfigError

from . import fused
from .channel import ChannelGate
from .spatial import SpatialGate

ARRANGEMENTS = ("channel_spatial", "spatial_channel", "parallel")


class ChannelSpatialAttention(nn.Module):
    """Channel gate and spatial gate, composed in sequence (CBAM) or fused in parallel.

    Defaults are the paper's CBAM. With both gates off it is the identity with no parameters.
    """

    def __init__(
        self,
        channels: int,
        *,
        channel: bool = True,
        spatial: bool = True,
        arrangement: str = "channel_spatial",
        reduction: int = 16,
        min_hidden: int = 0,
        channel_pools=("avg", "max"),
        shared_mlp: bool = True,
        mlp_bn: bool = False,
        mlp_bias: bool = False,
        spatial_kernel: int = 7,
        spatial_pools=("avg", "max"),
        spatial_depth: int = 1,
        spatial_width: int = 32,
        spatial_bn: bool = False,
        spatial_residual: bool = False,
        init: str = "default",
    ):
        super().__init__()
        if arrangement not in ARRANGEMENTS:
            raise ConfigError(f"attention.arrangement={arrangement!r} is unknown: use one of {', '.join(ARRANGEMENTS)}")
        if arrangement == "parallel" and not (channel and spatial):
            raise ConfigError(
                "attention.arrangement=parallel fuses both gates (x + x*Mc + x*Ms): set attention.channel=true "
                "and attention.spatial=true, or use arrangement=channel_spatial"
            )
        if init not in _INIT:
            raise ConfigError(f"attention.init={init!r} is unknown: use one of {', '.join(_INIT)}")
        self.arrangement = arrangement
        self.channel = (
            ChannelGate(channels, reduction, min_hidden, channel_pools, shared_mlp, mlp_bn, mlp_bias)
            if channel
            else nn.Identity()
        )
        self.spatial = (
            SpatialGate(spatial_kernel, spatial_pools, spatial_depth, spatial_width, spatial_bn, spatial_residual)
            if spatial
            else nn.Identity()
        )
        _INIT[init](self)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """x gated; with a shortcut, relu(x gated + shortcut): the end of a residual block, which the fused
        kernel then computes per sample while the gated output is in cache (unfused, the sum and the relu are
        two more passes over memory forward and one backward)."""
        found = self.kernel_args(x, shortcut)
        if found is not None:
            return fused.FusedAttention.apply(x, shortcut, found[0], *found[1])
        return self.composite(x, shortcut)

    def kernel_args(
        self, x: torch.Tensor, shortcut: torch.Tensor | None = None
    ) -> tuple[list[int], list[torch.Tensor]] | None:
        """The fused kernel's spec and parameters for input x (and the shortcut), or None where the composite
        path runs."""
        if not fused.kernel_available():
            return None
        found = fused.spec_and_params(self)
        if found is None or not fused.supported(x, found[1], shortcut) or self._observed():
            return None
        return found

    def _observed(self) -> bool:
        """Something watches the ops, which the kernel would hide: hooks on any of the module's parts (cbam.viz
        reads Mc and Ms at the gates; hook-based profilers count convolutions and linears), or a dispatch mode
        (torch.utils.flop_counter, which counts the composite path's FLOPs and sees none in the kernel). A
        compiled graph is traced once, without either: the check is left out of it."""
        if not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() > 0:
            return True
        parts = [m for m in self.modules() if m is not self]
        return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in parts)

    def composite(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """Op by op, the gates as PyTorch modules (then the sum with the shortcut and the relu, where one is
        given): the reference of the fused CPU op, and the path of every device and option it does not cover."""
        if self.arrangement == "parallel":
            out = x + self.channel(x) + self.spatial(x)  # improvement 5: both gates see the same input
        elif self.arrangement == "spatial_channel":
            out = self.channel(self.spatial(x))
        else:
            out = self.spatial(self.channel(x))
        return out if shortcut is None else torch.relu_(out + shortcut)


def _keep_default(module: nn.Module) -> None:
    """PyTorch's own init from construction, as the post's original code has it."""


def _he(module: nn.Module) -> None:
    """Improvement 4: He-normal (fan_out, relu) convs, zero biases, BN at weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _official(module: nn.Module) -> None:
    """The authors' released ResNet init as it reaches the attention: He-normal (fan_out) on the spatial
    convs, PyTorch's default on the MLP weights (nn.Linear there), every bias zero, and the spatial BN weight
    at 0 so each spatial gate starts at sigmoid(0) = 0.5 everywhere."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if isinstance(module.spatial, SpatialGate):
        for m in module.spatial.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.zeros_(m.weight)


_INIT = {"default": _keep_default, "he": _he, "official": _official}
