"""Pooling operators shared by the channel and spatial gates."""

import torch
import torch.nn.functional as F

from cbam.errors import ConfigError


def _mean(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The mean as sum times 1/n: the same value, but its backward is a broadcast view instead of a
    full-size division (measured 3x faster over channels and 6x over H, W on CPU)."""
    n = 1
    for d in dims:
        n *= x.shape[d]
    return x.sum(dim=dims, keepdim=True) * (1.0 / n)


def _max_over_channels(x: torch.Tensor) -> torch.Tensor:
    return x.max(dim=1, keepdim=True).values


# Name -> pooling, over the spatial dims (channel gate, output (N, C, 1, 1)) or over the channels
# (spatial gate, output (N, 1, H, W)). The max pools keep the argmax for the backward pass: amax's
# backward, which spreads the gradient over ties, measured 1.2x (spatial) and 4x (channel) slower.
CHANNEL_POOLS = {"avg": lambda x: _mean(x, (2, 3)), "max": lambda x: F.adaptive_max_pool2d(x, 1)}
SPATIAL_POOLS = {"avg": lambda x: _mean(x, (1,)), "max": _max_over_channels}


def check_pools(option: str, pools) -> tuple[str, ...]:
    pools = tuple(pools)
    unknown = [p for p in pools if p not in CHANNEL_POOLS]
    if not pools or unknown or len(set(pools)) != len(pools):
        raise ConfigError(
            f"{option}={list(pools)} is not supported: use a non-empty list of distinct pool types "
            f"from {sorted(CHANNEL_POOLS)}, e.g. {option}=[avg,max]"
        )
    return pools
