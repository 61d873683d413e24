"""A folder of captioned images as a seeded training stream, for real data.

Every image file (.jpg, .jpeg, .png, .webp) at any depth below the folder (symlinked subfolders followed) whose
caption sits next to it in a .txt file of the same name (cat.jpg + cat.txt) is one example; images without a caption
are skipped, with a warning. Each image is turned upright by its EXIF orientation, resized so that its shorter side
is the training size, then centre-cropped to a square. Captions are UTF-8, else read as cp1252, with a warning.

Like ShapesStream, batch(step, batch_size, rank, world_size) is a pure function of its arguments: the examples
are read in an order reshuffled on every pass over the folder (seeded by (seed, pass)); rank r at step k takes
positions (k * world_size + r) * batch_size + 0..batch_size-1 of that endless sequence. Ranks never share an
example within a pass, and a resumed run reads exactly what it would have read. An image that cannot be decoded is
replaced by the next example of the pass order that can, with a warning: the folder's listing, and so the order,
stays as it was, and the same files give the same batches in every run."""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..pipeline import rgb_image
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
    images = sorted(p for p in _files_below(root) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    pairs = [(p, p.with_suffix(".txt")) for p in images]
    examples = [(image, caption) for image, caption in pairs if caption.is_file()]
    if len(examples) < len(pairs):
        warnings.warn(f"{len(pairs) - len(examples)} of {len(pairs)} images in {root} have no .txt caption; skipped")
    if not examples:
        raise ValueError(f"{root} holds no image with a same-name .txt caption ({', '.join(IMAGE_SUFFIXES)})")
    return examples


def _files_below(root: Path) -> list[Path]:
    """Every file below root, following symlinked folders (Path.rglob does not), each real folder once: a link back
    up the tree would otherwise loop. Folders are walked in sorted order, so the path kept for a folder reached
    twice is the same in every run."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()
        files += [Path(folder, name) for name in names]
    return files


_warned: set[Path] = set()  # the files warned about in this process


def _warn_once(path: Path, message: str) -> None:
    """Each bad file is reported once per process, not on every pass over the folder."""
    if path not in _warned:
        _warned.add(path)
        warnings.warn(message, stacklevel=3)


def read_caption(path: Path) -> str:
    """The caption text: UTF-8, else cp1252, the usual encoding of captions scraped from the web that are not UTF-8
    (latin-1 where a byte is undefined in cp1252, so that any file reads)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        pass
    try:
        text, encoding = data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        text, encoding = data.decode("latin-1"), "latin-1"
    _warn_once(path, f"caption {path} is not UTF-8; read it as {encoding}")
    return text.strip()


def load_image(path: Path, size_px: int) -> np.ndarray | None:
    """uint8 [size_px, size_px, 3] pixels, or None (with a warning) where the file does not decode: truncated,
    corrupt, not an image, too large for PIL, or floating-point."""
    try:
        with Image.open(path) as image:
            image = rgb_image(ImageOps.exif_transpose(image))  # 16-bit PNGs scaled, not clipped to white
            return np.asarray(resize_center_crop(image, size_px))
    # Decoders fail in many ways on bad bytes: OSError (truncated, unidentified), SyntaxError (broken PNG chunks),
    # ValueError (rgb_image on float images), PIL's DecompressionBombError.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        _warn_once(path, f"cannot decode training image {path} ({e}); the next image of the shuffled order stands "
                         "in for it (keep the file listed while resuming: removing it reshuffles the run)")
        return None


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
        self.root = Path(root)
        self.examples = find_examples(root)
        self.size_px = size_px
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, position: int) -> tuple[torch.Tensor, str]:
        """The example at `position` of the endless sequence: ([3, H, W] in [-1, 1], caption). Where its image does
        not decode, the next example of the pass order that does stands in, a choice that depends on the files only."""
        count = len(self.examples)
        epoch, offset = divmod(position, count)
        order = _pass_order(self.seed, epoch, count)
        for i in range(count):
            image_path, caption_path = self.examples[int(order[(offset + i) % count])]
            pixels = load_image(image_path, self.size_px)
            if pixels is not None:
                return pixels_to_image(pixels), read_caption(caption_path)
        raise ValueError(f"none of the {count} captioned images in {self.root} can be decoded; see the warnings")

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> CaptionBatch:
        start = (step * world_size + rank) * batch_size
        images, captions = zip(*(self.example(start + i) for i in range(batch_size)))
        return CaptionBatch(torch.stack(images), list(captions))
