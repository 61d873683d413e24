"""Projected discriminator: DiffAugment, heads, conditioning, gradient paths, and R1 through the real module."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdturbo.train.add import r1_penalty
from sdturbo.train.discriminator import (
    DISCRIMINATOR_SDXL,
    DISCRIMINATOR_TINY,
    BatchNormLocal,
    DiscriminatorHead,
    ProjectedDiscriminator,
    augment_color,
    augment_cutout,
    augment_translation,
    diff_augment,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def disc() -> ProjectedDiscriminator:
    torch.manual_seed(0)
    return ProjectedDiscriminator(DISCRIMINATOR_TINY)


def conditions(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(5)
    return torch.randn(batch, DISCRIMINATOR_TINY.c_text_dim, generator=g), torch.randn(batch, 64, generator=g)


def test_translation_shifts_and_fills_with_zeros():
    x = torch.randn(3, 2, 16, 16)
    out = augment_translation(x, gen(1))
    replay = gen(1)  # the same draws: dy then dx per sample, up to 16 / 8 = 2 pixels
    dy = torch.randint(-2, 3, (3, 1), generator=replay).flatten().tolist()
    dx = torch.randint(-2, 3, (3, 1), generator=replay).flatten().tolist()
    for i in range(3):
        padded = F.pad(x[i], (2, 2, 2, 2))  # out[y, x] = in[y + dy, x + dx], zero outside
        expected = padded[:, 2 + dy[i] : 2 + dy[i] + 16, 2 + dx[i] : 2 + dx[i] + 16]
        torch.testing.assert_close(out[i], expected)


def test_cutout_zeroes_one_rectangle_of_at_most_half_the_side():
    x = torch.rand(8, 3, 16, 16) + 1  # strictly positive, so zeros come only from the cutout
    out = augment_cutout(x, gen(2))
    for i in range(8):
        zero = out[i, 0] == 0
        assert (out[i, :, ~zero] == x[i, :, ~zero]).all()
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 8 and 0 < len(cols) <= 8
        assert zero.sum() == len(rows) * len(cols)  # a full rectangle
        assert (out[i, :, zero] == 0).all()


def test_augmentations_are_differentiable_and_seeded():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    out = diff_augment(x, ("color", "translation", "cutout"), gen(3))
    assert out.shape == x.shape
    torch.testing.assert_close(out, diff_augment(x, ("color", "translation", "cutout"), gen(3)))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_color_is_a_per_sample_affine_map():
    x = torch.randn(2, 3, 4, 4)
    out = augment_color(x, gen(4))
    assert not torch.allclose(out, x)
    # each sample: brightness shift, then scaling about means -> equal inputs give equal outputs within a sample
    same = torch.zeros(2, 3, 4, 4)
    assert augment_color(same, gen(4)).flatten(1).std(1).max() < 1e-6


def test_batch_norm_local_normalises_each_group():
    norm = BatchNormLocal(channels=3, virtual_batch_size=4)
    x = torch.randn(10, 3, 5) * 3 + 2  # groups of 4, 4, 2 samples
    out = norm(x)
    for group in out.split(4):
        torch.testing.assert_close(group.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(group.var(dim=(0, 2), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


def test_head_is_a_projection_onto_the_condition():
    torch.manual_seed(0)
    head = DiscriminatorHead(channels=8, c_dim=5, cmap_dim=4, virtual_batch_size=8)
    features, c = torch.randn(2, 8, 16), torch.randn(2, 5)
    logits = head(features, c)
    assert logits.shape == (2, 16)
    embedding = head.cls(head.main(features))  # [B, cmap, N]
    torch.testing.assert_close(logits, torch.einsum("bcn,bc->bn", embedding, head.cmapper(c)) / math.sqrt(4))
    with torch.no_grad():
        head.cmapper.weight.zero_()
        head.cmapper.bias.zero_()
    assert head(features, c).abs().max() == 0


def test_head_weights_are_spectrally_normalised():
    torch.manual_seed(0)
    head = DiscriminatorHead(channels=8, c_dim=5, cmap_dim=4, virtual_batch_size=8).train()
    features, c = torch.randn(4, 8, 16), torch.randn(4, 5)
    for _ in range(30):  # power iteration converges over forward passes
        head(features, c)
    weight = head.cls.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, abs=1e-3)


def test_sdxl_config_follows_stylegan_t():
    cfg = DISCRIMINATOR_SDXL
    assert cfg.num_heads == 5 and cfg.hook_blocks == (2, 5, 8, 11) and cfg.cmap_dim == 64
    assert cfg.feature_net.hidden_size == 384 and cfg.image_net.hidden_size == 1024
    with torch.device("meta"):
        disc = ProjectedDiscriminator(cfg)
    assert disc.heads[0].cmapper.in_features == 1280 + 1024
    assert all(not p.requires_grad for p in disc.feature_net.parameters())


@pytest.mark.parametrize("size_px", [56, 64, 80])
def test_forward_shapes(disc, size_px):
    image = torch.rand(3, 3, size_px, size_px) * 2 - 1
    c_text, c_img = conditions(3)
    logits, features = disc(image, c_text, c_img, gen())
    assert len(logits) == len(features) == DISCRIMINATOR_TINY.num_heads == 3
    for lg, f in zip(logits, features):
        assert lg.shape == (3, 16) and f.shape == (3, 64, 16)
    assert disc.image_condition(image).shape == (3, 64)


def test_gradient_reaches_the_image_and_heads_but_not_the_vits(disc):
    disc.zero_grad(set_to_none=True)
    image = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    c_text, c_img = conditions(2)
    logits, _ = disc(image, c_text, c_img, gen())
    sum(lg.mean() for lg in logits).backward()
    assert image.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert all(p.grad is None for p in disc.feature_net.parameters()) and all(
        p.grad is None for p in disc.image_net.parameters()
    )


def test_image_condition_is_the_cls_of_the_clean_image(disc):
    image = torch.rand(2, 3, 56, 56) * 2 - 1
    pixels = (image + 1) / 2
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = disc.image_net((pixels - mean[:, None, None]) / std[:, None, None])
    torch.testing.assert_close(disc.image_condition(image), expected)


def test_r1_through_the_discriminator_is_taken_on_the_head_inputs():
    """R1 the way the training loop takes it, against the definition: the gradient of each head at the features,
    which is neither the gradient at the pixels nor the gradient at the head parameters."""
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(DISCRIMINATOR_TINY).eval()  # eval: spectral norm stops its power iteration
    image = (torch.rand(4, 3, 64, 64) * 2 - 1).requires_grad_()
    c_text, c_img = conditions(4)
    with torch.no_grad():
        features = disc.features(image, gen(9))
    features = [f.requires_grad_() for f in features]
    r1 = r1_penalty(features, disc.heads_logits(features, c_text, c_img))

    expected = 0.0
    for head, f in zip(disc.heads, features):
        f = f.detach().requires_grad_()
        (grad,) = torch.autograd.grad(head(f, torch.cat([c_text, c_img], -1)).sum(), f)
        expected += grad.square().sum().item() / 4
    assert r1.item() == pytest.approx(expected, rel=1e-4)

    logits, _ = disc(image, c_text, c_img, gen(9))
    (pixel_grad,) = torch.autograd.grad(sum(lg.sum() for lg in logits), image)
    assert r1.item() != pytest.approx(pixel_grad.square().sum().item() / 4, rel=1e-2)
    head_params = list(disc.heads.parameters())
    param_grads = torch.autograd.grad(sum(lg.sum() for lg in disc.heads_logits(features, c_text, c_img)), head_params)
    assert r1.item() != pytest.approx(sum(g.square().sum().item() for g in param_grads), rel=1e-2)
