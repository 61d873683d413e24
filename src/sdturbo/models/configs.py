"""Architecture configs: sizes only. One dataclass per model; the official sizes and the tiny test sizes
are presets of the same classes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]  # channels per resolution level
    transformer_depth: tuple[int, ...]  # transformer blocks per attention layer at each level; 0 = no attention
    layers_per_block: int  # ResBlocks per down level (up levels have one more)
    head_dim: int  # attention head size; heads = channels // head_dim (64 in SDXL)
    context_dim: int  # cross-attention context width (TE1 hidden + TE2 hidden)
    addition_time_embed_dim: int  # sinusoid width of each of the 6 size/crop conditions
    adm_in_channels: int  # width of y = pooled text embedding + 6 * addition_time_embed_dim
    norm_num_groups: int
    sample_size: int  # default latent size (64 -> 512 px)

    def __post_init__(self):
        if len(self.block_out_channels) != len(self.transformer_depth):
            raise ValueError(
                f"block_out_channels {self.block_out_channels} and transformer_depth {self.transformer_depth} "
                "must have one entry per level"
            )
        for ch in self.block_out_channels:
            if ch % self.head_dim or ch % self.norm_num_groups:
                raise ValueError(f"channels {ch} must be divisible by head_dim {self.head_dim} and groups {self.norm_num_groups}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    hidden_act: str  # "quick_gelu" (CLIP ViT-L) or "gelu" (OpenCLIP bigG)
    layer_norm_eps: float
    projection_dim: int | None  # TE2 projects the pooled EOS token; None = no projection (TE1)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} must be 'quick_gelu' or 'gelu'")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int  # ResBlocks per encoder level (decoder levels have one more)
    norm_num_groups: int
    scaling_factor: float
    force_upcast: bool  # the weights overflow in fp16: decode in bf16/fp32 instead

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class ModelSpec:
    unet: UNetConfig
    text_encoder: TextEncoderConfig
    text_encoder_2: TextEncoderConfig
    vae: VAEConfig

    def __post_init__(self):
        """The components must fit each other as in SDXL's text-to-image pipeline (an inpainting UNet, for one,
        takes 9 channels: latents, mask and masked image)."""
        unet, latent = self.unet, self.vae.latent_channels
        if unet.in_channels != latent or unet.out_channels != latent:
            raise ValueError(
                f"the UNet takes {unet.in_channels} and predicts {unet.out_channels} channels, the VAE's latents have "
                f"{latent}: not a text-to-image SDXL UNet (inpainting and other conditioned UNets are not supported)"
            )
        widths = (self.text_encoder.hidden_size, self.text_encoder_2.hidden_size)
        if unet.context_dim != sum(widths):
            raise ValueError(
                f"the UNet's cross-attention width {unet.context_dim} is not the text encoders' {widths[0]} + "
                f"{widths[1]}"
            )
        pooled = self.text_encoder_2.projection_dim
        if pooled is None or unet.adm_in_channels != pooled + 6 * unet.addition_time_embed_dim:
            raise ValueError(
                f"the UNet's added-condition width {unet.adm_in_channels} is not the second text encoder's pooled "
                f"width {pooled} + 6 x {unet.addition_time_embed_dim}"
            )


SDXL_TURBO = ModelSpec(
    unet=UNetConfig(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        transformer_depth=(0, 2, 10),
        layers_per_block=2,
        head_dim=64,
        context_dim=2048,
        addition_time_embed_dim=256,
        adm_in_channels=2816,
        norm_num_groups=32,
        sample_size=64,
    ),
    text_encoder=TextEncoderConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_layers=12,
        num_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=None,
    ),
    text_encoder_2=TextEncoderConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_layers=32,
        num_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1280,
    ),
    vae=VAEConfig(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        scaling_factor=0.13025,
        force_upcast=True,
    ),
)

# Small sizes for tests: same code paths (3 UNet levels, attention at levels 1-2, 4 VAE levels, head dim 64),
# a few seconds per pipeline call on a CPU.
TINY = ModelSpec(
    unet=UNetConfig(
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        transformer_depth=(0, 1, 2),
        layers_per_block=2,
        head_dim=64,
        context_dim=64 + 128,
        addition_time_embed_dim=32,
        adm_in_channels=128 + 6 * 32,
        norm_num_groups=32,
        sample_size=8,
    ),
    text_encoder=TextEncoderConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_layers=3,
        num_heads=1,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=None,
    ),
    text_encoder_2=TextEncoderConfig(
        vocab_size=49408,
        hidden_size=128,
        intermediate_size=256,
        num_layers=3,
        num_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=128,
    ),
    vae=VAEConfig(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=32,
        scaling_factor=0.13025,
        force_upcast=True,
    ),
)

PRESETS: dict[str, ModelSpec] = {"sdxl-turbo": SDXL_TURBO, "tiny": TINY}
