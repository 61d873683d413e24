"""Stage "vit": the discriminator's feature network, the DINOv2 ViT class at mini size, pretrained from scratch by
supervised attribute prediction on the shapes: which (shape, colour) pairs are present (multi-label), how many
objects, and which relation the caption states. Labels are read back from the captions (data.parse_caption). Its
features then tell shapes, colours and layouts apart, which is what the ADD discriminator heads need."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...models.vit import ViT, imagenet_normalize
from ..data import COLORS, RELATIONS, SHAPES, parse_caption
from .cache import ShapesCache
from .checkpoint import (
    clipped_step,
    load_checkpoint,
    resume,
    save_checkpoint,
    set_learning_rate,
)
from .config import MINI_VIT, VitStage

PAIRS = [(shape, color) for shape in SHAPES for color in COLORS]
MAX_OBJECTS = 3


def caption_labels(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (pairs present [B, 24] float, object count - 1 [B] long, relation index [B] long, 0 = none)."""
    pairs, counts, relations = torch.zeros(len(captions), len(PAIRS)), [], []
    for row, caption in enumerate(captions):
        spec = parse_caption(caption)
        for shape, color, _ in spec.objects:
            pairs[row, PAIRS.index((shape, color))] = 1
        counts.append(len(spec.objects) - 1)
        relations.append(0 if spec.relation is None else 1 + RELATIONS.index(spec.relation))
    return pairs, torch.tensor(counts), torch.tensor(relations)


def vit_input(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] image -> the ViT's input, as the discriminator prepares it: area resize, ImageNet normalisation."""
    x = F.interpolate((image + 1) / 2, size=(MINI_VIT.image_size, MINI_VIT.image_size), mode="area")
    return imagenet_normalize(x)


class AttributeHeads(nn.Module):
    """Training-only linear heads on the final-norm CLS embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.pairs = nn.Linear(dim, len(PAIRS))
        self.count = nn.Linear(dim, MAX_OBJECTS)
        self.relation = nn.Linear(dim, 1 + len(RELATIONS))


def attribute_loss(vit: ViT, heads: AttributeHeads, image: torch.Tensor, captions: list[str]) -> torch.Tensor:
    pairs, count, relation = caption_labels(captions)
    cls = vit(vit_input(image)).float()
    return (
        F.binary_cross_entropy_with_logits(heads.pairs(cls), pairs)
        + F.cross_entropy(heads.count(cls), count)
        + F.cross_entropy(heads.relation(cls), relation)
    )


def train_vit(path: Path, stage: VitStage, cache: ShapesCache, log) -> dict:
    """-> the finished checkpoint {"vit": state dict, "done": True}."""
    state = load_checkpoint(path)
    if state is not None and state.get("done"):
        return state
    torch.manual_seed(stage.seed)
    vit, heads = ViT(MINI_VIT), AttributeHeads(MINI_VIT.hidden_size)
    # DINOv2 checkpoints ship trained CLS / position embeddings; from scratch they need a non-zero start.
    nn.init.normal_(vit.embeddings.position_embeddings, std=0.02)
    nn.init.normal_(vit.embeddings.cls_token, std=0.02)
    params = [*vit.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.05)
    step = resume(state, {"vit": vit, "heads": heads}, opt)
    generator = torch.Generator().manual_seed(stage.seed + step)
    start = time.time()
    while step < stage.steps:
        set_learning_rate(opt, stage.lr, step, stage.steps, stage.warmup_steps)
        image, captions, _ = cache.batch(stage.batch_size, generator)
        with torch.autocast("cpu", torch.bfloat16):
            loss = attribute_loss(vit, heads, image, captions)
        clipped_step(opt, loss, params)
        step += 1
        if step % stage.log_every == 0:
            log(f"vit step {step}/{stage.steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
        if step % stage.save_every == 0 and step < stage.steps:
            state = {"vit": vit.state_dict(), "heads": heads.state_dict(), "optimizer": opt.state_dict(), "step": step}
            save_checkpoint(path, state)
    state = {"vit": vit.state_dict(), "step": step, "done": True}
    save_checkpoint(path, state)
    return state
