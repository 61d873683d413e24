"""sdturbo: SDXL-Turbo inference and Adversarial Diffusion Distillation, from scratch in PyTorch."""

from .models.configs import PRESETS, ModelSpec, TextEncoderConfig, UNetConfig, VAEConfig

__all__ = ["PRESETS", "ModelSpec", "TextEncoderConfig", "UNetConfig", "VAEConfig"]
