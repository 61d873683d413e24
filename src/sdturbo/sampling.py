"""Noise schedules and the Euler-ancestral sampler, as pure functions of (denoiser, x, sigmas).

Words as in k-diffusion: `x` is the latent in the variance-exploding form x0 + sigma * eps, `sigma` its noise
level, `denoised` the x0 estimate, `t` the integer training timestep the UNet is conditioned on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .limits import MAX_STEPS

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
SCHEDULES = ("trailing", "substep")
SUBSTEP_TIMESTEPS = (999, 899, 799, 699)  # generative-models scripts/demo/turbo.py: indices 0/100/200/300


def alphas_cumprod(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SD "scaled_linear" betas -> cumulative alpha products, [1000].

    diffusers computes this in float32 torch, generative-models in float64; each schedule uses its reference's
    precision so sigmas are bit-identical to it."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=dtype) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_table(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..999, returned as float32."""
    ac = alphas_cumprod(dtype)
    return (((1 - ac) / ac) ** 0.5).to(torch.float32)


@dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor  # [n] float32, descending
    sigmas: torch.Tensor  # [n + 1] float32, the last one 0
    init_sigma: torch.Tensor  # 0-d float32; multiplies unit noise to make x_T


def make_schedule(num_steps: int, schedule: str = "trailing") -> Schedule:
    """The timesteps, sigmas and initial noise scale of an n-step schedule.

    trailing: diffusers' EulerAncestralDiscreteScheduler with timestep_spacing="trailing" (the sdxl-turbo config):
      t_i = round(1000 - i * 1000 / n) - 1, x_T = sigma_max * n.
    substep: generative-models' turbo demo (SubstepSampler): t = 999, 899, 799, 699 (first n), sigmas from a float64
      cumulative product, x_T = sqrt(1 + sigma_max^2) * n."""
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be between 1 and {MAX_STEPS}, got {num_steps}")
    if schedule == "trailing":
        step_ratio = NUM_TRAIN_TIMESTEPS / num_steps
        timesteps = np.arange(NUM_TRAIN_TIMESTEPS, 0, -step_ratio).round().astype(np.float32) - 1
        table = sigma_table(torch.float32).numpy()
        sigmas = np.interp(timesteps, np.arange(NUM_TRAIN_TIMESTEPS), table)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        return Schedule(torch.from_numpy(timesteps), sigmas, sigmas.max())
    if schedule == "substep":
        if num_steps > len(SUBSTEP_TIMESTEPS):
            raise ValueError(f"schedule 'substep' supports 1 to {len(SUBSTEP_TIMESTEPS)} steps, got {num_steps}")
        timesteps = torch.tensor(SUBSTEP_TIMESTEPS[:num_steps], dtype=torch.float32)
        table = sigma_table(torch.float64)
        sigmas = torch.cat([table[timesteps.long()], torch.zeros(1)])
        return Schedule(timesteps, sigmas, torch.sqrt(1.0 + sigmas[0] ** 2.0))
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def img2img_start_index(num_steps: int, strength: float) -> int:
    """Index of the first schedule step an img2img run uses (diffusers get_timesteps)."""
    init_timestep = min(int(num_steps * strength), num_steps)
    return max(num_steps - init_timestep, 0)


def ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the move to sigma_next into a deterministic part (sigma_down) and fresh noise (sigma_up), eta = 1."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_up, sigma_down


def euler_ancestral_step(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One Euler-ancestral step in float32, in diffusers' op order (so fp32 results match it to the bit)."""
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    x = x.float()
    derivative = (x - denoised.float()) / sigma
    x = x + derivative * (sigma_down - sigma)
    return x + noise * sigma_up


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma, t) -> denoised
NoiseSource = Callable[[int], torch.Tensor]  # step index -> unit noise shaped like x


StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (i, t, x, denoised) -> x


def euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    noise: NoiseSource,
    start: int = 0,
    on_step: StepHook | None = None,
):
    """Sample from step `start` of the schedule to sigma = 0. x must already be at noise level sigmas[start].

    The noise source is called on every step, the last one too (where sigma_up = 0), because both references
    consume their random streams that way and later draws must line up. on_step sees each step's result and its x0
    estimate and returns the x to go on with (previews, diffusers-style step callbacks)."""
    sigmas = schedule.sigmas.to(x.device)
    timesteps = schedule.timesteps.to(x.device)
    for i in range(start, len(timesteps)):
        denoised = denoiser(x, sigmas[i], timesteps[i])
        x = euler_ancestral_step(x, denoised, sigmas[i], sigmas[i + 1], noise(i)).to(x.dtype)
        if on_step is not None:
            x = on_step(i, timesteps[i], x, denoised)
    return x


def eps_to_denoised(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 estimate of an eps-prediction model: x - sigma * eps, computed in float32."""
    return x.float() - sigma * eps.float()


def input_divisor(sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(sigma^2 + 1): the UNet sees x / this (c_in), the variance it was trained on. A division, as in diffusers."""
    return (sigma**2 + 1) ** 0.5
