"""The model card's evaluation in miniature: held-out prompts -> images per row -> FID, alignment, seconds per image.

Image i of every row uses prompt HELDOUT_PROMPTS[i % 20] and seed i, so rows differ only in model, steps and
guidance. The FID reference is a set of real stream renderings of the same prompts: one scene per image, drawn to
satisfy its prompt. Two `references` entries put the rows in scale: "real", a second real set drawn with another
seed (FID between two real sets of this size, the floor; alignment of real images, the classifier's ceiling), and
"vae-reconstruction", that second set passed through the first loaded model's VAE (what any generator decoding with
that VAE can at best reach)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..train.data import (
    BACKGROUND_COLORS,
    HELDOUT_PROMPTS,
    SIZES,
    VARIED,
    PromptSpec,
    Scene,
    ShapeObject,
    _place_free,
    _place_pair,
    parse_caption,
    pixels_to_image,
    render_scene,
    scene_satisfies,
)
from .metrics import alignment, alignment_breakdown, fid
from .networks import IMAGE_SIZE_PX, EvalNet, decode_scenes

TEACHER_CFG_SCALE = 5.0  # the teacher's classifier-free guidance in teacher-50-cfg, mid-way in SD's usual 4-7
P_PLAIN_UNSTATED = 3 / 7  # stream: plain background 0.6, named in the caption half the time; varied 0.4, never named
REAL_SEED, REAL_FLOOR_SEED = 1, 2


@dataclass(frozen=True)
class Row:
    name: str
    model: str  # a folder under the models directory: teacher, add, adv-only or distill-only
    steps: int
    guidance_scale: float


ROWS = (
    Row("teacher-50-cfg", "teacher", 50, TEACHER_CFG_SCALE),
    Row("teacher-4", "teacher", 4, 0.0),
    Row("teacher-1", "teacher", 1, 0.0),
    Row("add-4", "add", 4, 0.0),
    Row("add-1", "add", 1, 0.0),
    Row("adv-only-1", "adv-only", 1, 0.0),  # the paper's Table 1d ablations: students trained on one loss alone
    Row("distill-only-1", "distill-only", 1, 0.0),
)
ROW_NAMES = tuple(row.name for row in ROWS)


def eval_prompts(num_images: int) -> list[str]:
    return [HELDOUT_PROMPTS[i % len(HELDOUT_PROMPTS)] for i in range(num_images)]


def scene_for(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A scene that makes the prompt true, drawn as the stream draws one: unstated sizes uniform, an unstated
    background plain or varied in the stream's odds (never an object's colour), positions by the stream's rules."""
    sizes = [size or str(rng.choice(list(SIZES))) for _, _, size in spec.objects]
    extents = [SIZES[size] for size in sizes]
    if spec.background is not None:
        background = spec.background
    elif rng.random() < P_PLAIN_UNSTATED:
        taken = {color for _, color, _ in spec.objects}
        background = str(rng.choice([c for c in BACKGROUND_COLORS if c not in taken]))
    else:
        background = VARIED
    if spec.relation is not None:
        centres = _place_pair(rng, spec.relation, (extents[0], extents[1]))
    elif len(spec.objects) == 1:
        half = extents[0] / 2 + 0.02
        centres = [(rng.uniform(half, 1 - half), rng.uniform(half, 1 - half))]
    else:
        centres = _place_free(rng, extents)
    objects = tuple(
        ShapeObject(shape, color, size, (float(x), float(y)))
        for (shape, color, _), size, (x, y) in zip(spec.objects, sizes, centres)
    )
    scene = Scene(objects, background, spec.relation)
    if not scene_satisfies(scene, spec):
        raise AssertionError(f"drew a scene that does not satisfy {spec}")
    return scene


def real_images(prompts: list[str], seed: int) -> torch.Tensor:
    """One real rendering per prompt, [N, 3, 64, 64] in [-1, 1], quantised to uint8 as the training images are."""
    rng = np.random.default_rng(seed)
    images = [pixels_to_image(render_scene(scene_for(parse_caption(p), rng), IMAGE_SIZE_PX, rng)) for p in prompts]
    return torch.stack(images)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(pipe, row: Row, prompts: list[str], batch_size: int) -> tuple[torch.Tensor, float]:
    """-> (images [N, 3, 64, 64] in [-1, 1], uint8-quantised like a saved PNG; seconds per image).

    The time covers prompt encoding, sampling and decoding of whole batches, after one untimed warm-up batch."""
    def batch(start: int, stop: int) -> torch.Tensor:
        out = pipe(prompts[start:stop], num_inference_steps=row.steps, guidance_scale=row.guidance_scale,
                   seed=list(range(start, stop)), output_type="pt")
        return out.images

    batch(0, min(2, len(prompts)))
    _sync(pipe.device)
    start = time.perf_counter()
    parts = [batch(s, min(s + batch_size, len(prompts))) for s in range(0, len(prompts), batch_size)]
    _sync(pipe.device)
    seconds = (time.perf_counter() - start) / len(prompts)
    image = torch.cat(parts).float() * 2 - 1
    if image.shape[-2:] != (IMAGE_SIZE_PX, IMAGE_SIZE_PX):  # a model of another resolution: read it at 64 px
        image = F.interpolate(image, size=(IMAGE_SIZE_PX, IMAGE_SIZE_PX), mode="bilinear", antialias=True)
    return _quantize(image), seconds


