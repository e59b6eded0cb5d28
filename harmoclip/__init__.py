"""HarmoCLIP in plain torch: model wrapper, losses, metrics and checkpoints (no Ray needed)."""

from .config import MethodConfig, ModelConfig
from .losses import HarmoCLIPLoss
from .model import HarmoCLIP, create_clip, register_tiny_configs

__all__ = ["HarmoCLIP", "HarmoCLIPLoss", "MethodConfig", "ModelConfig", "create_clip", "register_tiny_configs"]
