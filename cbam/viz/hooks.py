"""The attention maps a model computes, read with forward hooks on its gates' sigmoids: no model edits.

`ChannelGate.gate` outputs Mc, (N, C, 1, 1); `SpatialGate.gate` outputs Ms, (N, 1, H, W). Every
variant is made of these two gates, so one hook per gate covers them all; a block whose attention has
no spatial (or channel) gate simply has no map of that kind.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from cbam.attention import ChannelGate, SpatialGate
from cbam.errors import ConfigError


def block_names(model: nn.Module) -> dict[str, nn.Module]:
    """Residual blocks by module name, in forward order: {"layer1.0": block, ...}."""
    blocks = {id(b) for b in model.blocks()}
    return {name: m for name, m in model.named_modules() if id(m) in blocks}


def last_block_of_each_stage(model: nn.Module) -> list[str]:
    return [f"{stage}.{len(getattr(model, stage)) - 1}" for stage in model.stage_names]


def check_blocks(model: nn.Module, blocks: Sequence[str] | None) -> list[str]:
    """The blocks asked for, or the last of each stage when None; a ConfigError names the valid ones."""
    if blocks is None:
        return last_block_of_each_stage(model)
    names = block_names(model)
    unknown = [b for b in blocks if b not in names]
    if unknown or not blocks:
        raise ConfigError(
            f"blocks={list(blocks)}: {', '.join(unknown) or 'empty'} not a block of this model; "
            f"use names like {', '.join(last_block_of_each_stage(model))} (any of layer1.0 ... {list(names)[-1]}), "
            "or blocks=null for the last block of each stage"
        )
    return list(blocks)


def _gate(block: nn.Module, kind: type) -> nn.Module | None:
    return next((m for m in block.attn.modules() if isinstance(m, kind)), None)


class AttentionMaps:
    """Gate outputs per block name, gathered over every forward pass run while capturing."""

    def __init__(self):
        self._spatial: dict[str, list[torch.Tensor]] = {}
        self._channel: dict[str, list[torch.Tensor]] = {}

    @property
    def spatial(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(maps) for name, maps in self._spatial.items()}  # each (N, 1, H, W)

    @property
    def channel(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(maps) for name, maps in self._channel.items()}  # each (N, C, 1, 1)


@contextmanager
def capture_attention(model: nn.Module, blocks: Sequence[str] | None = None) -> Iterator[AttentionMaps]:
    """Record the spatial and channel attention maps of `blocks` (default: every block) on the CPU.

    The hooks are removed on exit, also when the forward pass fails.
    """
    maps = AttentionMaps()
    named = block_names(model)
    handles = []

    def record(store: dict, name: str):
        def hook(module, inputs, output):
            store.setdefault(name, []).append(output.detach().float().cpu())

        return hook

    try:
        for name in named if blocks is None else check_blocks(model, blocks):
            block = named[name]
            for kind, store in ((SpatialGate, maps._spatial), (ChannelGate, maps._channel)):
                gate = _gate(block, kind)
                if gate is not None:
                    handles.append(gate.gate.register_forward_hook(record(store, name)))
        yield maps
    finally:
        for handle in handles:
            handle.remove()
