"""Stage "student": Adversarial Diffusion Distillation of the mini teacher (train/loop.py): the student starts as
the teacher's copy, learns at the four student timesteps 999 / 749 / 499 / 249 (zero-terminal SNR inputs), against
the projected discriminator on our pretrained mini ViT, plus the teacher's one-step distillation target."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...models.unet import UNet
from ..discriminator import AUGMENTATIONS, DiscriminatorConfig, ProjectedDiscriminator
from ..loop import (
    ADDBatch,
    ADDConfig,
    build_models,
    build_optimizers,
    load_checkpoint,
    save_checkpoint,
    train_step,
    unet_conditioning,
)
from ..schedule import (
    DEFAULT_STUDENT_TIMESTEPS,
    eps_to_x0,
    sample_student_timesteps,
    standard_schedule,
    zero_terminal_snr_schedule,
)
from .cache import ShapesCache
from .checkpoint import clipped_step, require_done
from .checkpoint import load_checkpoint as load_ckpt
from .checkpoint import save_checkpoint as save_ckpt
from .conditioning import FrozenParts, load_frozen_parts
from .config import IMAGE_SIZE_PX, MINI, MINI_VIT, StudentStage
from .teacher import load_teacher

MINI_DISCRIMINATOR = DiscriminatorConfig(
    feature_net=MINI_VIT,
    image_net=MINI_VIT,  # one network for features and c_img: DINOv2-L would be a second, larger one
    input_size_px=56,
    hook_blocks=(1, 3),
    hook_patch_embed=True,
    c_text_dim=MINI.text_encoder_2.projection_dim,
    cmap_dim=64,
    virtual_batch_size=8,
    crop_probability=0.5,
    augment=AUGMENTATIONS,
)


def build_discriminator(vit_state: dict, seed: int) -> ProjectedDiscriminator:
    torch.manual_seed(seed)
    disc = ProjectedDiscriminator(MINI_DISCRIMINATOR)
    for net in (disc.feature_net, disc.image_net):
        net.load_state_dict(vit_state["vit"])
    disc.feature_net.requires_grad_(False).eval()
    disc.image_net.requires_grad_(False).eval()
    return disc


def add_batch(parts: FrozenParts, image: torch.Tensor, captions: list[str]) -> ADDBatch:
    context, pooled = parts.encode_captions(captions)
    cond = unet_conditioning(context, pooled, IMAGE_SIZE_PX, MINI.unet)
    # The unconditional input is zeros, as in teacher training and at inference (force_zeros_for_empty_prompt).
    uncond = unet_conditioning(torch.zeros_like(context), torch.zeros_like(pooled), IMAGE_SIZE_PX, MINI.unet)
    return ADDBatch(image, cond, pooled, uncond)


def warm_start(workdir: Path, teacher: UNet, parts: FrozenParts, stage: StudentStage, cache: ShapesCache, log) -> UNet:
    """The teacher adapted to the student's task before ADD: x0 regression at the student timesteps on
    zero-terminal-SNR inputs, through the same eps -> x0 map as loop.student_forward.

    The mini teacher's one-step x0 = (z - sigma * eps) / alpha_999 amplifies its eps error 14.6 times, so a student
    copied from it starts from saturated noise, which ADD's small learning rate does not leave in a short run
    (SDXL's teacher starts from a blurry but sane image). Regression gives the blurry conditional mean
    E[x0 | z_s, text] first; ADD then sharpens it."""
    path = workdir / "student_warm.safetensors"
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    state = load_ckpt(path)
    opt = torch.optim.AdamW(student.parameters(), lr=stage.warm_lr, weight_decay=0.0)
    step = 0
    if state is not None:
        student.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    zero_snr, standard = zero_terminal_snr_schedule(), standard_schedule()
    generator = torch.Generator().manual_seed(stage.seed + 1000 + step)
    start = time.time()
    while step < stage.warm_steps:
        image, captions, _ = cache.batch(stage.warm_batch_size, generator)
        z0 = parts.encode_images(image, generator)
        context, pooled = parts.encode_captions(captions)
        cond = unet_conditioning(context, pooled, IMAGE_SIZE_PX, MINI.unet)
        s = sample_student_timesteps(DEFAULT_STUDENT_TIMESTEPS, len(captions), generator)
        z_s = zero_snr.add_noise(z0, torch.randn(z0.shape, generator=generator), s)
        with torch.autocast("cpu", torch.bfloat16):
            eps = student(z_s, s, cond.context, cond.y)
        x0 = eps_to_x0(z_s, eps.float(), standard.alpha(s), standard.sigma(s))
        loss = F.mse_loss(x0, z0)
        clipped_step(opt, loss, student.parameters())
        step += 1
        if step % stage.log_every == 0:
            log(f"student warm-start step {step}/{stage.warm_steps} x0 mse {loss.item():.4f} ({time.time() - start:.0f}s)")
        if step % stage.save_every == 0 or step == stage.warm_steps:
            save_ckpt(path, {"unet": student.state_dict(), "optimizer": opt.state_dict(), "step": step})
    return student.eval()


# The students of the paper's loss ablation (Table 1d): name -> (adversarial weight, distillation weight). All
# start from the same warm start and see the same batches; only the objective differs.
VARIANTS = {"add": (1.0, 2.5), "adv-only": (1.0, 0.0), "distill-only": (0.0, 2.5)}


def student_name(variant: str) -> str:
    """Checkpoint stem of a variant: student, student_adv_only, student_distill_only."""
    return "student" if variant == "add" else "student_" + variant.replace("-", "_")


def train_student(workdir: Path, stage: StudentStage, cache: ShapesCache, log, variant: str = "add") -> dict:
    name = student_name(variant)
    done_path = workdir / f"{name}.safetensors"
    if done_path.exists():
        return load_ckpt(done_path)
    parts = load_frozen_parts(workdir, final_decoder=True)
    adversarial_weight, distill_weight = VARIANTS[variant]
    cfg = ADDConfig(
        adversarial_weight=adversarial_weight,
        distill_weight=distill_weight,
        teacher_guidance_scale=stage.teacher_guidance_scale,
        lr_student=stage.lr_student,
        lr_discriminator=stage.lr_discriminator,
        ema_decay=stage.ema_decay,
        seed=stage.seed,
    )
    disc = build_discriminator(require_done(workdir / "vit.safetensors", "vit"), stage.seed)
    teacher = load_teacher(workdir)
    models = build_models(teacher, parts.vae, disc, cfg, student=warm_start(workdir, teacher, parts, stage, cache, log))
    optimizers = build_optimizers(models, cfg)
    ckpt_dir = workdir / name
    step = load_checkpoint(ckpt_dir, models, optimizers).step if (ckpt_dir / "state.json").exists() else 0
    generator = torch.Generator().manual_seed(stage.seed + step)
    start = time.time()
    while step < stage.steps:
        image, captions, _ = cache.batch(stage.batch_size, generator)
        with torch.autocast("cpu", torch.bfloat16):
            metrics = train_step(models, optimizers, add_batch(parts, image, captions), cfg, step)
        step += 1
        if step % stage.log_every == 0:
            summary = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            log(f"{name} step {step}/{stage.steps} {summary} ({time.time() - start:.0f}s)")
        if step % stage.save_every == 0 or step == stage.steps:
            save_checkpoint(ckpt_dir, models, optimizers, cfg, step)
    shipped = models.ema if models.ema is not None else models.student
    state = {"unet": shipped.state_dict(), "step": step, "done": True}
    save_ckpt(done_path, state)
    return state


def load_student(workdir: Path, variant: str = "add") -> UNet:
    stage = "student" if variant == "add" else variant.replace("-", "_")  # the stage that trains it
    state = require_done(workdir / f"{student_name(variant)}.safetensors", stage)
    unet = UNet(MINI.unet)
    unet.load_state_dict(state["unet"])
    return unet.eval()
