"""Noise schedules for ADD training: the teacher's standard SD schedule and the zero-terminal-SNR rescale that
forward-diffuses the student's inputs (spec-add §3).

Variance-preserving form throughout: x_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t); `t` is an integer timestep 0..999."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import alphas_cumprod

DEFAULT_STUDENT_TIMESTEPS = (999, 749, 499, 249)


def rescale_zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so the last timestep has zero signal and the first keeps its value
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    root = abar.sqrt()
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return root**2


@dataclass(frozen=True)
class NoiseSchedule:
    abar: torch.Tensor  # [1000] cumulative alpha products, float32

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] integer -> alpha_t [B, 1, 1, 1] on t's device."""
        return self.abar.to(t.device)[t].sqrt()[:, None, None, None]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.abar.to(t.device)[t]).sqrt()[:, None, None, None]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.alpha(t) * x0 + self.sigma(t) * noise


def standard_schedule() -> NoiseSchedule:
    """SD's scaled-linear schedule (beta 0.00085 -> 0.012): the teacher's forward process, and the one the released
    SDXL-Turbo is sampled with (alpha_999 = 0.068)."""
    return NoiseSchedule(alphas_cumprod(torch.float32))


def zero_terminal_snr_schedule() -> NoiseSchedule:
    """The standard schedule rescaled to alpha_999 = 0: the student's input at t = 999 is pure noise, exactly as at
    inference, where sampling starts from noise alone (spec-add §3)."""
    return NoiseSchedule(rescale_zero_terminal_snr(alphas_cumprod(torch.float64)).float())


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 estimate of an eps-prediction model: (x_t - sigma * eps) / alpha."""
    return (x_t - sigma * eps) / alpha


def sample_student_timesteps(
    timesteps: tuple[int, ...], batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """s ~ Uniform(T_student), one per sample: [B] long."""
    choice = torch.randint(len(timesteps), (batch_size,), generator=generator)
    return torch.tensor(timesteps)[choice].to(device)


def sample_teacher_timesteps(
    t_min: int, t_max: int, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """t ~ Uniform{t_min..t_max} for the distillation re-noising (not stated in the paper; spec-add §12)."""
    return torch.randint(t_min, t_max + 1, (batch_size,), generator=generator).to(device)
