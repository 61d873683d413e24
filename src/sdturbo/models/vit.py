"""DINOv2 vision transformer: the frozen feature network of the ADD discriminator (spec-add §5).

Module names are those of the official Hugging Face checkpoints (facebook/dinov2-small, -large: model.safetensors,
saved by transformers' Dinov2Model before v5 renamed its attention modules), so those files load by identity;
only `embeddings.mask_token`, used by DINOv2's masked-image pretraining and never at inference, is dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNUSED_KEYS = ("embeddings.mask_token",)


@dataclass(frozen=True)
class ViTConfig:
    image_size: int  # pretraining resolution: fixes the position-embedding grid (518 px for DINOv2)
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # MLP width
    layer_norm_eps: float

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


DINOV2_VITS14 = ViTConfig(
    image_size=518, patch_size=14, hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536,
    layer_norm_eps=1e-6,
)
DINOV2_VITL14 = ViTConfig(
    image_size=518, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
    layer_norm_eps=1e-6,
)
# Test / sdturbo-mini size: patch 14 like DINOv2, 4 x 4 tokens at 56 px.
TINY_VIT = ViTConfig(
    image_size=56, patch_size=14, hidden_size=64, num_layers=4, num_heads=2, intermediate_size=128, layer_norm_eps=1e-6
)


def imagenet_normalize(image01: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> the ImageNet-standardised input DINOv2 was trained on."""
    mean = image01.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = image01.new_tensor(IMAGENET_STD)[None, :, None, None]
    return (image01 - mean) / std


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]


class Embeddings(nn.Module):
    """Patch tokens with a CLS token in front, plus position embeddings resized to the input's patch grid."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.grid_size**2 + 1, cfg.hidden_size))
        self.patch_embeddings = PatchEmbeddings(cfg)

    def position_embeddings_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Bicubic resize of the pretrained grid, in float32, as transformers' Dinov2Embeddings does (DINOv2 was
        trained at 518 px; the discriminator runs it at 224 px, spec-add §5.2)."""
        pos = self.position_embeddings
        if (grid_h, grid_w) == (self.cfg.grid_size, self.cfg.grid_size):
            return pos
        n, d = self.cfg.grid_size, pos.shape[-1]
        grid = pos[:, 1:].reshape(1, n, n, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        tokens = self.patch_embeddings(pixel_values.to(self.cls_token.dtype))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)  # [B, 1 + N, D]
        p = self.cfg.patch_size
        return tokens + self.position_embeddings_for(h // p, w // p)


class SelfAttentionProjections(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)


class AttentionOutput(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.attention = SelfAttentionProjections(cfg.hidden_size)
        self.output = AttentionOutput(cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            proj(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.attention.query, self.attention.key, self.attention.value)
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.output.dense(out)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm block with layer scale on both residual branches."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = SelfAttention(cfg)
        self.layer_scale1 = LayerScale(cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_scale2 = LayerScale(cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))


class ViT(nn.Module):
    """DINOv2 ViT. Inputs are ImageNet-normalised pixels (imagenet_normalize) whose sides are multiples of the patch."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """[embeddings output, block 0 output, ..., block depth-1 output], each [B, 1 + N, D] with CLS first.

        Stops after `depth` blocks, so the discriminator does not run blocks past its last tap."""
        x = self.embeddings(pixel_values)
        states = [x]
        for layer in self.encoder.layer[: self.cfg.num_layers if depth is None else depth]:
            x = layer(x)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The final-norm CLS embedding [B, D] (transformers' pooler_output): ADD's image condition c_img."""
        return self.layernorm(self.hidden_states(pixel_values)[-1][:, 0])


def load_vit(path: str, cfg: ViTConfig, device: torch.device | str = "cpu") -> ViT:
    """A ViT with the weights of an official DINOv2 model.safetensors (Hugging Face layout), loaded strictly."""
    state = load_file(path, device=str(device))
    for key in UNUSED_KEYS:
        state.pop(key, None)
    with torch.device("meta"):
        model = ViT(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
