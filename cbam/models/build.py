"""Build a model from the composed config: the attention factory goes into the backbone."""

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from cbam.errors import ConfigError


def build_model(cfg: DictConfig) -> nn.Module:
    try:
        return instantiate(cfg.model, attn_layer=instantiate(cfg.attention))
    except InstantiationException as e:
        # Our own option errors already name the option and the fix; Hydra's wrapper only buries them.
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
