"""SDXL UNet: spatial transformers, down/mid/up blocks, and the time + added-condition (y) embedding.

Module names follow diffusers' UNet2DConditionModel, so a diffusers `unet/` folder loads by identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import UNetConfig
from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, timestep_embedding

RESNET_EPS = 1e-5
TRANSFORMER_NORM_EPS = 1e-6  # the GroupNorm in front of each spatial transformer
LAYER_NORM_EPS = 1e-5
NUM_TIME_IDS = 6  # orig_h, orig_w, crop_top, crop_left, target_h, target_w


def time_ids_embedding(time_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoid of each size/crop condition, flattened in order: [B, 6] -> [B, 6 * dim] float32."""
    b = time_ids.shape[0]
    return timestep_embedding(time_ids.flatten(), dim).reshape(b, -1)


def make_y(pooled: torch.Tensor, time_ids: torch.Tensor, cfg: UNetConfig) -> torch.Tensor:
    """The UNet's vector condition y = concat(pooled text embedding, time-id sinusoids): [B, adm_in_channels]."""
    time_embeds = time_ids_embedding(time_ids, cfg.addition_time_embed_dim).to(pooled.dtype)
    y = torch.cat([pooled, time_embeds], dim=-1)  # [B, adm_in_channels]
    if y.shape[-1] != cfg.adm_in_channels:
        raise ValueError(
            f"pooled width {pooled.shape[-1]} + {time_embeds.shape[-1]} time-id features = {y.shape[-1]}, "
            f"but the UNet expects adm_in_channels {cfg.adm_in_channels}"
        )
    return y


class GEGLU(nn.Module):
    """Linear to twice the width; the first half is the value, the second half the (exact-GELU) gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is diffusers' dropout slot: keeping it makes the output projection load as `ff.net.2`.
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text context, then GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        heads = dim // head_dim
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, None, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Spatial transformer with linear in/out projections (diffusers Transformer2DModel, use_linear_projection=True)."""

    def __init__(self, channels: int, depth: int, context_dim: int, head_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, context_dim, head_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, h*w, C], row-major over h then w
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


