"""sdturbo: SDXL-Turbo inference and Adversarial Diffusion Distillation, from scratch in PyTorch."""

from .models.configs import PRESETS, ModelSpec, TextEncoderConfig, UNetConfig, VAEConfig
from .pipeline import TurboPipeline, TurboPipelineOutput

__all__ = ["PRESETS", "ModelSpec", "TextEncoderConfig", "TurboPipeline", "TurboPipelineOutput", "UNetConfig", "VAEConfig"]
