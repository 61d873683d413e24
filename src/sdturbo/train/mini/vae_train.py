"""Stage "vae": the KL autoencoder, trained from scratch on the cached shapes with L1 + L2 reconstruction and a
small KL term (no perceptual or adversarial loss: flat-coloured shapes need neither). Ends by measuring the latent
scale so that scaling_factor * z has unit variance, as SD's 0.18215 / SDXL's 0.13025 do for theirs."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ...models.configs import VAEConfig
from ...models.vae import AutoencoderKL, sample_latent
from .cache import ShapesCache
from .checkpoint import (
    clipped_step,
    load_checkpoint,
    resume,
    save_checkpoint,
    set_learning_rate,
)
from .config import VAEDecoderStage, VAEStage


def random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One size x size crop per batch at a random offset, aligned to the downscale factor's grid of 8."""
    positions = (image.shape[-1] - size) // 8 + 1
    top, left = (8 * int(v) for v in torch.randint(positions, (2,), generator=generator))
    return image[..., top : top + size, left : left + size]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, 1)) summed over latent elements, averaged over the batch."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


def vae_loss(vae: AutoencoderKL, image: torch.Tensor, kl_weight: float, generator: torch.Generator):
    mean, logvar = vae.encode(image)
    z = sample_latent(mean, logvar, torch.randn(mean.shape, generator=generator).to(mean))
    recon = vae.decode(z).float()
    rec = F.l1_loss(recon, image) + F.mse_loss(recon, image)
    kl = kl_divergence(mean.float(), logvar.float())
    return rec + kl_weight * kl, rec, kl


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, cache: ShapesCache, count: int) -> float:
    """1 / std of posterior samples over `count` cached images."""
    generator = torch.Generator().manual_seed(1)
    image, _, _ = cache.batch(count, generator)
    mean, logvar = vae.encode(image)
    z = sample_latent(mean, logvar, torch.randn(mean.shape, generator=generator))
    return float(1 / z.std())


def train_vae(path: Path, cfg: VAEConfig, stage: VAEStage, cache: ShapesCache, log) -> dict:
    """Train (or resume) and return the finished checkpoint: {"vae": state dict, "config": VAEConfig, ...}."""
    torch.manual_seed(stage.seed)
    vae = AutoencoderKL(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=0.0)
    state = load_checkpoint(path)
    if state is not None and state.get("done"):
        return state
    step = resume(state, {"vae": vae}, opt)
    generator = torch.Generator().manual_seed(stage.seed + step)
    vae.train()
    start = time.time()
    while step < stage.steps:
        set_learning_rate(opt, stage.lr, step, stage.steps, stage.warmup_steps)
        image, _, _ = cache.batch(stage.batch_size, generator)
        image = random_crop(image, stage.crop_px, generator)
        with torch.autocast("cpu", torch.bfloat16):
            loss, rec, kl = vae_loss(vae, image, stage.kl_weight, generator)
        clipped_step(opt, loss, vae.parameters())
        step += 1
        if step % stage.log_every == 0:
            log(f"vae step {step}/{stage.steps} rec {rec.item():.4f} kl {kl.item():.1f} ({time.time() - start:.0f}s)")
        if step % stage.save_every == 0 or step == stage.steps:
            save_checkpoint(path, {"vae": vae.state_dict(), "optimizer": opt.state_dict(), "step": step, "done": False})
    vae.eval()
    scale = latent_scale(vae, cache, stage.scale_images)
    log(f"vae latent scaling_factor {scale:.4f}")
    state = {"vae": vae.state_dict(), "config": replace(cfg, scaling_factor=scale), "step": step, "done": True}
    save_checkpoint(path, state)
    return state


def train_vae_decoder(path: Path, vae_state: dict, stage: VAEDecoderStage, cache: ShapesCache, log) -> dict:
    """Stage "vae_decoder": fine-tune the decoder alone on whole 64 px images, the encoder (so the latent space the
    teacher learns) frozen, as SD's "ft-MSE" VAE was made. Crop training leaves a gap at full size, because
    GroupNorm statistics and the mid-block attention see a different extent; this closes it."""
    vae = AutoencoderKL(vae_state["config"])
    vae.load_state_dict(vae_state["vae"])
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    state = load_checkpoint(path)
    if state is not None and state.get("done"):
        return state
    step = resume(state, {"vae": vae}, opt)
    generator = torch.Generator().manual_seed(stage.seed + step)
    start = time.time()
    while step < stage.steps:
        set_learning_rate(opt, stage.lr, step, stage.steps, stage.warmup_steps)
        image, _, _ = cache.batch(stage.batch_size, generator)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            mean, logvar = vae.encode(image)
        z = sample_latent(mean.float(), logvar.float(), torch.randn(mean.shape, generator=generator))
        with torch.autocast("cpu", torch.bfloat16):
            recon = vae.decode(z).float()
        loss = F.l1_loss(recon, image) + F.mse_loss(recon, image)
        clipped_step(opt, loss, params)
        step += 1
        if step % stage.log_every == 0:
            log(f"vae_decoder step {step}/{stage.steps} rec {loss.item():.4f} ({time.time() - start:.0f}s)")
        if step % stage.save_every == 0 and step < stage.steps:
            save_checkpoint(path, {"vae": vae.state_dict(), "optimizer": opt.state_dict(), "step": step})
    state = {"vae": vae.state_dict(), "config": vae_state["config"], "step": step, "done": True}
    save_checkpoint(path, state)
    return state
