"""Pooling operators shared by the channel and spatial gates."""

import torch

# Name -> reduction. `amax` rather than `max` because it returns values only and spreads the
# gradient over ties instead of picking one index.
POOLS = {"avg": torch.mean, "max": torch.amax}


def check_pools(option: str, pools) -> tuple[str, ...]:
    pools = tuple(pools)
    unknown = [p for p in pools if p not in POOLS]
    if not pools or unknown or len(set(pools)) != len(pools):
        raise ValueError(
            f"{option}={list(pools)} is not supported: use a non-empty list of distinct pool types "
            f"from {sorted(POOLS)}, e.g. {option}=[avg,max]"
        )
    return pools
