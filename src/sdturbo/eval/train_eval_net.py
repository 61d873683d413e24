"""Train the evaluation network on real stream images and ship its weights: `python -m sdturbo.eval.train_eval_net`.

The images come from a stream seed no generator trains on (sdturbo-mini reads seed 0). Light noise and blur are
added while training so that the heads still read scenes through a VAE's slight softening; the features stay
those of one fixed network, which is all FID needs."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

from ..train.data import INVERSE_RELATION, Scene, ShapesStream
from .networks import (
    BACKGROUNDS,
    EMPTY,
    GRID,
    PAIRS,
    SIZE_NAMES,
    WEIGHTS_PATH,
    EvalNet,
    SceneLogits,
    cell_centers,
    decode_scenes,
    save_eval_net,
)

EVAL_STREAM_SEED = 5150
LABEL_SHRINK = 0.7
EMPTY_WEIGHT = 0.2


@dataclass(frozen=True)
class EvalNetRecipe:
    num_images: int = 8000  # rendered once (~10 ms each), then reused every epoch
    val_images: int = 1000  # the stream indices right after the training ones
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_noise: float = 0.05  # per-image Gaussian noise std, drawn uniformly up to this (images span [-1, 1])
    blur_prob: float = 0.25  # share of images softened by a 3 x 3 box blur
    seed: int = 0  # weight init and batch order


@dataclass
class SceneTargets:
    cells: torch.Tensor  # [B, 16, 16] long: the pair whose object covers the cell, or EMPTY
    large: torch.Tensor  # [B, 16, 16] 0/1: that object's size, meaningful where cells != EMPTY
    background: torch.Tensor  # [B] index into BACKGROUNDS

    def to(self, device) -> SceneTargets:
        return SceneTargets(self.cells.to(device), self.large.to(device), self.background.to(device))

    def select(self, index: torch.Tensor) -> SceneTargets:
        return SceneTargets(self.cells[index], self.large[index], self.background[index])


def scene_targets(scenes: list[Scene]) -> SceneTargets:
    """Cells whose centre lies in the middle LABEL_SHRINK of an object's box take its pair: the middle of every
    shape is on the shape (a triangle's box corners are not), and even a small object gets at least 4 cells."""
    n = len(scenes)
    cells = torch.full((n, GRID, GRID), EMPTY, dtype=torch.long)
    large = torch.zeros(n, GRID, GRID)
    background = torch.tensor([BACKGROUNDS.index(scene.background) for scene in scenes])
    x, y = cell_centers()
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            half = LABEL_SHRINK * obj.extent / 2
            inside = ((x - obj.center[0]).abs() <= half) & ((y - obj.center[1]).abs() <= half)
            cells[b][inside] = PAIRS.index((obj.shape, obj.color))
            large[b][inside] = float(obj.size == SIZE_NAMES[1])
    return SceneTargets(cells, large, background)


def _render_range(args: tuple[int, int, int]) -> tuple[torch.Tensor, list[Scene]]:
    seed, start, count = args
    examples = [ShapesStream(seed=seed).example(i) for i in range(start, start + count)]
    pixels = torch.stack([((e.image + 1) * 127.5).round().to(torch.uint8) for e in examples])
    return pixels, [e.scene for e in examples]


def render(start: int, count: int, workers: int) -> tuple[torch.Tensor, list[Scene]]:
    """Eval-stream examples start..start+count-1 as uint8 pixels [N, 3, H, W] (as the generators' training cache
    stores them) and their scenes, rendered in `workers` processes (~10 ms per image each)."""
    chunk = 1000
    jobs = [(EVAL_STREAM_SEED, s, min(chunk, start + count - s)) for s in range(start, start + count, chunk)]
    if workers <= 1:
        parts = [_render_range(job) for job in jobs]
    else:
        # Rendering is PIL and numpy work: torch threads in every worker would only fight over the cores.
        with get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            parts = pool.map(_render_range, jobs)
    return torch.cat([p for p, _ in parts]), [scene for _, scenes in parts for scene in scenes]


def to_image(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1


def augment(image: torch.Tensor, recipe: EvalNetRecipe, generator: torch.Generator) -> torch.Tensor:
    n = image.shape[0]
    blurred = F.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    blur = (torch.rand(n, 1, 1, 1, generator=generator, device=image.device) < recipe.blur_prob).float()
    image = blur * blurred + (1 - blur) * image
    noise_std = torch.rand(n, 1, 1, 1, generator=generator, device=image.device) * recipe.max_noise
    return image + noise_std * torch.randn(image.shape, generator=generator, device=image.device)


def _cell_weights(cells: torch.Tensor) -> torch.Tensor:
    """Nine cells in ten are empty; weighing them down makes the net find objects early instead of last."""
    weight = torch.ones(EMPTY + 1, device=cells.device, dtype=cells.dtype)
    weight[EMPTY] = EMPTY_WEIGHT
    return weight


def scene_loss(logits: SceneLogits, target: SceneTargets) -> torch.Tensor:
    """Cell classification, the size of the labelled pair at object cells, and the background."""
    on_object = target.cells != EMPTY
    pair = target.cells.clamp(max=EMPTY - 1).unsqueeze(1)
    size_logit = logits.size.gather(1, pair).squeeze(1)[on_object]
    return (
        F.cross_entropy(logits.cells, target.cells, weight=_cell_weights(logits.cells))
        + F.binary_cross_entropy_with_logits(size_logit, target.large[on_object])
        + F.cross_entropy(logits.background, target.background)
    )


@torch.no_grad()
def scene_accuracy(net: EvalNet, pixels: torch.Tensor, scenes: list[Scene], batch_size: int = 256) -> float:
    """Share of images whose decoded scene has exactly the true objects (shape, colour, size), background and
    relation: the strictest reading, stricter than any prompt asks."""
    net.eval()
    hits = 0
    for s in range(0, len(scenes), batch_size):
        _, logits = net(to_image(pixels[s : s + batch_size]))
        for pred, true in zip(decode_scenes(logits), scenes[s : s + batch_size]):
            same_objects = {(o.shape, o.color, o.size) for o in pred.objects} == {
                (o.shape, o.color, o.size) for o in true.objects
            }
            same_relation = same_objects and (pred.relation is None or _relation_agrees(pred, true))
            hits += same_relation and pred.background == true.background
    return hits / len(scenes)


def _relation_agrees(pred: Scene, true: Scene) -> bool:
    """The predicted relation says the same as the true one (they may name the objects in either order)."""
    first = (pred.objects[0].shape, pred.objects[0].color)
    same_order = first == (true.objects[0].shape, true.objects[0].color)
    return pred.relation == (true.relation if same_order else INVERSE_RELATION[true.relation])


def train_eval_net(recipe: EvalNetRecipe, device: str = "cpu", workers: int = 1, log=print) -> tuple[EvalNet, float]:
    """-> (the trained network, on the CPU in eval mode, and its scene accuracy on held-back stream images)."""
    t0 = time.time()
    pixels, scenes = render(0, recipe.num_images, workers)
    val_pixels, val_scenes = render(recipe.num_images, recipe.val_images, workers)
    pixels, val_pixels = pixels.to(device), val_pixels.to(device)
    targets = scene_targets(scenes).to(device)
    log(f"rendered {recipe.num_images + recipe.val_images} images in {time.time() - t0:.0f}s")

    torch.manual_seed(recipe.seed)
    order_generator = torch.Generator().manual_seed(recipe.seed)
    noise_generator = torch.Generator(device).manual_seed(recipe.seed)
    net = EvalNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = recipe.num_images // recipe.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    for epoch in range(recipe.epochs):
        net.train()
        order = torch.randperm(recipe.num_images, generator=order_generator).to(device)
        total = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for step in range(steps_per_epoch):
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            _, logits = net(augment(to_image(pixels[index]), recipe, noise_generator))
            loss = scene_loss(logits, targets.select(index))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        accuracy = scene_accuracy(net, val_pixels, val_scenes)
        log(f"epoch {epoch + 1}/{recipe.epochs} loss {total.item() / steps_per_epoch:.4f} "
            f"val scene accuracy {accuracy:.3f} ({time.time() - t0:.0f}s)")
    return net.cpu().eval(), accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="where the safetensors weights go")
    parser.add_argument("--num-images", type=int, default=EvalNetRecipe.num_images)
    parser.add_argument("--epochs", type=int, default=EvalNetRecipe.epochs)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes")
    args = parser.parse_args(argv)
    recipe = EvalNetRecipe(num_images=args.num_images, epochs=args.epochs)
    net, accuracy = train_eval_net(recipe, args.device, args.workers)
    print(f"saved {save_eval_net(net, args.out)} (val scene accuracy {accuracy:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
