"""Seeing inside a model: attention maps (forward hooks on the gates), Grad-CAM, and their figures."""

from .gradcam import grad_cam
from .hooks import AttentionMaps, capture_attention
from .visualize import end_of_run_figures, log_end_of_run, visualize_checkpoints

__all__ = [
    "AttentionMaps",
    "capture_attention",
    "end_of_run_figures",
    "grad_cam",
    "log_end_of_run",
    "visualize_checkpoints",
]
