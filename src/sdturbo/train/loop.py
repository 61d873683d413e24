"""One ADD training iteration (spec-add §8) and its checkpoints.

train_step = student forward -> d_step (discriminator update) -> g_step (student update) -> EMA.

Every random draw of step k on rank r comes from a generator seeded by (seed, k, r), so a run resumed from a
checkpoint replays exactly the steps it would have taken. Data parallelism is one call per update
(parallel.average_gradients), a no-op in a single process. Mixed precision is the caller's torch.autocast around
train_step; FSDP-sharded students (parallel.apply_fsdp) are gathered into whole tensors by the checkpoints."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor

from ..loading.single_file import save_tensors
from ..models.configs import UNetConfig
from ..models.unet import UNet, make_y
from ..models.vae import AutoencoderKL, sample_latent
from .add import (
    classifier_free_guidance,
    distillation_loss,
    distillation_weight,
    hinge_d_loss_fake,
    hinge_d_loss_real,
    hinge_g_loss,
    nfsd_direction,
    nfsd_target,
    r1_penalty,
    teacher_target,
)
from .discriminator import ProjectedDiscriminator
from .parallel import average_gradients, rank_and_world
from .schedule import (
    DEFAULT_STUDENT_TIMESTEPS,
    eps_to_x0,
    sample_student_timesteps,
    sample_teacher_timesteps,
    standard_schedule,
    zero_terminal_snr_schedule,
)


@dataclass
class ADDConfig:
    """Hyper-parameters of ADD training. Defaults: the paper where it states a value, else spec-add §12."""

    student_timesteps: tuple[int, ...] = DEFAULT_STUDENT_TIMESTEPS
    """Student timesteps s ~ Uniform(this set); must contain 999, the pure-noise input (spec-add §3)."""
    teacher_t_min: int = 1
    """Lowest teacher timestep of the distillation re-noising, t ~ Uniform{min..max} (not stated in the paper)."""
    teacher_t_max: int = 999
    """Highest teacher timestep of the distillation re-noising."""
    weighting: str = "exponential"
    """Distillation weighting c(t): "exponential" (alpha_t, the ablation default), "sds" or "nfsd" (final model)."""
    distill_weight: float = 2.5
    """lambda, the weight of the distillation loss against the adversarial loss (paper: 2.5). 0 trains with the
    adversarial loss alone (the paper's "adv. only" ablation) and skips the teacher."""
    adversarial_weight: float = 1.0
    """Weight of the student's adversarial loss (paper: 1). 0 trains with the distillation loss alone (the paper's
    "distill. only" ablation) and skips the discriminator and its update."""
    r1_gamma: float = 1e-5
    """gamma, the weight of the R1 penalty on the discriminator heads' real inputs (paper: 1e-5)."""
    teacher_guidance_scale: float = 1.0
    """Classifier-free guidance of the teacher; 1 = none. Above 1 each batch needs `uncond`. NFSD uses it as its s."""
    lr_student: float = 1e-5
    """AdamW learning rate of the student."""
    lr_discriminator: float = 1e-4
    """AdamW learning rate of the discriminator heads."""
    betas_student: tuple[float, float] = (0.9, 0.999)
    """AdamW betas of the student."""
    betas_discriminator: tuple[float, float] = (0.0, 0.99)
    """AdamW betas of the discriminator: beta1 = 0 as in StyleGAN-T (spec-add §13.1)."""
    weight_decay: float = 0.01
    """AdamW weight decay of both optimizers."""
    grad_clip: float = 1.0
    """Max gradient norm of each update; 0 disables clipping."""
    ema_decay: float = 0.999
    """Decay of the student's exponential moving average; 0 disables the EMA copy."""
    seed: int = 0
    """Seeds every random draw, together with the step and the rank."""

    def __post_init__(self):
        if 999 not in self.student_timesteps:
            raise ValueError(f"student_timesteps {self.student_timesteps} must include 999 (spec-add §3)")
        if not 1 <= self.teacher_t_min <= self.teacher_t_max <= 999:
            raise ValueError(
                f"need 1 <= teacher_t_min {self.teacher_t_min} <= teacher_t_max {self.teacher_t_max} <= 999"
            )
        distillation_weight(self.weighting, torch.ones(()), torch.ones(()))  # rejects unknown names
        for name in ("lr_student", "lr_discriminator"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} (--add.{name.replace('_', '-')}) must be above 0, got {getattr(self, name)}")
        for name in ("r1_gamma", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} (--add.{name.replace('_', '-')}) must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay (--add.ema-decay) must be in [0, 1), got {self.ema_decay}")
        if self.distill_weight < 0 or self.adversarial_weight < 0 or self.distill_weight + self.adversarial_weight == 0:
            raise ValueError(
                f"distill_weight {self.distill_weight} and adversarial_weight {self.adversarial_weight} must be >= 0"
                " and not both 0"
            )


@dataclass
class Conditioning:
    context: torch.Tensor  # [B, 77, context_dim]
    y: torch.Tensor  # [B, adm_in_channels]

    def cat(self, *others: Conditioning) -> Conditioning:
        parts = (self, *others)
        return Conditioning(torch.cat([p.context for p in parts]), torch.cat([p.y for p in parts]))


@dataclass
class ADDBatch:
    image: torch.Tensor  # [B, 3, H, W] real images in [-1, 1]
    cond: Conditioning  # the captions'
    c_text: torch.Tensor  # [B, c_text_dim] the discriminator's text condition (pooled text embedding)
    uncond: Conditioning | None = None  # empty prompt: needed for teacher CFG and NFSD
    negative: Conditioning | None = None  # NFSD's negative prompt (add.NFSD_NEGATIVE_PROMPT)


def unet_conditioning(context: torch.Tensor, pooled: torch.Tensor, size_px: int, cfg: UNetConfig) -> Conditioning:
    """Text encoder outputs -> the UNet's context and y, with uncropped size conditions (size_px, size_px)."""
    time_ids = torch.tensor([[size_px, size_px, 0, 0, size_px, size_px]], dtype=pooled.dtype, device=pooled.device)
    return Conditioning(context, make_y(pooled, time_ids.expand(pooled.shape[0], -1), cfg))


@dataclass
class ADDModels:
    student: UNet  # trained
    teacher: UNet  # frozen
    vae: AutoencoderKL  # frozen; decodes the student's output with gradient
    discriminator: ProjectedDiscriminator  # frozen ViTs, trained heads
    ema: UNet | None  # moving average of the student, the weights to ship


def build_models(
    teacher: UNet, vae: AutoencoderKL, discriminator: ProjectedDiscriminator, cfg: ADDConfig,
    student: UNet | None = None,
) -> ADDModels:
    """The student starts as a copy of the teacher, or as the pretrained `student` given (the two may differ,
    spec-add Table 1e): random initialisation collapses (spec-add §9, Table 1c)."""
    teacher.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    student = copy.deepcopy(teacher if student is None else student).train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    return ADDModels(student, teacher, vae, discriminator.train(), ema)


@dataclass
class Optimizers:
    student: torch.optim.AdamW
    discriminator: torch.optim.AdamW


def build_optimizers(models: ADDModels, cfg: ADDConfig) -> Optimizers:
    return Optimizers(
        torch.optim.AdamW(
            models.student.parameters(), lr=cfg.lr_student, betas=cfg.betas_student, weight_decay=cfg.weight_decay
        ),
        torch.optim.AdamW(
            models.discriminator.heads.parameters(),
            lr=cfg.lr_discriminator,
            betas=cfg.betas_discriminator,
            weight_decay=cfg.weight_decay,
        ),
    )


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one step on one rank: independent streams for every (seed, step, rank)."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator).to(x)


def _update(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float):
    optimizer.zero_grad(set_to_none=True)
    # Autocast is for forwards only: backward ops already run in the dtypes their forwards chose.
    with torch.autocast(loss.device.type, enabled=False):
        loss.backward()
    average_gradients(params)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def _fp32(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Losses are reduced in fp32: under bf16 autocast the heads' logits come out in bf16, whose 8-bit mantissa
    would round a hinge loss near 3 to steps of 1/64."""
    return [x.float() for x in logits]


@dataclass
class StudentOutput:
    latent: torch.Tensor  # x̂_θ in the scaled latent space, with graph
    image: torch.Tensor  # its VAE decoding in [-1, 1], with graph


def student_forward(models: ADDModels, batch: ADDBatch, cfg: ADDConfig, generator: torch.Generator) -> StudentOutput:
    """Steps 1-3 of spec-add §8: encode the real image, forward-diffuse it to a student timestep on the
    zero-terminal-SNR schedule, predict x0, decode with gradient.

    The student's eps -> x0 conversion uses the standard schedule's alpha_s, sigma_s, which is what the inference
    sampler applies to the same network (alpha_999 = 0.068, never 0): the student learns the map it is used with,
    and its t = 999 input, pure noise, matches inference, which starts from noise alone."""
    vae = models.vae
    scale = vae.cfg.scaling_factor
    with torch.no_grad():
        mean, logvar = vae.encode(batch.image)
        z0 = sample_latent(mean, logvar, _randn_like(mean, generator)) * scale
    s = sample_student_timesteps(cfg.student_timesteps, z0.shape[0], generator, z0.device)
    z_s = zero_terminal_snr_schedule().add_noise(z0, _randn_like(z0, generator), s)
    eps = models.student(z_s, s, batch.cond.context, batch.cond.y)
    standard = standard_schedule()
    latent = eps_to_x0(z_s, eps, standard.alpha(s), standard.sigma(s))
    return StudentOutput(latent, vae.decode(latent / scale))


def d_step(
    models: ADDModels, optimizer: torch.optim.Optimizer, batch: ADDBatch, fake_image: torch.Tensor,
    c_img: torch.Tensor, cfg: ADDConfig, generator: torch.Generator,
) -> dict[str, float]:
    """Discriminator update (spec-add §8 step 5): hinge on real and detached fake images, plus gamma * R1 taken
    with respect to the heads' inputs on real images (spec-add §4, §13.3)."""
    disc = models.discriminator
    with torch.no_grad():
        real_features = disc.features(batch.image, generator)
    real_features = [f.requires_grad_() for f in real_features]
    logits_real = _fp32(disc.heads_logits(real_features, batch.c_text, c_img))
    logits_fake = _fp32(disc(fake_image.detach(), batch.c_text, c_img, generator)[0])
    loss_real, loss_fake = hinge_d_loss_real(logits_real), hinge_d_loss_fake(logits_fake)
    r1 = r1_penalty(real_features, logits_real)
    loss = loss_real + loss_fake + cfg.r1_gamma * r1
    _update(loss, list(disc.heads.parameters()), optimizer, cfg.grad_clip)
    return {"d_loss": loss.item(), "d_real": loss_real.item(), "d_fake": loss_fake.item(), "r1": r1.item()}


def teacher_latent_target(
    models: ADDModels, batch: ADDBatch, student_latent: torch.Tensor, cfg: ADDConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-noise sg(x̂_θ) with the teacher's forward process at t, take one teacher step (spec-add §6):
    -> (target latent, c(t) [B, 1, 1, 1]), no gradient."""
    standard = standard_schedule()
    x0 = student_latent.detach()
    t = sample_teacher_timesteps(cfg.teacher_t_min, cfg.teacher_t_max, x0.shape[0], generator, x0.device)
    alpha, sigma = standard.alpha(t), standard.sigma(t)
    z_t = standard.add_noise(x0, _randn_like(x0, generator), t)
    weight = distillation_weight(cfg.weighting, alpha, sigma)
    teacher = models.teacher
    with torch.no_grad():
        if cfg.weighting == "nfsd":
            if batch.uncond is None or batch.negative is None:
                raise ValueError("NFSD needs batch.uncond and batch.negative conditioning")
            cond = batch.cond.cat(batch.uncond, batch.negative)
            eps = teacher(z_t.repeat(3, 1, 1, 1), t.repeat(3), cond.context, cond.y)
            eps_cond, eps_uncond, eps_negative = eps.chunk(3)
            direction = nfsd_direction(eps_cond, eps_uncond, eps_negative, t, cfg.teacher_guidance_scale)
            return nfsd_target(x0, direction, alpha, sigma), weight
        if cfg.teacher_guidance_scale != 1.0:
            if batch.uncond is None:
                raise ValueError("teacher guidance needs batch.uncond conditioning")
            cond = batch.uncond.cat(batch.cond)
            eps_uncond, eps_cond = teacher(z_t.repeat(2, 1, 1, 1), t.repeat(2), cond.context, cond.y).chunk(2)
            eps = classifier_free_guidance(eps_uncond, eps_cond, cfg.teacher_guidance_scale)
        else:
            eps = teacher(z_t, t, batch.cond.context, batch.cond.y)
        return teacher_target(z_t, eps, alpha, sigma), weight


def g_step(
    models: ADDModels, optimizer: torch.optim.Optimizer, batch: ADDBatch, student: StudentOutput,
    c_img: torch.Tensor | None, cfg: ADDConfig, generator: torch.Generator,
) -> dict[str, float]:
    """Student update (spec-add §8 step 6): L = w_adv * L_adv^G + lambda * L_distill, both on decoded pixels. A term
    whose weight is 0 is not computed (the ablations), so it costs nothing and is logged as 0."""
    loss_adv = loss_distill = torch.zeros((), device=student.image.device)
    if cfg.adversarial_weight > 0:
        disc = models.discriminator
        disc.heads.requires_grad_(False)  # gradient flows through the heads to the image, not into them
        logits_fake = _fp32(disc(student.image, batch.c_text, c_img, generator)[0])
        disc.heads.requires_grad_(True)
        loss_adv = hinge_g_loss(logits_fake)
    if cfg.distill_weight > 0:
        target_latent, weight = teacher_latent_target(models, batch, student.latent, cfg, generator)
        with torch.no_grad():
            target_image = models.vae.decode(target_latent / models.vae.cfg.scaling_factor)
        loss_distill = distillation_loss(student.image.float(), target_image.float(), weight)
    loss = cfg.adversarial_weight * loss_adv + cfg.distill_weight * loss_distill
    _update(loss, list(models.student.parameters()), optimizer, cfg.grad_clip)
    return {"g_loss": loss.item(), "g_adv": loss_adv.item(), "g_distill": loss_distill.item()}


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1 - decay)


def train_step(
    models: ADDModels, optimizers: Optimizers, batch: ADDBatch, cfg: ADDConfig, step: int
) -> dict[str, float]:
    """One ADD iteration on this rank's batch; returns this rank's losses."""
    rank, _ = rank_and_world()
    generator = step_generator(cfg.seed, step, rank)
    student = student_forward(models, batch, cfg, generator)
    metrics, c_img = {}, None
    if cfg.adversarial_weight > 0:
        c_img = models.discriminator.image_condition(batch.image)
        metrics = d_step(models, optimizers.discriminator, batch, student.image, c_img, cfg, generator)
    metrics |= g_step(models, optimizers.student, batch, student, c_img, cfg, generator)
    if models.ema is not None:
        ema_update(models.ema, models.student, cfg.ema_decay)
    return metrics


# -- checkpoints: safetensors for tensors, JSON for the rest; no pickle ------------------------------------------


def rank0_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors on rank 0's CPU, nothing elsewhere. FSDP shards (DTensor) are all-gathered one at a time, a
    collective every rank joins; only rank 0 keeps a host copy, so 8 ranks do not hold 8 copies of a big model."""
    rank, _ = rank_and_world()
    out = {}
    for name, value in tensors.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if rank == 0:
            out[name] = value.detach().cpu().contiguous()
    return out


def rank0_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return rank0_tensors(module.state_dict())


def _like(value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """A whole tensor read from a file, placed like `current`: this rank's shard of an FSDP parameter."""
    if isinstance(current, DTensor):
        return distribute_tensor(value.to(current.device, current.dtype), current.device_mesh, current.placements)
    return value


def _load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = module.state_dict()
    module.load_state_dict({name: _like(value, current[name]) for name, value in state.items()})


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state -> ({"<param index>.<name>": tensor}, param_groups as JSON-able dicts); tensors as
    rank0_tensors gives them."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value if torch.is_tensor(value) else torch.tensor(value)
        for index, per_param in state["state"].items()
        for name, value in per_param.items()
    }
    return rank0_tensors(tensors), state["param_groups"]


def optimizer_state(
    tensors: dict[str, torch.Tensor], param_groups: list[dict], optimizer: torch.optim.Optimizer | None = None
) -> dict:
    """The inverse of optimizer_tensors; given the optimizer, moment tensors of FSDP parameters become shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        param = params[int(index)] if params else None
        if isinstance(param, DTensor) and value.shape == param.shape:
            value = _like(value, param)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


@dataclass
class Checkpoint:
    step: int  # the next step to run
    config: dict  # the ADDConfig it was saved with, as a dict
    run: dict  # the caller's settings saved with it (save_checkpoint's `run`); {} if none
    ema_from_student: bool  # the checkpoint has no EMA (saved with ema_decay 0): it starts from the student


def save_checkpoint(
    path: str | Path, models: ADDModels, optimizers: Optimizers, cfg: ADDConfig, step: int, run: dict | None = None
) -> None:
    """Write the trained state after `step` steps into a folder (the frozen teacher, VAE and ViTs are inputs). `run`:
    JSON-able settings of the caller to keep beside the ADD settings in state.json.

    Rank 0 writes. Replicated models are identical on every rank, so calling this on rank 0 alone is enough; an
    FSDP-sharded student is gathered collectively, so then every rank must call it."""
    is_writer = rank_and_world()[0] == 0
    path = Path(path)
    if is_writer:
        path.mkdir(parents=True, exist_ok=True)
    modules = {"student": models.student, "student_ema": models.ema, "discriminator_heads": models.discriminator.heads}
    for name, module in modules.items():
        if module is not None:
            tensors = rank0_state_dict(module)
            if is_writer:
                save_tensors(tensors, path / f"{name}.safetensors")
    groups = {}
    for name in ("student", "discriminator"):
        tensors, groups[name] = optimizer_tensors(getattr(optimizers, name))
        if is_writer:
            save_tensors(tensors, path / f"optimizer_{name}.safetensors")
    if is_writer:
        state = {"step": step, "config": asdict(cfg), "param_groups": groups, "run": run or {}}
        (path / "state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(path: str | Path, models: ADDModels, optimizers: Optimizers) -> Checkpoint:
    """Restore what save_checkpoint wrote into already-built models and optimizers; returns the step to run next.
    Every rank reads the files, then keeps its shard of FSDP-sharded tensors."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    # A run saved without EMA (ema_decay 0) and resumed with it: the average starts from the saved student.
    ema_from_student = models.ema is not None and not (path / "student_ema.safetensors").exists()
    for module, name in ((models.student, "student"), (models.ema, "student" if ema_from_student else "student_ema")):
        if module is not None:
            _load_full_state_dict(module, load_file(str(path / f"{name}.safetensors")))
    models.discriminator.heads.load_state_dict(load_file(str(path / "discriminator_heads.safetensors")))
    for name in ("student", "discriminator"):
        optimizer = getattr(optimizers, name)
        tensors = load_file(str(path / f"optimizer_{name}.safetensors"))
        optimizer.load_state_dict(optimizer_state(tensors, state["param_groups"][name], optimizer))
    return Checkpoint(state["step"], state["config"], state.get("run", {}), ema_from_student)
