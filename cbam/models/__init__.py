from .build import build_model
from .resnet import BasicBlock, Bottleneck, ResNet
from .stats import count_flops, count_params

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_model", "count_flops", "count_params"]
