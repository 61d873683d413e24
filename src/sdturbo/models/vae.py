"""SDXL KL autoencoder: Encoder, Decoder, AutoencoderKL.encode / .decode.

Attribute names follow diffusers' AutoencoderKL, so a diffusers `vae/` folder loads through an identity key map.
All GroupNorms use eps 1e-6 (the UNet's use 1e-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdturbo.models.configs import VAEConfig
from sdturbo.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D

NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp

# diffusers' VAE `sample_size` only sizes its tiles when tiling is on; sdturbo never tiles, so the value is just
# carried through to keep the official config.json unchanged.
DIFFUSERS_SAMPLE_SIZE = 1024


class MidAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual (diffusers' VAE attention).

    One head of width C gives SDPA's default scale C^-0.5."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, None, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        out = super().forward(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution (diffusers' UNetMidBlock2D without time embedding)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, NORM_EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


def resnet_stack(in_channels: int, out_channels: int, num_layers: int, groups: int) -> nn.ModuleList:
    """ResBlocks where only the first changes the channel count."""
    return nn.ModuleList(
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, NORM_EPS)
        for i in range(num_layers)
    )


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups)
        # The VAE pads right/bottom only before its stride-2 conv (sgm and diffusers agree; the UNet pads all sides).
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, pad_symmetric=False)] if add_downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class Encoder(nn.Module):
    """image [B, in, H, W] -> moments [B, 2*latent, H/f, W/f] (mean then logvar), f = cfg.downscale_factor."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(chs[max(i - 1, 0)], ch, cfg.layers_per_block, groups, add_downsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.mid_block = MidBlock(chs[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(image)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """z [B, latent, h, w] -> image [B, out, h*f, w*f]. Up levels run from the widest channels to the narrowest,
    each with one more ResBlock than the encoder's levels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], groups)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(chs[max(i - 1, 0)], ch, cfg.layers_per_block + 1, groups, add_upsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The SDXL VAE. Latents here are unscaled: the pipeline multiplies by cfg.scaling_factor after encode and
    divides before decode. encode/decode cast their input to the weights' dtype and return that dtype, so the
    pipeline picks the VAE's precision by moving the module (see vae_compute_dtype)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, in, H, W] in [-1, 1] -> (mean, logvar), each [B, latent, H/f, W/f]; logvar clamped to [-30, 20]."""
        moments = self.quant_conv(self.encoder(image.to(self.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent, h, w] (unscaled) -> image [B, out, h*f, w*f], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mean + std * noise, in diffusers' op order. The caller draws noise (shape of mean) from its generator,
    so the RNG sequence can match diffusers' (posterior sample first, then add_noise, then the sampler)."""
    std = torch.exp(0.5 * logvar)
    return mean + std * noise


def vae_compute_dtype(
    model_dtype: torch.dtype, device: torch.device | str, force_upcast: bool, requested: torch.dtype | None = None
) -> torch.dtype:
    """The dtype to run the VAE in when the rest of the model runs in model_dtype, or the caller's `requested` one.

    The SDXL VAE overflows in fp16 (inf/NaN -> black images). With force_upcast, fp16 becomes bf16, which has fp32's
    range, where the device runs it natively, and fp32 elsewhere. Note diffusers upcasts to fp32, so its fp16
    pipeline's images need requested=float32 here (bf16 rounding moves pixels by up to ~0.1 of the [-1, 1] range;
    BENCHMARKS.md, Exactness); an fp16 request for such a VAE is refused rather than drawing black images."""
    if requested is not None:
        if requested == torch.float16 and force_upcast:
            raise ValueError("vae_dtype fp16 overflows in this VAE (its config sets force_upcast): use bf16 or fp32")
        return requested
    if model_dtype != torch.float16 or not force_upcast:
        return model_dtype
    return torch.bfloat16 if supports_bf16(torch.device(device)) else torch.float32


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        # Pre-Ampere GPUs only emulate bf16 (slowly); fp32 is the better fallback there.
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def vae_config_from_diffusers(config_json: dict) -> VAEConfig:
    """diffusers' vae/config.json -> VAEConfig. Rejects options this architecture does not implement."""
    check_diffusers_options(config_json)
    return VAEConfig(
        in_channels=config_json["in_channels"],
        out_channels=config_json["out_channels"],
        latent_channels=config_json["latent_channels"],
        block_out_channels=tuple(config_json["block_out_channels"]),
        layers_per_block=config_json["layers_per_block"],
        norm_num_groups=config_json["norm_num_groups"],
        scaling_factor=config_json["scaling_factor"],
        force_upcast=config_json.get("force_upcast", True),
    )


def check_diffusers_options(config_json: dict) -> None:
    levels = len(config_json["block_out_channels"])
    # The only values this architecture implements. A missing key means diffusers' default, which is the same.
    supported = {
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "act_fn": "silu",
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
    }
    for key, want in supported.items():
        got = config_json.get(key, want)
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise ValueError(f"unsupported VAE config: {key}={got!r}, expected {want!r}")


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """VAEConfig -> keyword arguments of diffusers' AutoencoderKL (the official config.json without `_` keys)."""
    levels = len(cfg.block_out_channels)
    return {
        "act_fn": "silu",
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": cfg.force_upcast,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "out_channels": cfg.out_channels,
        "sample_size": DIFFUSERS_SAMPLE_SIZE,
        "scaling_factor": cfg.scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }
