"""Build a model from the composed config: the attention factory goes into the backbone."""

from fnmatch import fnmatchcase

from omegaconf import DictConfig
from torch import nn

from cbam.errors import instantiate_config


def build_model(cfg: DictConfig) -> nn.Module:
    return instantiate_config(cfg.model, "model", attn_layer=instantiate_config(cfg.attention, "attention"))


def batch_norms_matching(model: nn.Module, pattern: str) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers whose module name matches the glob, by name."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and fnmatchcase(name, pattern)
    }  # fmt: skip
