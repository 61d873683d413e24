"""FID against closed forms, and alignment's reading of each prompt form."""

import pytest
import torch

from sdturbo.eval.metrics import alignment, alignment_breakdown, fid
from sdturbo.train.data import Scene, ShapeObject, parse_caption


def test_fid_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(fid(x, x)) < 1e-8


def test_fid_of_shifted_scaled_gaussians_matches_the_closed_form():
    # N(0, I) vs N(mu, s^2 I): |mu|^2 + D (1 - s)^2
    g = torch.Generator().manual_seed(1)
    d, n, s = 8, 200_000, 1.5
    mu = torch.linspace(-1, 1, d)
    a = torch.randn(n, d, generator=g)
    b = mu + s * torch.randn(n, d, generator=g)
    expected = float(mu.square().sum()) + d * (1 - s) ** 2
    assert fid(a, b) == pytest.approx(expected, rel=0.02)


def test_fid_matches_the_trace_of_the_product_root_for_correlated_features():
    # tr((S_a S_b)^1/2) = sum of sqrt of the (real, positive) eigenvalues of S_a S_b, computed independently here
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 3
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    cross = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    expected = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    assert fid(a, b) == pytest.approx(float(expected), rel=1e-6)


def test_fid_rejects_a_single_sample():
    with pytest.raises(ValueError, match="N >= 2"):
        fid(torch.zeros(1, 4), torch.zeros(3, 4))


def obj(shape, color, size="small", center=(0.5, 0.5)):
    return ShapeObject(shape, color, size, center)


def test_alignment_checks_objects_count_size_relation_and_background():
    spec = parse_caption("a small red square left of a large green circle")
    right = Scene((obj("square", "red", "small", (0.2, 0.5)), obj("circle", "green", "large", (0.7, 0.5))), "gray",
                  "left of")
    swapped = Scene((right.objects[0], obj("circle", "green", "large", (0.1, 0.5))), "gray", "right of")
    wrong_size = Scene((obj("square", "red", "large", (0.2, 0.5)), right.objects[1]), "gray", "left of")
    extra = Scene((*right.objects, obj("triangle", "blue")), "gray", None)
    scenes = [right, swapped, wrong_size, extra]
    assert alignment(scenes, [spec] * 4) == 0.25
    breakdown = alignment_breakdown(scenes, [spec] * 4)
    assert breakdown == {"colors": 1.0, "objects": 1.0, "count": 0.75, "size": 0.75, "relation": 0.75, "background": None}


def test_alignment_reads_a_stated_background_and_ignores_an_unstated_one():
    on_white = parse_caption("a white square on a purple background")
    plain = parse_caption("a white square")
    scene = Scene((obj("square", "white"),), "black", None)
    assert alignment([scene], [on_white]) == 0.0 and alignment([scene], [plain]) == 1.0
    assert alignment_breakdown([scene], [on_white])["background"] == 0.0


def test_alignment_needs_one_scene_per_prompt():
    with pytest.raises(ValueError, match="one scene per prompt"):
        alignment([], [parse_caption("a red circle")])
