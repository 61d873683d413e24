"""TINY ADD components and batches shared by the loop and parallel tests."""

import zlib

import torch

from sdturbo.models.configs import TINY
from sdturbo.models.unet import UNet
from sdturbo.models.vae import AutoencoderKL
from sdturbo.train.data import ShapesStream
from sdturbo.train.discriminator import DISCRIMINATOR_TINY, ProjectedDiscriminator
from sdturbo.train.loop import ADDBatch, ADDConfig, build_models, build_optimizers, unet_conditioning

SIZE_PX = 64  # TINY's VAE downscales 8x: 8 x 8 latents, TINY's UNet sample size
BATCH = 2
CFG = ADDConfig(lr_student=1e-4, lr_discriminator=1e-3, seed=3)


def text_embeddings(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in text encoder: a fixed random (context, pooled) per caption, in TINY's widths."""
    contexts, pooled = [], []
    for caption in captions:
        g = torch.Generator().manual_seed(zlib.crc32(caption.encode()))
        contexts.append(torch.randn(77, TINY.unet.context_dim, generator=g))
        pooled.append(torch.randn(TINY.text_encoder_2.projection_dim, generator=g))
    return torch.stack(contexts), torch.stack(pooled)


def make_batch(captions: list[str], image: torch.Tensor, with_uncond: bool = False) -> ADDBatch:
    context, pooled = text_embeddings(captions)
    uncond = negative = None
    if with_uncond:
        uncond = unet_conditioning(torch.zeros_like(context), torch.zeros_like(pooled), SIZE_PX, TINY.unet)
        negative = unet_conditioning(*text_embeddings(["blurry"] * len(captions)), SIZE_PX, TINY.unet)
    return ADDBatch(image, unet_conditioning(context, pooled, SIZE_PX, TINY.unet), pooled, uncond, negative)


def build(cfg: ADDConfig = CFG):
    torch.manual_seed(0)  # the "pretrained" teacher, VAE and ViTs are the same random weights in every build
    models = build_models(UNet(TINY.unet), AutoencoderKL(TINY.vae), ProjectedDiscriminator(DISCRIMINATOR_TINY), cfg)
    return models, build_optimizers(models, cfg)


def stream_batch(step: int, rank: int = 0, world: int = 1) -> ADDBatch:
    data = ShapesStream(seed=11, size_px=SIZE_PX).batch(step, BATCH, rank, world)
    return make_batch(data.captions, data.image)
