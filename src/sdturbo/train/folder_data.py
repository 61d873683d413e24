"""A folder of captioned images as a seeded training stream, for real data.

Every image file (.jpg, .jpeg, .png, .webp) at any depth below the folder whose caption sits next to it in a
.txt file of the same name (cat.jpg + cat.txt) is one example; images without a caption are skipped, with a
warning. Each image is resized so that its shorter side is the training size, then centre-cropped to a square.

Like ShapesStream, batch(step, batch_size, rank, world_size) is a pure function of its arguments: the examples
are read in an order reshuffled on every pass over the folder (seeded by (seed, pass)); rank r at step k takes
positions (k * world_size + r) * batch_size + 0..batch_size-1 of that endless sequence. Ranks never share an
example within a pass, and a resumed run reads exactly what it would have read."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import pixels_to_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class CaptionBatch:
    image: torch.Tensor  # [B, 3, H, W] float32 in [-1, 1]
    captions: list[str]


def find_examples(root: str | Path) -> list[tuple[Path, Path]]:
    """(image, caption) path pairs below root, sorted by path so every rank and every run sees one order."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    pairs = [(p, p.with_suffix(".txt")) for p in images]
    examples = [(image, caption) for image, caption in pairs if caption.is_file()]
    if len(examples) < len(pairs):
        warnings.warn(f"{len(pairs) - len(examples)} of {len(pairs)} images in {root} have no .txt caption; skipped")
    if not examples:
        raise ValueError(f"{root} holds no image with a same-name .txt caption ({', '.join(IMAGE_SUFFIXES)})")
    return examples


def resize_center_crop(image: Image.Image, size_px: int) -> Image.Image:
    """Shorter side to size_px (bicubic, antialiased when shrinking), then the central size_px square."""
    width, height = image.size
    scale = size_px / min(width, height)
    new_size = (max(size_px, round(width * scale)), max(size_px, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - size_px) // 2, (new_size[1] - size_px) // 2
    return image.crop((left, top, left + size_px, top + size_px))


@functools.lru_cache(maxsize=2)
def _pass_order(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


class ImageCaptionFolder:
    """The endless stream over one folder; see the module docstring for the order."""

    def __init__(self, root: str | Path, size_px: int, seed: int):
        self.examples = find_examples(root)
        self.size_px = size_px
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, position: int) -> tuple[torch.Tensor, str]:
        """The example at `position` of the endless sequence: ([3, H, W] in [-1, 1], caption)."""
        epoch, offset = divmod(position, len(self.examples))
        image_path, caption_path = self.examples[int(_pass_order(self.seed, epoch, len(self.examples))[offset])]
        with Image.open(image_path) as image:
            pixels = np.asarray(resize_center_crop(image.convert("RGB"), self.size_px))
        caption = caption_path.read_text(encoding="utf-8").strip()
        return pixels_to_image(pixels), caption

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> CaptionBatch:
        start = (step * world_size + rank) * batch_size
        images, captions = zip(*(self.example(start + i) for i in range(batch_size)))
        return CaptionBatch(torch.stack(images), list(captions))
