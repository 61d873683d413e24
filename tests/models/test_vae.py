"""AutoencoderKL: config conversion, dtype choice, and fp32 parity with diffusers' AutoencoderKL on random weights."""

import pytest
import torch

from sdturbo.models.configs import SDXL_TURBO, TINY, VAEConfig
from sdturbo.models.vae import (
    AutoencoderKL,
    sample_latent,
    vae_compute_dtype,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)

# stabilityai/sdxl-turbo vae/config.json (spec section 4.5).
OFFICIAL_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# A second shape family: 3 levels (downscale 4), 2 ResBlocks per encoder level, 16 groups.
SMALL = VAEConfig(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    norm_num_groups=16,
    scaling_factor=0.13025,
    force_upcast=True,
)

PARITY_TOL = 1e-4
IMAGE_SIZES = [(64, 64), (48, 64)]  # (H, W); the second is non-square


def test_config_round_trip():
    assert vae_config_from_diffusers(vae_config_to_diffusers(SDXL_TURBO.vae)) == SDXL_TURBO.vae


def test_official_json_gives_sdxl_turbo():
    assert vae_config_from_diffusers(OFFICIAL_JSON) == SDXL_TURBO.vae
    official_kwargs = {k: v for k, v in OFFICIAL_JSON.items() if not k.startswith("_")}
    assert vae_config_to_diffusers(SDXL_TURBO.vae) == official_kwargs


@pytest.mark.parametrize(
    "override", [{"act_fn": "relu"}, {"use_quant_conv": False}, {"shift_factor": 0.1159}, {"up_block_types": ["x"] * 4}]
)
def test_from_diffusers_rejects_unsupported_options(override):
    with pytest.raises(ValueError, match=next(iter(override))):
        vae_config_from_diffusers({**OFFICIAL_JSON, **override})


@pytest.mark.parametrize(
    "model_dtype, device, force_upcast, expected",
    [
        (torch.float16, "cpu", True, torch.bfloat16),
        (torch.float16, "cpu", False, torch.float16),
        (torch.float16, "mps", True, torch.float32),
        (torch.float32, "cpu", True, torch.float32),
        (torch.bfloat16, "cuda", True, torch.bfloat16),
    ],
)
def test_vae_compute_dtype(model_dtype, device, force_upcast, expected):
    assert vae_compute_dtype(model_dtype, device, force_upcast) == expected


@pytest.mark.parametrize("requested", [torch.float32, torch.bfloat16])
def test_vae_compute_dtype_honours_a_request(requested):
    assert vae_compute_dtype(torch.float16, "cpu", True, requested) == requested


def test_vae_compute_dtype_refuses_fp16_for_a_vae_that_overflows():
    with pytest.raises(ValueError, match="fp16 overflows"):
        vae_compute_dtype(torch.float32, "cpu", True, torch.float16)
    assert vae_compute_dtype(torch.float32, "cpu", False, torch.float16) == torch.float16


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_vae_compute_dtype_cuda_follows_bf16_support(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    assert vae_compute_dtype(torch.float16, torch.device("cuda", 0), force_upcast=True) == expected


def test_logvar_is_clamped():
    vae = AutoencoderKL(TINY.vae).eval()
    image = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        for bias, bound in ((1e4, 20.0), (-1e4, -30.0)):
            vae.quant_conv.bias[TINY.vae.latent_channels :] = bias
            _, logvar = vae.encode(image)
            assert torch.all(logvar == bound)


def test_input_is_cast_to_module_dtype():
    vae = AutoencoderKL(TINY.vae).eval().to(torch.bfloat16)
    with torch.no_grad():
        image = vae.decode(torch.randn(1, 4, 2, 3, dtype=torch.float16))
        mean, _ = vae.encode(image.float())
    assert image.shape == (1, 3, 16, 24) and image.dtype == mean.dtype == torch.bfloat16


def test_bf16_decode_close_to_fp32():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY.vae).eval()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z)
        out = vae.to(torch.bfloat16).decode(z).float()
    diff = (out - ref).abs()
    # bf16 keeps 8 mantissa bits; the relative error grows through the up blocks to ~2.5% on these random weights
    # (diffusers' own bf16 decode of the same weights is as far from fp32). It must never be inf/NaN.
    assert torch.isfinite(out).all()
    assert diff.max() <= 0.05 * ref.abs().max(), f"max {diff.max():.4f} vs range {ref.abs().max():.4f}"
    assert diff.mean() <= 0.04 * ref.abs().mean(), f"mean {diff.mean():.5f} vs {ref.abs().mean():.4f}"


# --- parity with diffusers ---------------------------------------------------------------------------------------


def diffusers_pair(cfg: VAEConfig):
    """diffusers' AutoencoderKL with random weights, and ours with the same weights loaded strictly."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**vae_config_to_diffusers(cfg)).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module", params=[TINY.vae, SMALL], ids=["tiny", "small"])
def pair(request):
    return request.param, *diffusers_pair(request.param)


@pytest.mark.parity
@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_encode_matches_diffusers(pair, size):
    cfg, ref, ours = pair
    image = torch.rand(2, cfg.in_channels, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(image).latent_dist
        mean, logvar = ours.encode(image)
    assert mean.shape == (2, cfg.latent_channels, size[0] // cfg.downscale_factor, size[1] // cfg.downscale_factor)
    torch.testing.assert_close(mean, posterior.mean, atol=PARITY_TOL, rtol=0)
    torch.testing.assert_close(logvar, posterior.logvar, atol=PARITY_TOL, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_decode_matches_diffusers(pair, size):
    cfg, ref, ours = pair
    latent_size = (size[0] // cfg.downscale_factor, size[1] // cfg.downscale_factor)
    z = torch.randn(2, cfg.latent_channels, *latent_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.decode(z).sample
        image = ours.decode(z)
    assert image.shape == (2, cfg.out_channels, *size)
    torch.testing.assert_close(image, expected, atol=PARITY_TOL, rtol=0)


@pytest.mark.parity
def test_sample_latent_matches_diffusers_posterior(pair):
    cfg, ref, ours = pair
    image = torch.rand(1, cfg.in_channels, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        mean, logvar = ours.encode(image)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample_latent(mean, logvar, noise), expected, atol=PARITY_TOL, rtol=0)


@pytest.mark.parity
def test_official_sizes_match_diffusers_on_meta():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**vae_config_to_diffusers(SDXL_TURBO.vae))
        ours = AutoencoderKL(SDXL_TURBO.vae)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes


def test_official_parameter_count():
    with torch.device("meta"):
        vae = AutoencoderKL(SDXL_TURBO.vae)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
