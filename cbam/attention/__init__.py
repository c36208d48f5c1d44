from .channel import ChannelGate
from .module import ChannelSpatialAttention
from .spatial import SpatialGate

__all__ = ["ChannelGate", "ChannelSpatialAttention", "SpatialGate"]