def _quantize(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the same range in 256 levels, as a saved PNG (and the training images) hold it."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def vae_reconstructions(pipe, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Real images through the model's VAE (posterior mean, no noise): the best picture any generator that
    decodes with this VAE can deliver, so its scores bound every row that uses it."""
    parts = []
    for s in range(0, images.shape[0], batch_size):
        mean, _ = pipe.vae.encode(images[s : s + batch_size].to(pipe.device, pipe.vae_dtype))
        parts.append(pipe.vae.decode(mean).float().cpu())
    return _quantize(torch.cat(parts))


@torch.no_grad()
def measure(net: EvalNet, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, list[Scene]]:
    """-> (features [N, 256], the scene the heads read from each image)."""
    device = next(net.parameters()).device
    features, scenes = [], []
    for s in range(0, images.shape[0], batch_size):
        f, logits = net(images[s : s + batch_size].to(device))
        features.append(f.double().cpu())
        scenes += decode_scenes(logits)
    return torch.cat(features), scenes


def _scores(net: EvalNet, images: torch.Tensor, specs: list[PromptSpec], real_features: torch.Tensor) -> dict:
    features, scenes = measure(net, images)
    return {
        "fid": fid(features, real_features),
        "alignment": alignment(scenes, specs),
        "alignment_breakdown": alignment_breakdown(scenes, specs),
    }


def evaluate(rows: list[Row], num_images: int, load_model, net: EvalNet, batch_size: int = 100, log=print) -> dict:
    """Score each row; `load_model(row.model)` returns (a TurboPipeline, where it was loaded from), or None when
    that model is not there. Each row records the latter as model_dir.

    A row whose model is missing is reported with null metrics and a note; no number is ever filled in."""
    prompts = eval_prompts(num_images)
    specs = [parse_caption(p) for p in prompts]
    real_features, _ = measure(net, real_images(prompts, REAL_SEED))
    other_real = real_images(prompts, REAL_FLOOR_SEED)
    references = [{"name": "real", "num_images": num_images, **_scores(net, other_real, specs, real_features)}]
    log(_summary(references[0]))
    results, pipes, model_dirs = [], {}, {}
    for row in rows:
        if row.model not in pipes:
            pipes[row.model], model_dirs[row.model] = load_model(row.model) or (None, None)
        entry = {"name": row.name, "steps": row.steps, "guidance_scale": row.guidance_scale, "num_images": num_images,
                 "model_dir": model_dirs[row.model]}
        if pipes[row.model] is None:
            entry.update(fid=None, alignment=None, seconds_per_image=None,
                         note=f"model '{row.model}' not found; this row was not run")
        else:
            images, seconds = generate(pipes[row.model], row, prompts, batch_size)
            entry.update(_scores(net, images, specs, real_features), seconds_per_image=seconds)
        results.append(entry)
        log(_summary(entry))
    pipe = next((p for p in pipes.values() if p is not None), None)
    if pipe is not None:
        recon = vae_reconstructions(pipe, other_real, batch_size)
        references.append({"name": "vae-reconstruction", "num_images": num_images,
                           **_scores(net, recon, specs, real_features)})
        log(_summary(references[-1]))
    return {"rows": results, "references": references}


def _summary(entry: dict) -> str:
    if entry["fid"] is None:
        return f"{entry['name']}: {entry['note']}"
    speed = f" {entry['seconds_per_image'] * 1000:.1f} ms/image" if entry.get("seconds_per_image") else ""
    return f"{entry['name']}: fid {entry['fid']:.2f} alignment {entry['alignment']:.3f}{speed}"


def folder_loader(models_dir: Path, fallbacks: dict[str, Path], device: str = "auto", dtype: str = "auto"):
    """load_model for evaluate: the first of models_dir/<model> and fallbacks[model] (e.g. the bundled
    sdturbo-mini for 'add') that holds a diffusers folder, with its absolute path ("bundled sdturbo-mini" for the
    package's own), else None."""
    from ..pipeline import MINI_MODEL_DIR, TurboPipeline

    def load(model: str):
        for folder in (models_dir / model, fallbacks.get(model)):
            if folder is not None and (folder / "model_index.json").exists():
                where = str(folder.resolve())
                where = "bundled sdturbo-mini" if where == str(MINI_MODEL_DIR.resolve()) else where
                return TurboPipeline.from_pretrained(folder, device=device, dtype=dtype), where
        return None

    return load
