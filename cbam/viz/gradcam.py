"""Grad-CAM (Selvaraju et al., ICCV 2017) of a ResNet's last stage, read with a forward hook.

    CAM_c = ReLU(sum_k w_k^c A^k),   w_k^c = mean over (h, w) of d y_c / d A^k

A^k: the last stage's output channels; y_c: the logit of the class explained. The map says where the
features that raise y_c are; it is upsampled to the image and divided by its maximum.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("predicted", "label")  # the class Grad-CAM explains: the prediction or the true label


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() for the duration, then the mode it had: BN must not mix the images or update its statistics."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cam, logits): cam (N, H, W) in [0, 1] at the input's size, for class `target` (N,) or the
    predicted class when None; logits (N, K). Both detached, on the CPU. Call it in eval mode."""
    stage = getattr(model, model.stage_names[-1])
    captured = []
    handle = stage.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            # The input asks for a gradient so that the graph exists even when the weights are frozen.
            logits = model(x.detach().requires_grad_(True))  # (N, K)
    finally:
        handle.remove()
    acts = captured[0]  # (N, C, h, w)
    if target is None:
        target = logits.argmax(1)
    # In eval mode the images do not interact, so the gradient of the summed scores is each image's own.
    score = logits.gather(1, target.to(logits.device)[:, None]).sum()
    (grads,) = torch.autograd.grad(score, acts)  # (N, C, h, w); the weights' .grad stay untouched
    weights = grads.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
    cam = F.relu((weights * acts).sum(1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (N, H, W)
    peak = cam.amax((1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), 0.0)  # all zero: no evidence
    return cam.detach().float().cpu(), logits.detach().float().cpu()
