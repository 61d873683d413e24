"""The evaluation network: a small CNN trained on real ShapesStream images to read a scene back from its pixels.

One network serves both metrics. Its final activations, pooled over the image (256 numbers), are the features for
FID, the role Inception plays on COCO; its heads say where each object is, which `metrics.py` turns into a
predicted Scene and checks against the prompt. It is trained by `train_eval_net.py` on a stream seed of its own, so
it shares nothing with the generators it judges (in particular it is not the ADD discriminator's feature network).

The heads work like a tiny segmenter on a 16 x 16 grid of cells: each cell is classified as one of the 24 (shape,
colour) pairs or as empty, with a size logit per pair. A scene never holds two objects of the same pair, so the
cells of a pair are one object: their weighted mean is its centre, their size logits its size. Reading every cell
with the same weights needs far fewer images to learn than one output per pair for the whole picture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..loading.single_file import save_tensors
from ..train.data import BACKGROUND_COLORS, COLORS, SHAPES, SIZES, VARIED, Scene, ShapeObject

PAIRS = tuple((shape, color) for shape in SHAPES for color in COLORS)  # 24 (shape, colour) classes
EMPTY = len(PAIRS)  # the 25th cell class
SIZE_NAMES = tuple(SIZES)  # ("small", "large")
BACKGROUNDS = (*BACKGROUND_COLORS, VARIED)  # 9 plain backgrounds + the varied gradient
IMAGE_SIZE_PX = 64
GRID = 16  # cells per side: 4 px each
MIN_CELLS = 3  # a pair seen in fewer cells is a speck, not an object (the smallest object is labelled on 4-9)
FEATURE_DIM = 256
WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "assets" / "eval" / "eval_net.safetensors"


@dataclass
class SceneLogits:
    cells: torch.Tensor  # [B, 25, 16, 16] logits: which pair each cell shows, or EMPTY
    size: torch.Tensor  # [B, 24, 16, 16] logits: large (vs small), per pair and cell
    background: torch.Tensor  # [B, 10] logits over BACKGROUNDS


def _conv(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


class EvalNet(nn.Module):
    """image [B, 3, 64, 64] in [-1, 1] -> features [B, 256] and SceneLogits."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            _conv(3, 32, 1),  # 64 x 64: the smallest shapes are 13 px wide, keep full resolution for one layer
            _conv(32, 64, 2),  # 32 x 32
            _conv(64, 96, 2),  # 16 x 16
            _conv(96, 96, 1),
            _conv(96, 96, 1),
            _conv(96, FEATURE_DIM // 2, 1),  # receptive field 37 px: the largest objects are 23 px
        )
        self.cell_head = nn.Conv2d(FEATURE_DIM // 2, len(PAIRS) + 1 + len(PAIRS), 1)
        self.background_head = nn.Linear(FEATURE_DIM, len(BACKGROUNDS))

    def _map(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[1:] != (3, IMAGE_SIZE_PX, IMAGE_SIZE_PX):
            raise ValueError(f"EvalNet reads [B, 3, {IMAGE_SIZE_PX}, {IMAGE_SIZE_PX}] images, got {tuple(image.shape)}")
        return self.trunk(image)

    @staticmethod
    def _pool(fmap: torch.Tensor) -> torch.Tensor:
        return torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], dim=1)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self._pool(self._map(image))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, SceneLogits]:
        fmap = self._map(image)
        features = self._pool(fmap)
        cells, size = self.cell_head(fmap).split([len(PAIRS) + 1, len(PAIRS)], dim=1)
        return features, SceneLogits(cells, size, self.background_head(features))


def cell_centers(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of every cell's centre as fractions of the side, each [16, 16] (y downwards)."""
    coords = (torch.arange(GRID, device=device) + 0.5) / GRID
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x, y


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """How centre a lies relative to centre b, along the axis where they differ most (the stream places related
    objects in opposite halves along the relation's axis, close on the other)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


@torch.no_grad()
def decode_scenes(logits: SceneLogits) -> list[Scene]:
    """The scene each image shows according to the heads: every pair that wins at least MIN_CELLS cells, at the
    probability-weighted mean of those cells, large if their mean size probability is; the likeliest background;
    for two objects the relation their centres make."""
    probs = logits.cells.float().softmax(1)[:, :EMPTY]  # [B, 24, G, G]
    mine = F.one_hot(logits.cells.argmax(1), EMPTY + 1)[..., :EMPTY].permute(0, 3, 1, 2).float()
    weight = probs * mine
    count = mine.sum((2, 3))  # [B, 24]
    total = weight.sum((2, 3)).clamp(min=1e-8)
    x, y = cell_centers(probs.device)
    center = torch.stack([(weight * x).sum((2, 3)) / total, (weight * y).sum((2, 3)) / total], dim=-1).tolist()
    large = ((logits.size.float().sigmoid() * mine).sum((2, 3)) / count.clamp(min=1) > 0.5).tolist()
    present, backgrounds = (count >= MIN_CELLS).tolist(), logits.background.argmax(1).tolist()
    scenes = []
    for b in range(len(present)):
        objects = tuple(
            ShapeObject(shape, color, SIZE_NAMES[large[b][i]], tuple(center[b][i]))
            for i, (shape, color) in enumerate(PAIRS)
            if present[b][i]
        )
        relation = relation_between(objects[0].center, objects[1].center) if len(objects) == 2 else None
        scenes.append(Scene(objects, BACKGROUNDS[backgrounds[b]], relation))
    return scenes


def save_eval_net(net: EvalNet, path: Path = WEIGHTS_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, path)
    return path


def load_eval_net(path: Path = WEIGHTS_PATH, device: str | torch.device = "cpu") -> EvalNet:
    if not path.exists():
        raise FileNotFoundError(f"no evaluation network at {path}; train one: python -m sdturbo.eval.train_eval_net")
    net = EvalNet()
    try:
        net.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError):  # not safetensors, or another network's weights
        raise ValueError(f"{path} does not hold evaluation network weights (python -m sdturbo.eval.train_eval_net "
                         "writes them)") from None
    return net.to(device).eval()
