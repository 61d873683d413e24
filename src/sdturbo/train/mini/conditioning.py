"""Captions -> the UNet's conditioning (context, y), exactly as TurboPipeline.encode_prompt builds it, plus the
frozen trained components (tokenizers, text towers, VAE) the later stages share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...models.clip import CLIPTextModel
from ...models.configs import UNetConfig, VAEConfig
from ...models.unet import make_y
from ...models.vae import AutoencoderKL, sample_latent
from ...tokenizer import CLIPTokenizer
from .checkpoint import load_checkpoint, require_done
from .clip_pretrain import load_text_encoders


@dataclass
class FrozenParts:
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModel
    vae: AutoencoderKL
    vae_config: VAEConfig

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context [B, 77, te1 + te2 hidden], pooled [B, te2 projection] (float32)."""
        with torch.autocast("cpu", torch.bfloat16):
            h1, _ = self.text_encoder(self.tokenizer(captions))
            h2, pooled = self.text_encoder_2(self.tokenizer_2(captions))
        return torch.cat([h1, h2], dim=-1).float(), pooled.float()

    @torch.no_grad()
    def encode_images(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> scaled latent sample z0 [B, 4, h, w] (float32)."""
        with torch.autocast("cpu", torch.bfloat16):
            mean, logvar = self.vae.encode(image)
        z = sample_latent(mean.float(), logvar.float(), torch.randn(mean.shape, generator=generator))
        return z * self.vae_config.scaling_factor

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1]; differentiable (the ADD losses need gradients through it)."""
        return self.vae.decode(z0 / self.vae_config.scaling_factor)


def final_vae_state(workdir: Path) -> dict:
    """The VAE to decode with: the "vae_decoder" stage's when it has finished, else the "vae" stage's (whose
    encoder, the latent space, is the same)."""
    state = load_checkpoint(workdir / "vae_decoder.safetensors")
    return state if state is not None and state.get("done") else require_done(workdir / "vae.safetensors", "vae")


def load_frozen_parts(workdir: Path, final_decoder: bool = False) -> FrozenParts:
    """The finished tokenizer, clip and vae stages, frozen and in eval mode. final_decoder: require the
    fine-tuned decoder of the "vae_decoder" stage (the stages that decode need it; the teacher only encodes)."""
    text_encoder, text_encoder_2 = load_text_encoders(require_done(workdir / "clip.safetensors", "clip"))
    if final_decoder:
        vae_state = require_done(workdir / "vae_decoder.safetensors", "vae_decoder")
    else:
        vae_state = require_done(workdir / "vae.safetensors", "vae")
    vae = AutoencoderKL(vae_state["config"])
    vae.load_state_dict(vae_state["vae"])
    return FrozenParts(
        CLIPTokenizer.from_folder(workdir / "tokenizer"),
        CLIPTokenizer.from_folder(workdir / "tokenizer_2"),
        text_encoder,
        text_encoder_2,
        vae.eval().requires_grad_(False),
        vae_state["config"],
    )


def unet_condition(context: torch.Tensor, pooled: torch.Tensor, cfg: UNetConfig, size_px: int, drop: torch.Tensor | None = None):
    """(context, y) for the UNet. `drop` [B] bool zeroes a sample's text conditioning: the unconditional input, as
    the pipeline feeds it for classifier-free guidance (force_zeros_for_empty_prompt: zeros, not an encoded "")."""
    if drop is not None:
        keep = (~drop).float()
        context = context * keep[:, None, None]
        pooled = pooled * keep[:, None]
    time_ids = torch.tensor([[size_px, size_px, 0, 0, size_px, size_px]], dtype=pooled.dtype)
    return context, make_y(pooled, time_ids.expand(pooled.shape[0], -1), cfg)
