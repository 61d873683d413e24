"""Pure metric functions: FID over feature tensors, and prompt alignment over predicted scenes.

Alignment asks of each generated image whether the scene the evaluation network reads from it makes its prompt
true, with the stream's own test `scene_satisfies`. For every prompt form that means: each mentioned object is
there with its shape and colour, and no other object is (the stream never draws unmentioned objects); its size
where the prompt states one; the relation where one is stated (from either object's side); the background
where one is stated. `alignment` is the share of images that pass all of these; `alignment_breakdown` gives the
share passing each check, over the images whose prompt makes that check, plus a looser "colors" check (each
mentioned colour on some object, whatever its shape) that tells wrong shapes from missing objects."""

from __future__ import annotations

import torch

from ..train.data import PromptSpec, Scene, scene_satisfies
from .networks import relation_between


def _mean_and_covariance(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {tuple(features.shape)}")
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition; rounding's tiny negative eigenvalues -> 0."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two [N, D] feature sets (Heusel et al. 2017):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2).

    tr((S_a S_b)^1/2) equals tr((A S_b A)^1/2) with A = S_a^1/2, whose argument is symmetric PSD, so both roots come
    from eigh in float64; no scipy and no complex parts to discard."""
    mean_a, cov_a = _mean_and_covariance(features_a)
    mean_b, cov_b = _mean_and_covariance(features_b)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def alignment(scenes: list[Scene], specs: list[PromptSpec]) -> float:
    """Share of images whose predicted scene satisfies its prompt completely."""
    _check_lengths(scenes, specs)
    return sum(scene_satisfies(scene, spec) for scene, spec in zip(scenes, specs)) / len(specs)


def _object_checks(scene: Scene, spec: PromptSpec) -> dict[str, bool | None]:
    """Each check's outcome for one image; None where the prompt does not ask it."""
    found = {(o.shape, o.color): o for o in scene.objects}
    objects_present = all((shape, color) in found for shape, color, _ in spec.objects)
    sized = [(shape, color, size) for shape, color, size in spec.objects if size is not None]
    colors_found = {o.color for o in scene.objects}
    return {
        "colors": all(color in colors_found for _, color, _ in spec.objects),  # shape aside: is the colour there
        "objects": objects_present,
        "count": len(scene.objects) == len(spec.objects),
        "size": all(found.get((s, c)) is not None and found[(s, c)].size == z for s, c, z in sized) if sized else None,
        # the relation is judged only where both objects were found, so it does not repeat the objects check
        "relation": _relation_holds(scene, spec) if spec.relation is not None and objects_present else None,
        "background": scene.background == spec.background if spec.background is not None else None,
    }


def _relation_holds(scene: Scene, spec: PromptSpec) -> bool:
    """Whether the stated relation holds between the two named objects, whatever else the scene holds."""
    found = {(o.shape, o.color): o for o in scene.objects}
    a, b = (found[(shape, color)] for shape, color, _ in spec.objects)
    return relation_between(a.center, b.center) == spec.relation


def alignment_breakdown(scenes: list[Scene], specs: list[PromptSpec]) -> dict[str, float | None]:
    """Per check (colors, objects, count, size, relation, background): the share of the images asked it that pass."""
    _check_lengths(scenes, specs)
    outcomes = [_object_checks(scene, spec) for scene, spec in zip(scenes, specs)]
    breakdown: dict[str, float | None] = {}
    for check in outcomes[0]:
        asked = [o[check] for o in outcomes if o[check] is not None]
        breakdown[check] = sum(asked) / len(asked) if asked else None
    return breakdown


def _check_lengths(scenes: list[Scene], specs: list[PromptSpec]) -> None:
    if len(scenes) != len(specs) or not specs:
        raise ValueError(f"need one scene per prompt spec and at least one; got {len(scenes)} and {len(specs)}")
