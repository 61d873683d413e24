"""Stage "clip": contrastive (InfoNCE, CLIP-style) pretraining of both text towers against a small image tower.

Each tower's pooled caption embedding (TE2: its own projection; TE1, which has none, a training-only linear map of
its final-LayerNorm'd eos state) is matched to the image embedding of its batch partner. Only the text towers are
kept; the image CNN exists to give the captions something to be contrastive against."""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...models.clip import CLIPTextModel
from ...tokenizer import CLIPTokenizer
from .cache import ShapesCache
from .checkpoint import (
    clipped_step,
    load_checkpoint,
    resume,
    save_checkpoint,
    set_learning_rate,
)
from .config import MINI, ClipStage

TRAIN_TOKENS = 32  # captions are < 30 tokens and attention is causal, so the first 32 positions are exact


class ImageTower(nn.Module):
    """64 px image -> embedding: four stride-2 convs, then a linear map of the flattened 4 x 4 grid (flattening, not
    pooling, keeps where things are, which the relation captions need)."""

    def __init__(self, embed_dim: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for c_in, c_out in pairwise(chans):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1] * 16, embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(image).flatten(1))


class ClipModels(nn.Module):
    def __init__(self, eos_token_id: int, embed_dim: int):
        super().__init__()
        self.text_encoder = CLIPTextModel(MINI.text_encoder, eos_token_id)
        self.text_encoder_2 = CLIPTextModel(MINI.text_encoder_2, eos_token_id)
        self.te1_head = nn.Linear(MINI.text_encoder.hidden_size, embed_dim, bias=False)
        self.te2_head = nn.Linear(MINI.text_encoder_2.projection_dim, embed_dim, bias=False)
        self.image_tower = ImageTower(embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature

    def text_embeddings(self, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        te1 = self.text_encoder
        hidden, _ = te1(ids1)
        pooled1 = te1.text_model.final_layer_norm(_eos_rows(te1.text_model.encoder.layers[-1](hidden), ids1, te1))
        _, pooled2 = self.text_encoder_2(ids2)
        return self.te1_head(pooled1), self.te2_head(pooled2)


def _eos_rows(last_hidden: torch.Tensor, ids: torch.Tensor, model: CLIPTextModel) -> torch.Tensor:
    rows = torch.arange(ids.shape[0])
    return last_hidden[rows, (ids == model.eos_token_id).int().argmax(-1)]


def info_nce(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE. Identical captions in a batch are all counted as positives (soft targets), so common
    short captions are not pushed apart from their own duplicates."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=logits.dtype)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def train_clip(path: Path, tokenizer_dir: Path, stage: ClipStage, cache: ShapesCache, log) -> dict:
    """-> the finished checkpoint {"text_encoder", "text_encoder_2": state dicts, "eos_token_id", "done"}."""
    state = load_checkpoint(path)
    if state is not None and state.get("done"):
        return state
    tokenizer = CLIPTokenizer.from_folder(tokenizer_dir)
    torch.manual_seed(stage.seed)
    models = ClipModels(tokenizer.eos_token_id, stage.embed_dim)
    opt = torch.optim.AdamW(models.parameters(), lr=stage.lr, weight_decay=0.1)
    step = resume(state, {"models": models}, opt)
    generator = torch.Generator().manual_seed(stage.seed + step)
    start = time.time()
    while step < stage.steps:
        set_learning_rate(opt, stage.lr, step, stage.steps, stage.warmup_steps)
        image, captions, _ = cache.batch(stage.batch_size, generator)
        ids = tokenizer(captions)[:, :TRAIN_TOKENS]
        with torch.autocast("cpu", torch.bfloat16):
            text1, text2 = models.text_embeddings(ids, ids)
            image_emb = models.image_tower(image)
        loss1 = info_nce(text1.float(), image_emb.float(), models.logit_scale, captions)
        loss2 = info_nce(text2.float(), image_emb.float(), models.logit_scale, captions)
        clipped_step(opt, loss1 + loss2, models.parameters())
        step += 1
        if step % stage.log_every == 0:
            log(f"clip step {step}/{stage.steps} nce te1 {loss1.item():.3f} te2 {loss2.item():.3f} ({time.time() - start:.0f}s)")
        if step % stage.save_every == 0 and step < stage.steps:
            save_checkpoint(path, {"models": models.state_dict(), "optimizer": opt.state_dict(), "step": step})
    state = {
        "text_encoder": models.text_encoder.state_dict(),
        "text_encoder_2": models.text_encoder_2.state_dict(),
        "eos_token_id": tokenizer.eos_token_id,
        "step": step,
        "done": True,
    }
    save_checkpoint(path, state)
    return state


def load_text_encoders(state: dict) -> tuple[CLIPTextModel, CLIPTextModel]:
    """The trained towers from a finished clip checkpoint, frozen, in eval mode."""
    towers = []
    for name, cfg in (("text_encoder", MINI.text_encoder), ("text_encoder_2", MINI.text_encoder_2)):
        model = CLIPTextModel(cfg, state["eos_token_id"])
        model.load_state_dict(state[name])
        towers.append(model.eval().requires_grad_(False))
    return towers[0], towers[1]
