from .build import batch_norms_matching, build_model
from .cost import count_flops, count_params
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "batch_norms_matching", "build_model", "count_flops", "count_params"]
