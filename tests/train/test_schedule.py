"""Training schedules: zero terminal SNR for the student's inputs, the standard SD schedule for the teacher."""

import torch

from sdturbo.sampling import sigma_table
from sdturbo.train.schedule import (
    DEFAULT_STUDENT_TIMESTEPS,
    eps_to_x0,
    rescale_zero_terminal_snr,
    sample_student_timesteps,
    sample_teacher_timesteps,
    standard_schedule,
    zero_terminal_snr_schedule,
)

T = torch.arange(1000)


def test_zero_terminal_snr_has_alpha_zero_at_999():
    zt = zero_terminal_snr_schedule()
    assert zt.alpha(torch.tensor([999])).item() == 0.0
    assert zt.sigma(torch.tensor([999])).item() == 1.0
    x0, noise = torch.randn(2, 1, 4, 4, 4).unbind(0)
    assert torch.equal(zt.add_noise(x0, noise, torch.tensor([999])), noise)  # the student's t = 999 input is pure noise


def test_rescale_keeps_the_first_step_and_the_order():
    standard, zt = standard_schedule(), zero_terminal_snr_schedule()
    assert zt.alpha(torch.tensor([0])).item() == standard.alpha(torch.tensor([0])).item()
    alphas = zt.alpha(T).flatten()
    assert (alphas[1:] < alphas[:-1]).all()
    assert (alphas <= standard.alpha(T).flatten() + 1e-7).all()  # the rescale only removes signal


def test_rescale_formula_on_a_short_schedule():
    abar = torch.tensor([0.81, 0.25, 0.01], dtype=torch.float64)  # sqrt: 0.9, 0.5, 0.1
    # (sqrt - 0.1) * 0.9 / 0.8 -> 0.9, 0.45, 0
    torch.testing.assert_close(rescale_zero_terminal_snr(abar), torch.tensor([0.81, 0.2025, 0.0], dtype=torch.float64))


def test_standard_schedule_matches_the_sampler():
    standard = standard_schedule()
    sigma_ve = standard.sigma(T) / standard.alpha(T)
    torch.testing.assert_close(sigma_ve.flatten(), sigma_table(), rtol=1e-5, atol=0)
    assert standard.alpha(torch.tensor([999])).item() > 0.06  # the teacher never sees SNR 0


def test_eps_to_x0_inverts_add_noise():
    standard = standard_schedule()
    x0, noise = torch.randn(2, 3, 4, 2, 2).unbind(0)
    t = torch.tensor([0, 500, 999])
    x_t = standard.add_noise(x0, noise, t)
    torch.testing.assert_close(eps_to_x0(x_t, noise, standard.alpha(t), standard.sigma(t)), x0, atol=1e-4, rtol=0)


def test_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    s = sample_student_timesteps(DEFAULT_STUDENT_TIMESTEPS, 400, g)
    assert set(s.tolist()) == {999, 749, 499, 249}
    t = sample_teacher_timesteps(1, 999, 4000, g)
    assert t.min() >= 1 and t.max() <= 999 and len(set(t.tolist())) > 900
