"""Seeing inside a model: attention maps (forward hooks on the gates), Grad-CAM, and their figures."""

from .gradcam import grad_cam
from .hooks import AttentionMaps, capture_attention
from .visualize import log_end_of_run, visualize_checkpoints

__all__ = ["AttentionMaps", "capture_attention", "grad_cam", "log_end_of_run", "visualize_checkpoints"]
