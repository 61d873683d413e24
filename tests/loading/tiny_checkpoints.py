"""Helpers for the loading tests: official-size models on the meta device and tiny random checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from sdturbo.models.clip import CLIPTextModel
from sdturbo.models.configs import TINY, ModelSpec, UNetConfig, VAEConfig
from sdturbo.models.unet import UNet
from sdturbo.models.vae import AutoencoderKL

# A layout unlike both presets: 4 UNet levels with 1 ResBlock each, attention from level 1; 3 VAE levels, 3 ResBlocks.
ODD = ModelSpec(
    unet=UNetConfig(
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 64, 128, 128),
        transformer_depth=(0, 1, 0, 2),
        layers_per_block=1,
        head_dim=64,
        context_dim=64 + 128,
        addition_time_embed_dim=16,
        adm_in_channels=128 + 6 * 16,
        norm_num_groups=32,
        sample_size=8,
    ),
    text_encoder=TINY.text_encoder,
    text_encoder_2=TINY.text_encoder_2,
    vae=VAEConfig(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=3,
        norm_num_groups=32,
        scaling_factor=0.13025,
        force_upcast=True,
    ),
)


def build_models(spec: ModelSpec, device: str = "cpu") -> dict[str, nn.Module]:
    with torch.device(device):
        return {
            "unet": UNet(spec.unet),
            "text_encoder": CLIPTextModel(spec.text_encoder),
            "text_encoder_2": CLIPTextModel(spec.text_encoder_2),
            "vae": AutoencoderKL(spec.vae),
        }


def random_state_dicts(spec: ModelSpec, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor drawn from N(0, 1): unlike the default init (ones, zeros), any swapped or misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: {k: torch.randn(t.shape, generator=generator) for k, t in model.state_dict().items()}
        for name, model in build_models(spec, device="meta").items()
    }
