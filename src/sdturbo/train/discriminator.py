"""ADD's projected discriminator (spec-add §5): a frozen DINOv2 ViT, features tapped at several blocks, one trainable
head per tap, projection-conditioned on a text embedding and on the CLS embedding of the real image.

Details the ADD paper leaves to StyleGAN-T follow stylegan-t `networks/discriminator.py` (spec-add §5.2): taps at
blocks 2, 5, 8, 11 plus the patch embedding, CLS added to every token, heads of spectral-normalised 1-D convs with
local batch norm, cmap_dim 64, DiffAugment (color, translation, cutout), random crop with probability 0.5, area
resize to the ViT resolution, ImageNet normalisation.

Randomness (augmentation, crops) comes only from the torch.Generator passed in, so a training step is a function of
its seed and can be replayed after a resume."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..models.vit import DINOV2_VITL14, DINOV2_VITS14, TINY_VIT, ViT, ViTConfig, imagenet_normalize

AUGMENTATIONS = ("color", "translation", "cutout")


@dataclass(frozen=True)
class DiscriminatorConfig:
    feature_net: ViTConfig  # frozen feature network F (DINOv2 ViT-S/14 for SDXL)
    image_net: ViTConfig  # frozen network whose CLS of the real image is c_img (DINOv2 ViT-L/14 for SDXL)
    input_size_px: int  # images reach the ViTs at this size (224 -> 16 x 16 tokens at patch 14)
    hook_blocks: tuple[int, ...]  # 0-based blocks whose outputs feed a head
    hook_patch_embed: bool  # one more head on the embeddings output (patch tokens + CLS + positions)
    c_text_dim: int  # width of the text embedding c_text
    cmap_dim: int  # projection width of each head
    virtual_batch_size: int  # BatchNormLocal group size
    crop_probability: float  # chance of a random crop instead of a resize when the image is larger than the input
    augment: tuple[str, ...]  # DiffAugment policies, a subset of AUGMENTATIONS

    def __post_init__(self):
        if self.input_size_px % self.feature_net.patch_size or self.input_size_px % self.image_net.patch_size:
            raise ValueError(f"input_size_px {self.input_size_px} must be a multiple of the ViTs' patch sizes")
        if self.hook_blocks and max(self.hook_blocks) >= self.feature_net.num_layers:
            raise ValueError(f"hook_blocks {self.hook_blocks} exceed the {self.feature_net.num_layers} ViT blocks")
        unknown = set(self.augment) - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}; choose from {AUGMENTATIONS}")

    @property
    def num_heads(self) -> int:
        return len(self.hook_blocks) + int(self.hook_patch_embed)


DISCRIMINATOR_SDXL = DiscriminatorConfig(
    feature_net=DINOV2_VITS14,
    image_net=DINOV2_VITL14,
    input_size_px=224,
    hook_blocks=(2, 5, 8, 11),
    hook_patch_embed=True,
    c_text_dim=1280,  # pooled embedding of SDXL's second text encoder (spec-add §12 "form of c_text")
    cmap_dim=64,
    virtual_batch_size=8,
    crop_probability=0.5,
    augment=AUGMENTATIONS,
)
DISCRIMINATOR_TINY = DiscriminatorConfig(
    feature_net=TINY_VIT,
    image_net=TINY_VIT,
    input_size_px=56,
    hook_blocks=(1, 3),
    hook_patch_embed=True,
    c_text_dim=128,  # TINY text_encoder_2 projection_dim
    cmap_dim=64,
    virtual_batch_size=8,
    crop_probability=0.5,
    augment=AUGMENTATIONS,
)


# DiffAugment (Zhao et al. 2020, arXiv 2006.10738): differentiable, per-sample random, applied to real and fake alike.


def _uniform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One U[0, 1) draw per sample, [B, 1, 1, 1], drawn on the CPU so streams do not depend on the device."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=generator).to(x)


def augment_color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness ±0.5, saturation x[0, 2], contrast x[0.5, 1.5]."""
    x = x + (_uniform(x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean


def augment_translation(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio * size pixels, filling with zeros (mid-grey in [-1, 1])."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b, 1), generator=generator).to(x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (b, 1), generator=generator).to(x.device)
    # Index into a 1-pixel zero border: source positions outside the image land on it.
    rows = (torch.arange(h, device=x.device)[None] + dy + 1).clamp(0, h + 1)  # [B, H]
    cols = (torch.arange(w, device=x.device)[None] + dx + 1).clamp(0, w + 1)  # [B, W]
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment_cutout(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero a (ratio * H) x (ratio * W) rectangle per image at a random centre (clipped at the borders)."""
    b, _, h, w = x.shape
    cut_h, cut_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - cut_h % 2), (b, 1, 1), generator=generator).to(x.device)
    cx = torch.randint(0, w + (1 - cut_w % 2), (b, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    top, left = cy - cut_h // 2, cx - cut_w // 2
    inside = (rows >= top) & (rows < top + cut_h) & (cols >= left) & (cols < left + cut_w)
    return x * (~inside).to(x.dtype)[:, None]


def diff_augment(x: torch.Tensor, policies: tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    """Apply the named augmentations in the order given (x in [-1, 1], [B, 3, H, W])."""
    ops = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}
    for name in policies:
        x = ops[name](x, generator)
    return x


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One size x size crop at a random offset, shared by the whole batch (as torchvision's RandomCrop)."""
    top = int(torch.randint(0, x.shape[-2] - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, x.shape[-1] - size + 1, (1,), generator=generator))
    return x[..., top : top + size, left : left + size]


class BatchNormLocal(nn.Module):
    """Batch norm over groups of `virtual_batch_size` samples (and all tokens), without running statistics, so the
    statistics do not depend on the global batch size (StyleGAN-T)."""

    def __init__(self, channels: int, virtual_batch_size: int, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch_size = virtual_batch_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, N]
        groups = []
        for group in x.split(self.virtual_batch_size):
            mean = group.mean(dim=(0, 2), keepdim=True)
            var = group.var(dim=(0, 2), keepdim=True, unbiased=False)
            groups.append((group - mean) / torch.sqrt(var + self.eps))
        return torch.cat(groups) * self.weight[None, :, None] + self.bias[None, :, None]


def conv_block(channels: int, kernel_size: int, virtual_batch_size: int) -> nn.Sequential:
    """Spectral-normalised 1-D conv (circular padding) -> BatchNormLocal -> LeakyReLU(0.2)."""
    conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.Sequential(
        spectral_norm(conv, eps=1e-12), BatchNormLocal(channels, virtual_batch_size), nn.LeakyReLU(0.2)
    )


class ResidualBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.block(x) + x) / math.sqrt(2)


class DiscriminatorHead(nn.Module):
    """Token features [B, C, N] and a condition [B, c_dim] -> one logit per token [B, N].

    Projection conditioning (Miyato & Koyama 2018): the token embedding is dotted with a linear map of the condition,
    scaled by 1 / sqrt(cmap_dim)."""

    def __init__(self, channels: int, c_dim: int, cmap_dim: int, virtual_batch_size: int):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.main = nn.Sequential(
            conv_block(channels, 1, virtual_batch_size), ResidualBlock(conv_block(channels, 9, virtual_batch_size))
        )
        self.cls = spectral_norm(nn.Conv1d(channels, cmap_dim, 1), eps=1e-12)
        self.cmapper = nn.Linear(c_dim, cmap_dim)

    def forward(self, features: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.cls(self.main(features))  # [B, cmap_dim, N]
        cmap = self.cmapper(c)[:, :, None]  # [B, cmap_dim, 1]
        return (out * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)


class ProjectedDiscriminator(nn.Module):
    """D(image; c_text, c_img) = per-head token logits of trainable heads on frozen ViT features.

    The steps are separate methods so the training loop can take R1 with respect to the head inputs:
        features = disc.features(image, generator)          # frozen network, the heads' inputs
        logits = disc.heads_logits(features, c_text, c_img)  # trainable heads
    forward() chains both and returns the two."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_net = ViT(cfg.feature_net).requires_grad_(False)
        self.image_net = ViT(cfg.image_net).requires_grad_(False)
        c_dim = cfg.c_text_dim + cfg.image_net.hidden_size
        self.heads = nn.ModuleList(
            DiscriminatorHead(cfg.feature_net.hidden_size, c_dim, cfg.cmap_dim, cfg.virtual_batch_size)
            for _ in range(cfg.num_heads)
        )

    def vit_input(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """[-1, 1] image -> [0, 1] -> random crop (with a generator, if larger, with crop_probability) -> area resize
        to input_size_px -> ImageNet normalisation."""
        x = (image + 1) / 2
        size = self.cfg.input_size_px
        if generator is not None and x.shape[-1] > size and x.shape[-2] > size:
            if float(torch.rand((), generator=generator)) < self.cfg.crop_probability:
                x = random_crop(x, size, generator)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area")
        return imagenet_normalize(x)

    @torch.no_grad()
    def image_condition(self, image: torch.Tensor) -> torch.Tensor:
        """c_img: CLS embedding of the real image x0 [B, image_net.hidden_size], no augmentation, no gradient."""
        return self.image_net(self.vit_input(image, generator=None))

    def features(self, image: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The heads' inputs F_k(image): [B, C, N] per head, the CLS token added to every patch token (StyleGAN-T
        AddReadout).

        Gradient flows to `image` (the student's decoded output) but never into the frozen ViT."""
        x = self.vit_input(diff_augment(image, self.cfg.augment, generator), generator)
        depth = max(self.cfg.hook_blocks, default=-1) + 1
        states = self.feature_net.hidden_states(x, depth)
        taps = ([states[0]] if self.cfg.hook_patch_embed else []) + [states[i + 1] for i in self.cfg.hook_blocks]
        return [(tokens[:, 1:] + tokens[:, :1]).transpose(1, 2) for tokens in taps]

    def heads_logits(
        self, features: list[torch.Tensor], c_text: torch.Tensor, c_img: torch.Tensor
    ) -> list[torch.Tensor]:
        c = torch.cat([c_text, c_img], dim=-1).to(features[0].dtype)
        return [head(f, c) for head, f in zip(self.heads, features, strict=True)]

    def forward(
        self, image: torch.Tensor, c_text: torch.Tensor, c_img: torch.Tensor, generator: torch.Generator
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(logits per head [B, N], head inputs per head [B, C, N])."""
        features = self.features(image, generator)
        return self.heads_logits(features, c_text, c_img), features
