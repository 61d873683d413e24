"""The first N examples of the shapes stream, rendered once and kept as uint8 pixels + captions.

Rendering costs ~10 ms per image on a CPU (4x supersampled shapes, textured backgrounds), as much as a training
step of the small models, so every stage samples its batches from this cache instead of the live stream."""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from ..data import ShapesStream, caption_scene, sample_scene
from .checkpoint import load_checkpoint, save_checkpoint

DATA_SEED = 0


@dataclass
class ShapesCache:
    pixels: torch.Tensor  # [N, H, W, 3] uint8
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """A random batch: (image [B, 3, H, W] in [-1, 1], captions, the indices drawn)."""
        index = torch.randint(len(self), (batch_size,), generator=generator)
        image = self.pixels[index].permute(0, 3, 1, 2).float() / 127.5 - 1
        return image, [self.captions[i] for i in index.tolist()], index


def _render_range(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    seed, size_px, start, stop = args
    stream = ShapesStream(seed=seed, size_px=size_px)
    examples = [stream.example(i) for i in range(start, stop)]
    pixels = np.stack([((e.image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for e in examples])
    return pixels, [e.caption for e in examples]


def build_cache(path: Path, count: int, size_px: int, workers: int = 2) -> ShapesCache:
    """Render stream examples 0..count-1 in `workers` processes and save them to `path` (reused when present)."""
    if path.exists():
        return load_cache(path)
    chunk = 1000
    jobs = [(DATA_SEED, size_px, s, min(s + chunk, count)) for s in range(0, count, chunk)]
    with get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_render_range, jobs)
    cache = ShapesCache(torch.from_numpy(np.concatenate([p for p, _ in parts])), [c for _, cs in parts for c in cs])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"pixels": cache.pixels, "captions": cache.captions})
    return cache


def load_cache(path: Path) -> ShapesCache:
    state = load_checkpoint(path)
    return ShapesCache(state["pixels"], state["captions"])


def caption_stream(seed: int, count: int):
    """Captions only (no rendering): what the tokenizer is trained on."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield caption_scene(sample_scene(rng), rng)
