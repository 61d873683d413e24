"""The ADD objective as pure tensor -> tensor functions (spec-add §4, §6, §7).

Discriminator logits come as one tensor per head, [B, N] (one logit per token). Reductions, which the paper
leaves open (spec-add §4): hinge terms are averaged over batch and tokens and summed over heads (the Σ_k of the
paper's formulas); R1 differentiates each sample's token-summed logit; the distillation distance is the squared
error averaged over pixels (the λ = 2.5 balance against an O(1) hinge loss only makes sense for a mean)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

WEIGHTINGS = ("exponential", "sds", "nfsd")
# NFSD (Katzir et al. 2023, arXiv 2310.17590): below this timestep the unconditional prediction alone is taken as
# the domain direction; above it, the difference to a negative prompt removes the noise component.
NFSD_SWITCH_T = 200
NFSD_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)


def hinge_d_loss_real(logits_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_k E[max(0, 1 - D_k(real))]."""
    return sum(F.relu(1 - logits).mean() for logits in logits_real)


def hinge_d_loss_fake(logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_k E[max(0, 1 + D_k(fake))]."""
    return sum(F.relu(1 + logits).mean() for logits in logits_fake)


def hinge_d_loss(logits_real: Sequence[torch.Tensor], logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_D = Σ_k E[max(0, 1 - D_k(real))] + Σ_k E[max(0, 1 + D_k(fake))], without R1 (spec-add §4)."""
    return hinge_d_loss_real(logits_real) + hinge_d_loss_fake(logits_fake)


def hinge_g_loss(logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_G^adv = -Σ_k E[D_k(fake)] (spec-add §4)."""
    return -sum(logits.mean() for logits in logits_fake)


def r1_penalty(head_inputs_real: Sequence[torch.Tensor], logits_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """R1 = Σ_k E_b ||∂ D_k / ∂ f_k||², f_k = F_k(x0) the frozen features of REAL images fed to head k
    (spec-add §4, pitfall §13.3): not the parameters, not the pixels.

    head_inputs_real must be the very tensors the heads were applied to, marked requires_grad. The graph is kept
    (create_graph) so the penalty trains the heads. Multiply by γ = 1e-5 in the discriminator loss."""
    for f in head_inputs_real:
        if not f.requires_grad:
            raise ValueError("R1 needs the head inputs (real features) to require grad: call .requires_grad_() on them")
    grads = torch.autograd.grad(
        outputs=[logits.sum() for logits in logits_real], inputs=list(head_inputs_real), create_graph=True
    )
    return sum(g.square().flatten(1).sum(1).mean() for g in grads)


def distillation_weight(weighting: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c(t) from the teacher's alpha_t, sigma_t (spec-add §6).

    exponential: c = alpha_t (the paper's ablation default).
    sds / nfsd: c = alpha_t / (2 sigma_t) * w(t) with DreamFusion's w(t) = sigma_t² = 1 - abar_t, i.e.
      alpha_t * sigma_t / 2; with the L2 distance this makes the gradient w(t) * (eps_hat - eps) (appendix A).
      NFSD keeps this weight and changes the target (nfsd_target)."""
    if weighting == "exponential":
        return alpha
    if weighting in ("sds", "nfsd"):
        return alpha * sigma / 2
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_u + s * (eps_c - eps_u); scale 1 is the conditional prediction alone."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def teacher_target(z_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂_ψ = (z_t - sigma_t * eps_ψ) / alpha_t: one teacher step's x0 estimate (spec-add §6)."""
    return (z_t - sigma * eps) / alpha


def nfsd_direction(
    eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eps_negative: torch.Tensor, t: torch.Tensor, scale: float
) -> torch.Tensor:
    """Noise-free score direction δ_D + s δ_C (Katzir et al.): δ_C = eps(y) - eps(∅);
    δ_D = eps(∅) for t < 200, else eps(∅) - eps(negative prompt). t is [B]."""
    delta_c = eps_cond - eps_uncond
    is_late = (t >= NFSD_SWITCH_T).to(eps_uncond.dtype)[:, None, None, None]
    delta_d = eps_uncond - is_late * eps_negative
    return delta_d + scale * delta_c


def nfsd_target(
    x0_student: torch.Tensor, direction: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The target whose SDS-weighted L2 gradient is w(t) * direction instead of w(t) * (eps_hat - eps).

    Since the SDS target (z_t - sigma eps_hat) / alpha equals x̂_θ - (sigma / alpha)(eps_hat - eps'), NFSD swaps the
    noisy residual eps_hat - eps' for the noise-free direction. The paper gives no closed form (spec-add §12)."""
    return x0_student - sigma / alpha * direction


def distillation_loss(student: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E_b[c(t) * mean_pixels (x̂_θ - sg(x̂_ψ))²] (spec-add §6): the gradient flows through the student only.

    student, target: [B, C, H, W] (decoded images for latent models); weight: c(t), [B] or [B, 1, 1, 1]."""
    per_sample = (student - target.detach()).square().flatten(1).mean(1)
    return (weight.reshape(-1) * per_sample).mean()
