"""Spatial gate: `Ms = sigmoid(conv([pool_p over channels]))`, applied as `x * Ms` (CBAM eq. 3)."""

import torch
from torch import nn

from cbam.errors import ConfigError

from .pooling import SPATIAL_POOLS, check_pools


class SpatialGate(nn.Module):
    def __init__(
        self,
        kernel_size: int = 7,
        pools=("avg", "max"),
        depth: int = 1,
        width: int = 32,
        bn: bool = False,
        residual: bool = False,
    ):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(
                f"attention.spatial_kernel={kernel_size} is not supported: use an odd size so the map keeps "
                "its height and width, e.g. 7 (the paper) or 3"
            )
        if depth < 1:
            raise ConfigError(f"attention.spatial_depth={depth} must be >= 1 (1 is the paper's single conv)")
        self.pools = check_pools("attention.spatial_pools", pools)
        self.residual = residual
        layers = []
        widths = [len(self.pools)] + [width] * (depth - 1) + [1]
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:], strict=False)):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False))
            if bn:
                layers.append(nn.BatchNorm2d(c_out))
            if i < depth - 1:
                layers.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*layers)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([SPATIAL_POOLS[p](x) for p in self.pools], dim=1)  # (N, P, H, W)
        # NHWC for the conv: oneDNN's backward for a 2-channel NCHW input measured 4x slower on CPU.
        logits = self.conv(pooled.contiguous(memory_format=torch.channels_last))  # (N, 1, H, W)
        if self.residual:
            # Improvement 2's shortcut: the mean of the pooled maps bypasses the conv stack.
            logits = logits + pooled.mean(dim=1, keepdim=True)
        return x * self.gate(logits)
