"""ResNets with an attention module in every residual block.

One class serves both families: the CIFAR ResNets of He et al. 2016 sec. 4.2 (3x3 stem, stages of
16/32/64 channels) and the ImageNet ResNets with torchvision's layout and parameter names, so that
torchvision weights load strictly when the attention has no parameters.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cbam.attention import ChannelSpatialAttention
from cbam.errors import ConfigError

AttentionFactory = Callable[[int], nn.Module]


def _no_attention(channels: int) -> nn.Module:
    return nn.Identity()


def residual_end(attn: nn.Module, out: torch.Tensor, shortcut: torch.Tensor, relu: nn.Module) -> torch.Tensor:
    """relu(attn(out) + shortcut). Our attention module takes the shortcut itself, so that its CPU kernel adds
    and rectifies each sample while its gated output is in cache; any other module, and ours while a hook watches it
    (a hook on the attention sees its own output, the gated features), is followed by the two ops."""
    if isinstance(attn, ChannelSpatialAttention) and not (attn._forward_hooks or attn._forward_pre_hooks):
        return attn(out, shortcut)
    return relu(attn(out) + shortcut)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, downsample: nn.Module, attn_layer: AttentionFactory):
        super().__init__()
        self.conv1 = conv3x3(c_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.attn = attn_layer(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Placement from the paper's code: on the residual branch, after the last BN, before the sum.
        return residual_end(self.attn, out, self.downsample(x), self.relu)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, downsample: nn.Module, attn_layer: AttentionFactory):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)  # stride on the 3x3, as torchvision (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn_layer(c_out)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return residual_end(self.attn, out, self.downsample(x), self.relu)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """A ResNet of `len(layers)` stages, stage i having `layers[i]` blocks of width `widths[i]`.

    attn_layer: factory `f(channels) -> nn.Module` called once per block; it owns its parameters' init.
    attention_stages: 1-based stage numbers whose blocks get attention; None = every stage.
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        in_chans: int = 3,
        stem: str = "imagenet",
        attn_layer: AttentionFactory = _no_attention,
        attention_stages: Sequence[int] | None = None,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if block not in BLOCKS:
            raise ConfigError(f"model.block={block!r} is unknown: use one of {', '.join(BLOCKS)}")
        if stem not in STEMS:
            raise ConfigError(
                f"model.stem={stem!r} is unknown: use imagenet (7x7 stride 2 + maxpool, 224 px) "
                "or cifar (3x3 stride 1, for 28-32 px)"
            )
        if len(layers) != len(widths):
            raise ConfigError(
                f"model.layers {list(layers)} and model.widths {list(widths)} must have one entry per stage"
            )
        stages = range(1, len(layers) + 1)
        attention_stages = list(stages) if attention_stages is None else list(attention_stages)
        if not set(attention_stages) <= set(stages):
            raise ConfigError(f"model.attention_stages={attention_stages} must be stage numbers in {list(stages)}")
        block_cls = BLOCKS[block]

        stem_width = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_chans, stem_width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        c_in = stem_width
        self.stage_names = []
        for stage, (n_blocks, width) in enumerate(zip(layers, widths, strict=True), start=1):
            stage_attn = attn_layer if stage in attention_stages else _no_attention
            c_out = width * block_cls.expansion
            blocks = []
            for i in range(n_blocks):
                stride = 2 if stage > 1 and i == 0 else 1
                downsample = nn.Identity()
                if stride != 1 or c_in != c_out:
                    # Projection shortcut (He et al. option B), torchvision's `downsample.0/1` names.
                    downsample = nn.Sequential(
                        nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
                    )
                blocks.append(block_cls(c_in, width, stride, downsample, stage_attn))
                c_in = c_out
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{stage}")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.num_features = c_in
        self._init_backbone(zero_init_residual)

    def _init_backbone(self, zero_init_residual: bool) -> None:
        """torchvision's init for everything but the attention modules, which initialise themselves:
        overwriting them here would silently undo an attention init scheme (README, "Attention variants")."""
        attention = {id(m) for blk in self.blocks() for m in blk.attn.modules()}
        for m in self.modules():
            if id(m) in attention:
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for blk in self.blocks():
                nn.init.zeros_((blk.bn3 if isinstance(blk, Bottleneck) else blk.bn2).weight)

    def blocks(self) -> list[nn.Module]:
        return [blk for name in self.stage_names for blk in getattr(self, name)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x  # (N, C_last, H', W')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)  # (N, C_last)
        return self.fc(x)
