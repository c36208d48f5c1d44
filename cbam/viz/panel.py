"""What one model shows on a fixed set of val images: spatial maps, Grad-CAM, channel weights per stage."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbam.data import Loader
from cbam.errors import ConfigError

from .gradcam import TARGETS, eval_mode, grad_cam
from .hooks import capture_attention, check_blocks

MAX_SCAN = 10_000  # val images looked through for the first image of each class before filling in with the first ones
CHUNK = 128  # images per forward pass for the channel weights


def choose_images(loader: Loader, num_images: int) -> list[int]:
    """Val positions of the fixed images: the first image of each of the first `num_images` classes
    (row i shows class i), then the first images not yet chosen when there are fewer classes or a class
    is not within the first MAX_SCAN images. The same for every model of one dataset."""
    wanted = min(num_images, len(loader.classes))
    first: dict[int, int] = {}  # class -> position
    seen = 0
    for _, y in loader.epoch(0):
        for label in y.tolist():
            if label < wanted:
                first.setdefault(label, seen)
            seen += 1
        if (len(first) == wanted and seen >= num_images) or seen >= MAX_SCAN:
            break
    chosen = [first[c] for c in sorted(first)]
    taken = set(chosen)
    return chosen + [i for i in range(seen) if i not in taken][: num_images - len(chosen)]


def take_images(loader: Loader, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (normalised) val images and labels at `positions`, in that order, on the CPU: (N, C, H, W), (N,)."""
    wanted, last = set(positions), max(positions)
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    start = 0
    for x, y in loader.epoch(0):
        for i in wanted & set(range(start, start + len(y))):
            found[i] = (x[i - start].cpu(), y[i - start].cpu())
        start += len(y)
        if start > last:
            break
    if len(found) < len(wanted):
        raise ConfigError(f"the val split has {start} images, fewer than the {last + 1} asked for: lower num_images")
    return torch.stack([found[i][0] for i in positions]), torch.stack([found[i][1] for i in positions])


@dataclass
class Panel:
    """One model's columns in the figures."""

    title: str  # the variant, shown over the model's columns
    blocks: list[str]  # the blocks whose spatial maps are shown
    spatial: dict[str, np.ndarray | None]  # block -> Ms upsampled to the image, (N, H, W); None: no spatial gate
    cam: np.ndarray  # (N, H, W) Grad-CAM of the last stage, in [0, 1]
    probs: np.ndarray  # (N, K) softmax
    # stage -> every Mc value of its blocks over the channel images, flat; None: no channel gate
    channel: dict[str, np.ndarray | None]
    channel_images: int  # how many images the channel weights are over

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)


def model_panel(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    channel_images: torch.Tensor,
    *,
    title: str,
    blocks: Sequence[str] | None = None,
    target: str = "predicted",
) -> Panel:
    """Run `model` (in eval mode, restored afterwards) on the fixed images and on `channel_images`.

    images, channel_images: normalised (N, C, H, W) as the val loader gives them; labels (N,).
    blocks: names like "layer2.1", None = the last block of each stage.
    """
    if target not in TARGETS:
        raise ConfigError(f"target={target!r} is unknown: use one of {', '.join(TARGETS)}")
    blocks = check_blocks(model, blocks)
    device = next(model.parameters()).device
    size = images.shape[-2:]
    with eval_mode(model):
        with capture_attention(model, blocks) as maps:
            true = labels.to(device) if target == "label" else None
            cam, logits = grad_cam(model, images.to(device), true)
        spatial = {
            b: F.interpolate(maps.spatial[b], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
            if b in maps.spatial
            else None
            for b in blocks
        }
        with torch.no_grad(), capture_attention(model) as all_maps:
            for chunk in channel_images.split(CHUNK):
                model(chunk.to(device))
    by_stage: dict[str, list[torch.Tensor]] = {}
    for block, mc in all_maps.channel.items():
        by_stage.setdefault(block.split(".")[0], []).append(mc.flatten())
    return Panel(
        title=title,
        blocks=blocks,
        spatial=spatial,
        cam=cam.numpy(),
        probs=logits.softmax(1).numpy(),
        channel={s: torch.cat(by_stage[s]).numpy() if s in by_stage else None for s in model.stage_names},
        channel_images=len(channel_images),
    )
