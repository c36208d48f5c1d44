"""Parameter and FLOP counts."""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, in_chans: int, image_size: int) -> int:
    """Forward FLOPs of one image, as torch.utils.flop_counter counts them: 2 per multiply-add of
    matmuls and convolutions; elementwise ops (pooling, sigmoid, the gates' products) are not counted."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, image_size, image_size, device=device))
    model.train(was_training)
    return counter.get_total_flops()
