"""Each ADD loss term against values computed by hand on tiny tensors (spec-add §4, §6)."""

import pytest
import torch

from sdturbo.train.add import (
    classifier_free_guidance,
    distillation_loss,
    distillation_weight,
    hinge_d_loss,
    hinge_d_loss_fake,
    hinge_d_loss_real,
    hinge_g_loss,
    nfsd_direction,
    nfsd_target,
    r1_penalty,
    teacher_target,
)
from sdturbo.train.schedule import standard_schedule


def test_hinge_d_loss_by_hand():
    real = [torch.tensor([[2.0, 0.5]]), torch.tensor([[-1.0, 0.0]])]
    fake = [torch.tensor([[-2.0, 0.5]]), torch.tensor([[0.0, -0.5]])]
    # real: head 0 mean(0, 0.5) = 0.25, head 1 mean(2, 1) = 1.5
    # fake: head 0 mean(0, 1.5) = 0.75, head 1 mean(1, 0.5) = 0.75
    assert hinge_d_loss_real(real).item() == pytest.approx(0.25 + 1.5)
    assert hinge_d_loss_fake(fake).item() == pytest.approx(0.75 + 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.25 + 1.5 + 0.75 + 0.75)


def test_hinge_g_loss_by_hand():
    fake = [torch.tensor([[-2.0, 0.5]]), torch.tensor([[0.0, -0.5]])]
    assert hinge_g_loss(fake).item() == pytest.approx(-(-0.75 + -0.25))


