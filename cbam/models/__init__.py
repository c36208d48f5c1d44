from omegaconf import OmegaConf

from .build import build_model
from .cost import count_flops, count_params
from .resnet import BasicBlock, Bottleneck, ResNet, stem_for

# conf/model/resnet{18,...,152}.yaml derive their stem from the data's image size.
OmegaConf.register_new_resolver("resnet_stem", stem_for, replace=True)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_model", "count_flops", "count_params"]
