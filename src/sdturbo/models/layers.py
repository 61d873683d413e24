"""Layers shared by the UNet and the VAE. Attribute names follow diffusers so its folders load by identity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first, no frequency shift (diffusers flip_sin_to_cos=True, shift 0).

    t: [B] (any float or int dtype) -> [B, dim] float32. Computed in float32 whatever the model dtype,
    in the same op order as diffusers' get_timestep_embedding so fp32 results are bit-identical."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (to_q, to_k, to_v, to_out.0); self-attention when context is None."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, qkv_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, N, C], context: [B, M, Cc]
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (
            proj(inp).view(b, -1, self.heads, proj.out_features // self.heads).transpose(1, 2)
            for proj, inp in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * q.shape[-1])
        return self.to_out[0](out)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional time-embedding shift between (UNet) or none (VAE)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The UNet pads 1 on every side; the VAE pads only right and bottom (pad_symmetric=False)."""

    def __init__(self, channels: int, pad_symmetric: bool):
        super().__init__()
        self.pad_symmetric = pad_symmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1 if pad_symmetric else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad_symmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2 (or to an explicit size, for latents that are not multiples of the UNet's stride), then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
