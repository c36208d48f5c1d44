"""Channel gate: `Mc = sigmoid(sum_p MLP_p(pool_p(x)))`, applied as `x * Mc` (CBAM eq. 2)."""

import itertools

import torch
from torch import nn

from cbam.errors import ConfigError

from .pooling import CHANNEL_POOLS, check_pools


class DescriptorBatchNorm(nn.BatchNorm2d):
    """BatchNorm over pooled (N, C, 1, 1) descriptors.

    Each descriptor has one value per channel, so in train mode the batch is the only axis the
    statistics are taken over; PyTorch's own message for N = 1 does not say that.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            raise ConfigError(
                "the attention MLP has BatchNorm over 1x1 pooled descriptors, which needs more than one "
                "sample per batch in train mode: use batch size >= 2, call model.eval(), "
                "or set attention.mlp_bn=false"
            )
        return super().forward(x)


def hidden_width(channels: int, reduction: int, min_hidden: int) -> int:
    hidden = max(channels // reduction, min_hidden)
    if hidden < 1:
        raise ConfigError(
            f"attention MLP hidden width is {channels} // reduction={reduction} = {hidden} for {channels} "
            f"channels: set attention.reduction <= {channels} or attention.min_hidden >= 1"
        )
    return hidden


def _mlp(channels: int, hidden: int, bn: bool, bias: bool) -> nn.Sequential:
    """`C -> h -> C` as 1x1 convs, optionally `C -> h, BN, ReLU, h -> C, BN` (improvement 1)."""
    norm = DescriptorBatchNorm if bn else lambda _: nn.Identity()
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1, bias=bias),
        norm(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1, bias=bias),
        norm(channels),
    )


class ChannelGate(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        min_hidden: int = 0,
        pools=("avg", "max"),
        shared_mlp: bool = True,
        mlp_bn: bool = False,
        mlp_bias: bool = False,
    ):
        super().__init__()
        if reduction < 1:
            raise ConfigError(f"attention.reduction={reduction} must be a positive integer, e.g. 16 (the paper)")
        hidden = hidden_width(channels, reduction, min_hidden)
        self.pools = check_pools("attention.channel_pools", pools)
        self.shared_mlp = shared_mlp
        if shared_mlp:
            self.mlp = _mlp(channels, hidden, mlp_bn, mlp_bias)
        else:
            self.mlps = nn.ModuleList(_mlp(channels, hidden, mlp_bn, mlp_bias) for _ in self.pools)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlps = itertools.repeat(self.mlp) if self.shared_mlp else self.mlps
        # Each pooled descriptor goes through its MLP on its own, as in the paper: with BN in the MLP,
        # stacking them into one batch would mix avg and max statistics.
        logits = sum(mlp(CHANNEL_POOLS[p](x)) for p, mlp in zip(self.pools, mlps, strict=False))  # (N, C, 1, 1)
        return x * self.gate(logits)