class TimestepEmbedding(nn.Module):
    """Linear, SiLU, Linear: the MLP for both the timestep sinusoid and the vector condition y."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _resnet(in_ch: int, out_ch: int, cfg: UNetConfig) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, cfg.time_embed_dim, cfg.norm_num_groups, RESNET_EPS)


def _transformer(channels: int, depth: int, cfg: UNetConfig) -> Transformer2D:
    return Transformer2D(channels, depth, cfg.context_dim, cfg.head_dim, cfg.norm_num_groups)


class DownBlock(nn.Module):
    """One encoder level: ResBlocks, each followed by a spatial transformer when depth > 0, then an optional
    stride-2 downsample. With depth 0 it has diffusers DownBlock2D's keys, otherwise CrossAttnDownBlock2D's."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, depth: int, add_downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([_resnet(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n)])
        self.attentions = nn.ModuleList([_transformer(out_ch, depth, cfg) for _ in range(n if depth else 0)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, pad_symmetric=True)] if add_downsample else [])

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the output and the skip tensors it pushes: one per ResBlock and one after the downsample."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsample in self.downsamplers:
            x = downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResBlock, spatial transformer, ResBlock at the lowest resolution (diffusers UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, cfg: UNetConfig, depth: int):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, cfg) for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(channels, depth, cfg)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """One decoder level: ResBlocks that each take (hidden, skip) concatenated on channels, each followed by a
    spatial transformer when depth > 0, then an optional nearest-x2 upsample."""

    def __init__(
        self, in_ch: int, out_ch: int, skip_channels: list[int], cfg: UNetConfig, depth: int, add_upsample: bool
    ):
        super().__init__()
        # skip_channels is in push order; the block consumes the skips last pushed first.
        self.resnets = nn.ModuleList(
            [
                _resnet((in_ch if i == 0 else out_ch) + skip_ch, out_ch, cfg)
                for i, skip_ch in enumerate(reversed(skip_channels))
            ]
        )
        n_attn = len(skip_channels) if depth else 0
        self.attentions = nn.ModuleList([_transformer(out_ch, depth, cfg) for _ in range(n_attn)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
        upsample_size: torch.Size | None,
    ) -> torch.Tensor:
        """skips: this block's skip tensors in push order (it consumes them last first).
        upsample_size: spatial size of the next level's skips, the upsample's exact target."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            x = resnet(torch.cat([x, skip], dim=1), emb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsample in self.upsamplers:
            x = upsample(x, upsample_size)
        return x


class UNet(nn.Module):
    """SDXL UNet predicting eps from a latent x, a timestep t, the text context and the vector condition y."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.transformer_depth[-1] == 0:
            raise ValueError(
                f"the mid block always has attention: transformer_depth {cfg.transformer_depth} must end above 0"
            )
        self.cfg = cfg
        channels = cfg.block_out_channels
        levels = len(channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], cfg.time_embed_dim)
        self.add_embedding = TimestepEmbedding(cfg.adm_in_channels, cfg.time_embed_dim)

        skip_channels = [channels[0]]  # channels of every tensor pushed on the skip stack, in push order
        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            is_last = i == levels - 1
            in_ch = channels[max(i - 1, 0)]
            depth = cfg.transformer_depth[i]
            self.down_blocks.append(DownBlock(in_ch, channels[i], cfg, depth, add_downsample=not is_last))
            skip_channels += [channels[i]] * (cfg.layers_per_block + (0 if is_last else 1))

        self.mid_block = MidBlock(channels[-1], cfg, cfg.transformer_depth[-1])

        self.up_blocks = nn.ModuleList()
        in_ch = channels[-1]
        for i in reversed(range(levels)):
            n = cfg.layers_per_block + 1
            block_skips, skip_channels = skip_channels[-n:], skip_channels[:-n]
            depth = cfg.transformer_depth[i]
            self.up_blocks.append(UpBlock(in_ch, channels[i], block_skips, cfg, depth, add_upsample=i > 0))
            in_ch = channels[i]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """x [B, in_ch, h, w] latent; t [B] or a scalar timestep (float, 0..999); context [B, 77, context_dim];
        y [B, adm_in_channels] from make_y. Returns eps [B, out_ch, h, w]."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        # The sinusoid is computed in fp32 and cast, as diffusers does, so fp32 runs match it bit for bit.
        t_emb = timestep_embedding(t, self.cfg.block_out_channels[0]).to(x.dtype)
        emb = self.time_embedding(t_emb) + self.add_embedding(y.to(x.dtype))  # [B, time_embed_dim]

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips
        x = self.mid_block(x, emb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsampling to the next skip's exact size (not a blind x2) lets latents that are not multiples of
            # 2^(levels-1) work, like diffusers' forward_upsample_size; for multiples both give the same result.
            upsample_size = skips[-1].shape[-2:] if skips else None
            x = block(x, emb, context, block_skips, upsample_size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# Fields of diffusers' config.json that fix parts of the architecture this UNet hard-codes.
_DIFFUSERS_FIXED = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "attention_type": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "use_linear_projection": True,
}


def _per_level(value: int | list[int], levels: int, name: str) -> list[int]:
    """diffusers lets several fields be one int for all levels or a list with one entry per level."""
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels:
        raise ValueError(f"{name} {value} has {len(values)} entries for {levels} levels")
    return values


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """A diffusers UNet2DConditionModel config.json (as a dict) -> UNetConfig.

    Raises ValueError for architectures this UNet does not implement."""
    for key, value in _DIFFUSERS_FIXED.items():
        if key in config and config[key] != value:
            raise ValueError(f"unsupported UNet config: {key} = {config[key]!r} (only {value!r} is implemented)")
    channels = list(config["block_out_channels"])
    levels = len(channels)
    down_types = list(config["down_block_types"])
    if any(t not in ("DownBlock2D", "CrossAttnDownBlock2D") for t in down_types):
        raise ValueError(f"unsupported down_block_types {down_types}")
    expected_up = [t.replace("Down", "Up") for t in reversed(down_types)]
    if list(config["up_block_types"]) != expected_up:
        raise ValueError(f"up_block_types {config['up_block_types']} do not mirror down_block_types {down_types}")
    has_attention = [t == "CrossAttnDownBlock2D" for t in down_types]

    layers = _per_level(config["layers_per_block"], levels, "layers_per_block")
    if len(set(layers)) != 1:
        raise ValueError(f"layers_per_block {layers} must be the same at every level")
    depths = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    if not has_attention[-1]:
        raise ValueError("the last level must have cross-attention: the mid block reuses its transformer depth")
    # Quirk: with num_attention_heads null, diffusers reads attention_head_dim as the number of heads.
    heads = _per_level(config.get("num_attention_heads") or config["attention_head_dim"], levels, "attention heads")
    head_dims = {ch // h for ch, h, attends in zip(channels, heads, has_attention) if attends}
    if len(head_dims) != 1:
        raise ValueError(f"heads {heads} for channels {channels} give different head sizes {sorted(head_dims)}")

    return UNetConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=tuple(channels),
        transformer_depth=tuple(d if attends else 0 for d, attends in zip(depths, has_attention)),
        layers_per_block=layers[0],
        head_dim=head_dims.pop(),
        context_dim=config["cross_attention_dim"],
        addition_time_embed_dim=config["addition_time_embed_dim"],
        adm_in_channels=config["projection_class_embeddings_input_dim"],
        norm_num_groups=config["norm_num_groups"],
        sample_size=config["sample_size"],
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """UNetConfig -> a config.json dict for diffusers' UNet2DConditionModel with the same architecture and keys,
    laid out like the official sdxl-turbo unet/config.json."""
    down_types = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth]
    return {
        "_class_name": "UNet2DConditionModel",
        **_DIFFUSERS_FIXED,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        # diffusers' quirk: this field holds the number of heads per level.
        "attention_head_dim": [ch // cfg.head_dim for ch in cfg.block_out_channels],
        "block_out_channels": list(cfg.block_out_channels),
        "class_embeddings_concat": False,
        "cross_attention_dim": cfg.context_dim,
        "down_block_types": down_types,
        "dropout": 0.0,
        "in_channels": cfg.in_channels,
        "layers_per_block": cfg.layers_per_block,
        "mid_block_only_cross_attention": None,
        "norm_num_groups": cfg.norm_num_groups,
        "num_attention_heads": None,
        "out_channels": cfg.out_channels,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "sample_size": cfg.sample_size,
        # Levels without attention ignore their entry; SDXL writes 1 there.
        "transformer_layers_per_block": [d or 1 for d in cfg.transformer_depth],
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down_types)],
        "upcast_attention": None,
    }
