"""Stage "teacher": the eps-prediction UNet on VAE latents, SD's scaled-linear schedule, 10% classifier-free
dropout of the text conditioning, bf16 autocast, AdamW, EMA. The EMA weights are the teacher (and the student's
initialisation)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...models.unet import UNet
from ..schedule import standard_schedule
from .cache import ShapesCache
from .checkpoint import (
    EMA,
    clipped_step,
    load_checkpoint,
    resume,
    save_checkpoint,
    set_learning_rate,
)
from .conditioning import load_frozen_parts, unet_condition
from .config import IMAGE_SIZE_PX, MINI, TeacherStage


def min_snr_weight(abar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weight for eps prediction, min(SNR, gamma) / SNR (Hang et al. 2023): stops the easy
    low-noise steps from dominating, which speeds up convergence several-fold."""
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / snr


def train_teacher(workdir: Path, stage: TeacherStage, cache: ShapesCache, log) -> dict:
    path = workdir / "teacher.safetensors"
    state = load_checkpoint(path)
    if state is not None and state.get("done"):
        return state
    parts = load_frozen_parts(workdir)
    torch.manual_seed(stage.seed)
    unet = UNet(MINI.unet)
    ema = EMA(unet, stage.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=stage.lr, weight_decay=0.01)
    step = resume(state, {"unet": unet, "ema": ema.model}, opt)
    schedule = standard_schedule()
    generator = torch.Generator().manual_seed(stage.seed + step)
    unet.train()
    start, loss_sum = time.time(), 0.0
    while step < stage.steps:
        set_learning_rate(opt, stage.lr, step, stage.steps, stage.warmup_steps)
        image, captions, _ = cache.batch(stage.batch_size, generator)
        z0 = parts.encode_images(image, generator)
        context, pooled = parts.encode_captions(captions)
        drop = torch.rand(len(captions), generator=generator) < stage.cfg_dropout
        context, y = unet_condition(context, pooled, MINI.unet, IMAGE_SIZE_PX, drop)
        t = torch.randint(0, 1000, (len(captions),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        z_t = schedule.add_noise(z0, noise, t)
        with torch.autocast("cpu", torch.bfloat16):
            eps = unet(z_t, t.float(), context, y)
        per_sample = F.mse_loss(eps.float(), noise, reduction="none").flatten(1).mean(1)
        loss = (min_snr_weight(schedule.abar[t], stage.min_snr_gamma) * per_sample).mean()
        clipped_step(opt, loss, unet.parameters())
        # EMA warm-up: a short run averages over its own length instead of mostly over the random initialisation.
        ema.decay = min(stage.ema_decay, (1 + step) / (10 + step))
        ema.update(unet)
        step += 1
        loss_sum += loss.item()
        if step % stage.log_every == 0:
            log(f"teacher step {step}/{stage.steps} loss {loss_sum / stage.log_every:.4f} ({time.time() - start:.0f}s)")
            loss_sum = 0.0
        if step % stage.save_every == 0 and step < stage.steps:
            save_checkpoint(
                path,
                {"unet": unet.state_dict(), "ema": ema.model.state_dict(), "optimizer": opt.state_dict(), "step": step},
            )
    state = {"ema": ema.model.state_dict(), "step": step, "done": True}
    save_checkpoint(path, state)
    return state


def load_teacher(workdir: Path, partial: bool = False) -> UNet:
    """The teacher's EMA UNet, frozen. partial=True also accepts an unfinished run's latest save."""
    state = load_checkpoint(workdir / "teacher.safetensors")
    if state is None or not (state.get("done") or partial):
        raise ValueError(f"stage 'teacher' has not finished (see {workdir / 'teacher.safetensors'}); run it first "
                         f"(sdturbo train mini --stage teacher --workdir {workdir})")
    unet = UNet(MINI.unet)
    unet.load_state_dict(state["ema"])
    return unet.eval().requires_grad_(False)
