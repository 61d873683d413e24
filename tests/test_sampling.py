"""Schedules and the Euler-ancestral step: exact against diffusers' scheduler, and against the spec's tables."""

from __future__ import annotations

import pytest
import torch

from sdturbo import sampling


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
def test_trailing_schedule_is_bit_identical_to_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing", steps_offset=1
    )
    ref.set_timesteps(steps)
    s = sampling.make_schedule(steps, "trailing")
    assert torch.equal(s.timesteps, ref.timesteps)
    assert torch.equal(s.sigmas, ref.sigmas)
    assert torch.equal(s.init_sigma, torch.as_tensor(ref.init_noise_sigma))


@pytest.mark.parity
def test_euler_ancestral_step_is_bit_identical_to_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"
    )
    ref.set_timesteps(4)
    s = sampling.make_schedule(4)
    x = torch.randn(2, 4, 8, 8) * s.init_sigma
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn_like(x)
        assert torch.equal(x / sampling.input_divisor(s.sigmas[i]), ref.scale_model_input(x, t))
        expected = ref.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        ours = sampling.euler_ancestral_step(x, sampling.eps_to_denoised(x, eps, s.sigmas[i]), s.sigmas[i], s.sigmas[i + 1], noise)
        assert torch.equal(ours, expected)
        x = expected


@pytest.mark.parametrize(
    "steps,timesteps,sigma_up",
    [
        (1, [999], [0.0]),
        (2, [999, 499], [1.6030, 0.0]),
        (3, [999, 666, 332], [2.8595, 0.8809, 0.0]),
        (4, [999, 749, 499, 249], [3.9193, 1.4816, 0.6259, 0.0]),
    ],
)
def test_trailing_timesteps_and_sigma_up_match_the_spec_table(steps, timesteps, sigma_up):
    s = sampling.make_schedule(steps, "trailing")
    assert s.timesteps.tolist() == timesteps
    ups = [sampling.ancestral_sigmas(s.sigmas[i], s.sigmas[i + 1])[0].item() for i in range(steps)]
    assert ups == pytest.approx(sigma_up, abs=1e-4)
    assert s.init_sigma.item() == pytest.approx(14.6146, abs=1e-4)


def test_substep_schedule_matches_generative_models_demo():
    s = sampling.make_schedule(4, "substep")
    assert s.timesteps.tolist() == [999, 899, 799, 699]
    assert s.sigmas.tolist() == pytest.approx([14.614641, 8.302803, 5.087763, 3.321083, 0.0], abs=2e-6)
    assert s.init_sigma.item() == pytest.approx(14.648813, abs=1e-5)
    ups = [sampling.ancestral_sigmas(s.sigmas[i], s.sigmas[i + 1])[0].item() for i in range(4)]
    assert ups == pytest.approx([6.8328, 4.0206, 2.5159, 0.0], abs=1e-4)
    with pytest.raises(ValueError, match="1 to 4 steps"):
        sampling.make_schedule(5, "substep")


def test_one_step_is_the_closed_form():
    """With one step the sample is x0_hat = x_T - sigma * eps and the (still drawn) noise has no effect."""
    s = sampling.make_schedule(1)
    x = torch.randn(1, 4, 8, 8) * s.init_sigma
    eps = torch.randn_like(x)
    calls = []

    def denoiser(x_, sigma, t):
        assert t.item() == 999.0
        return sampling.eps_to_denoised(x_, eps, sigma)

    def noise(i):
        calls.append(i)
        return torch.randn_like(x) * 1e6

    out = sampling.euler_ancestral(denoiser, x, s, noise)
    assert calls == [0]
    assert torch.allclose(out, x - s.sigmas[0] * eps)


def test_sampler_recovers_a_known_x0_with_an_exact_denoiser():
    """A denoiser that knows x0 must land on x0 from any noise, at every step count: the sampler's algebra is right."""
    x0 = torch.randn(2, 4, 8, 8)
    for steps in (1, 2, 3, 4):
        s = sampling.make_schedule(steps)
        x = x0 + torch.randn_like(x0) * s.init_sigma
        out = sampling.euler_ancestral(lambda x_, sigma, t: x0, x, s, lambda i: torch.randn_like(x0))
        assert torch.allclose(out, x0, atol=1e-5)


def test_img2img_start_index():
    assert sampling.img2img_start_index(2, 0.5) == 1
    assert sampling.img2img_start_index(4, 0.75) == 1
    assert sampling.img2img_start_index(4, 1.0) == 0
    assert sampling.img2img_start_index(4, 0.7) == 2  # int(2.8) = 2 steps run


@pytest.mark.parametrize("steps", [0, 51])
def test_step_count_out_of_range(steps):
    with pytest.raises(ValueError, match="between 1 and 50"):
        sampling.make_schedule(steps)