class SquareHead(torch.nn.Module):
    """D(f) = w * f² per token: dD/df = 2wf, dD/dw = f², so the three candidate R1s differ."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # [B, C, N] -> [B, N]
        return (self.w * f.square()).sum(1)


def test_r1_is_taken_with_respect_to_the_head_inputs():
    pixels = torch.tensor([[[1.0, 2.0]]], requires_grad=True)  # [B=1, C=1, N=2]
    heads = [SquareHead(0.5), SquareHead(1.0)]
    # The frozen "feature network" F(p) = 3p; R1 must see the features as its variables, cut from the pixels.
    features = [(3 * pixels).detach().requires_grad_() for _ in heads]
    logits = [head(f) for head, f in zip(heads, features)]
    r1 = r1_penalty(features, logits)
    # features f = (3, 6). Head 0: dD/df = 2 * 0.5 * f = (3, 6) -> 45. Head 1: dD/df = 2f = (6, 12) -> 180.
    assert r1.item() == pytest.approx(45 + 180)
    # What R1 must NOT be: w.r.t. the parameters, sum_k (sum f²)² = 45² + 45²; w.r.t. the pixels, 9x the above.
    assert r1.item() != pytest.approx(45**2 * 2)
    assert r1.item() != pytest.approx(9 * (45 + 180))


def test_r1_averages_over_the_batch_and_trains_the_heads():
    f = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]], requires_grad=True)  # B = 2
    head = SquareHead(1.0)
    r1 = r1_penalty([f], [head(f)])
    assert r1.item() == pytest.approx((4 * 1 + 4 * 9) / 2)  # (2f)² summed per sample, mean over the batch
    r1.backward()  # the graph was kept: R1 = 4 w² * (1 + 9) / 2 = 20 w², so dR1/dw = 40 w
    assert head.w.grad.item() == pytest.approx(40.0)


def test_r1_refuses_features_without_grad():
    head = SquareHead(1.0)
    with pytest.raises(ValueError, match="requires_grad|require grad"):
        f = torch.ones(1, 1, 2)
        r1_penalty([f], [head(f)])


def test_distillation_weights():
    alpha, sigma = torch.tensor(0.5), torch.tensor(0.8)
    assert distillation_weight("exponential", alpha, sigma).item() == pytest.approx(0.5)
    assert distillation_weight("sds", alpha, sigma).item() == pytest.approx(0.5 * 0.8 / 2)
    assert distillation_weight("nfsd", alpha, sigma).item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="exponential"):
        distillation_weight("uniform", alpha, sigma)


def test_exponential_weight_on_the_sd_schedule():
    schedule = standard_schedule()
    t = torch.tensor([0, 249, 499, 749, 999])
    c = distillation_weight("exponential", schedule.alpha(t), schedule.sigma(t)).flatten()
    assert c.tolist() == pytest.approx([0.9996, 0.822, 0.527, 0.238, 0.068], abs=1e-3)  # spec-add §6


def test_distillation_loss_by_hand():
    student = torch.tensor([1.0, 2.0, 0.0, 0.0]).reshape(2, 1, 1, 2).requires_grad_()
    target = torch.tensor([0.0, 0.0, 1.0, 3.0]).reshape(2, 1, 1, 2).requires_grad_()
    weight = torch.tensor([0.5, 0.2])
    loss = distillation_loss(student, target, weight)
    # per-sample mean squared error: 2.5 and 5.0; weighted mean: (0.5 * 2.5 + 0.2 * 5.0) / 2
    assert loss.item() == pytest.approx(1.125)
    loss.backward()
    assert target.grad is None  # stop-gradient on the teacher side


def test_distillation_gradient_flows_only_to_the_student():
    student = torch.tensor([1.0, 2.0, 0.0, 0.0]).reshape(2, 1, 1, 2).requires_grad_()
    target = torch.tensor([0.0, 0.0, 1.0, 3.0]).reshape(2, 1, 1, 2)
    distillation_loss(student, target, torch.tensor([0.5, 0.2])).backward()
    # d/dx of c * mean_2((x - y)²) / B = c * (x - y) / 2
    assert student.grad.flatten().tolist() == pytest.approx([0.25, 0.5, -0.1, -0.3])


def test_teacher_target_by_hand():
    z_t, eps, alpha, sigma = torch.tensor([1.0, 0.5, 0.5, 0.8])
    assert teacher_target(z_t, eps, alpha, sigma).item() == pytest.approx((1 - 0.8 * 0.5) / 0.5)


def test_a_teacher_that_predicts_the_true_noise_gives_zero_distillation_loss():
    schedule = standard_schedule()
    x0 = torch.randn(2, 4, 3, 3)
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 900])
    z_t = schedule.add_noise(x0, noise, t)
    target = teacher_target(z_t, noise, schedule.alpha(t), schedule.sigma(t))
    torch.testing.assert_close(target, x0, atol=1e-5, rtol=0)


def test_sds_weighting_gives_the_sds_gradient():
    """Appendix A: with c = alpha / (2 sigma) * w and the L2 distance, the gradient is w(t) (eps_hat - eps)."""
    schedule = standard_schedule()
    x0 = torch.randn(1, 4, 2, 2, requires_grad=True)
    noise, eps_hat = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    t = torch.tensor([600])
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    z_t = schedule.add_noise(x0.detach(), noise, t)
    loss = distillation_loss(x0, teacher_target(z_t, eps_hat, alpha, sigma), distillation_weight("sds", alpha, sigma))
    loss.backward()
    n = x0.numel()  # the loss averages over elements
    torch.testing.assert_close(x0.grad * n, sigma**2 * (eps_hat - noise), atol=1e-5, rtol=1e-4)


def test_classifier_free_guidance_by_hand():
    assert classifier_free_guidance(torch.tensor(1.0), torch.tensor(2.0), 3.0).item() == pytest.approx(4.0)
    assert classifier_free_guidance(torch.tensor(1.0), torch.tensor(2.0), 1.0).item() == pytest.approx(2.0)


def test_nfsd_direction_by_hand():
    ones = torch.ones(2, 1, 1, 1)
    direction = nfsd_direction(1.0 * ones, 0.5 * ones, 0.2 * ones, torch.tensor([100, 300]), 7.5)
    # delta_C = 0.5; t = 100: delta_D = 0.5 -> 0.5 + 3.75; t = 300: delta_D = 0.5 - 0.2 -> 0.3 + 3.75
    assert direction.flatten().tolist() == pytest.approx([4.25, 4.05])


def test_nfsd_target_with_the_noisy_residual_is_the_sds_target():
    schedule = standard_schedule()
    x0, noise, eps_hat = torch.randn(3, 2, 1, 4, 4).unbind(0)
    t = torch.tensor([400])
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    z_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(
        nfsd_target(x0, eps_hat - noise, alpha, sigma), teacher_target(z_t, eps_hat, alpha, sigma), atol=1e-5, rtol=1e-5
    )
