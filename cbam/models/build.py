"""Build a model from the composed config: the attention factory goes into the backbone."""

from omegaconf import DictConfig
from torch import nn

from cbam.errors import instantiate_config


def build_model(cfg: DictConfig) -> nn.Module:
    return instantiate_config(cfg.model, "model", attn_layer=instantiate_config(cfg.attention, "attention"))
