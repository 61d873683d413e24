import dataclasses

import pytest
import torch

from sdturbo.models.configs import SDXL_TURBO, TINY, UNetConfig
from sdturbo.models.layers import timestep_embedding
from sdturbo.models.unet import (
    UNet,
    make_y,
    time_ids_embedding,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)

# Two levels, attention at level 0 too, one ResBlock per level, head size 32.
TWO_LEVELS = UNetConfig(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    transformer_depth=(1, 3),
    layers_per_block=1,
    head_dim=32,
    context_dim=48,
    addition_time_embed_dim=8,
    adm_in_channels=16 + 6 * 8,
    norm_num_groups=16,
    sample_size=8,
)
# Four levels with attention skipping a level, and unusual in/out channels: three upsamplers, so 9x10 and 8x12
# latents need diffusers' explicit upsample sizes.
FOUR_LEVELS = UNetConfig(
    in_channels=5,
    out_channels=3,
    block_out_channels=(32, 32, 64, 64),
    transformer_depth=(0, 1, 0, 2),
    layers_per_block=1,
    head_dim=32,
    context_dim=40,
    addition_time_embed_dim=6,
    adm_in_channels=24 + 6 * 6,
    norm_num_groups=32,
    sample_size=8,
)
SMALL_CONFIGS = {"tiny": TINY.unet, "two_levels": TWO_LEVELS, "four_levels": FOUR_LEVELS}

# stabilityai/sdxl-turbo unet/config.json (spec section 4.1).
OFFICIAL_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "attention_type": "default",
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_TURBO_PARAMS = 2_567_463_684


def make_inputs(cfg: UNetConfig, height: int, width: int, seed: int = 0):
    """Batch of 2 with a different timestep, prompt and size/crop condition per row."""
    g = torch.Generator().manual_seed(seed)
    pooled_dim = cfg.adm_in_channels - 6 * cfg.addition_time_embed_dim
    x = torch.randn(2, cfg.in_channels, height, width, generator=g)
    t = torch.tensor([999.0, 499.0])
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    pooled = torch.randn(2, pooled_dim, generator=g)
    time_ids = torch.tensor([[512, 512, 0, 0, 512, 512], [768, 1024, 16, 32, 512, 640]], dtype=torch.float32)
    return x, t, context, pooled, time_ids


# --- config conversion -------------------------------------------------------------------------------------------


def test_official_diffusers_config_maps_to_sdxl_turbo():
    assert unet_config_from_diffusers(OFFICIAL_CONFIG) == SDXL_TURBO.unet
    assert unet_config_to_diffusers(SDXL_TURBO.unet) == OFFICIAL_CONFIG


@pytest.mark.parametrize("cfg", [SDXL_TURBO.unet, *SMALL_CONFIGS.values()], ids=["sdxl-turbo", *SMALL_CONFIGS])
def test_config_round_trip(cfg):
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg


def test_config_from_diffusers_accepts_ints_and_num_attention_heads():
    config = {
        **OFFICIAL_CONFIG,
        "transformer_layers_per_block": 4,
        "attention_head_dim": 64,  # ignored once num_attention_heads is set
        "num_attention_heads": [5, 10, 20],
    }
    assert unet_config_from_diffusers(config) == dataclasses.replace(SDXL_TURBO.unet, transformer_depth=(0, 4, 4))


@pytest.mark.parametrize(
    "change",
    [
        {"use_linear_projection": False},
        {"addition_embed_type": None},
        {"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]},
        {"attention_head_dim": [5, 10, 10]},
        {"layers_per_block": [2, 2, 3]},
    ],
)
def test_config_from_diffusers_rejects_other_architectures(change):
    with pytest.raises(ValueError):
        unet_config_from_diffusers({**OFFICIAL_CONFIG, **change})


def test_mid_block_needs_attention():
    with pytest.raises(ValueError, match="mid block"):
        UNet(dataclasses.replace(TINY.unet, transformer_depth=(1, 1, 0)))


# --- conditioning ------------------------------------------------------------------------------------------------


def test_make_y_layout():
    cfg = TINY.unet
    _, _, _, pooled, time_ids = make_inputs(cfg, 8, 8)
    y = make_y(pooled, time_ids, cfg)
    dim = cfg.addition_time_embed_dim
    assert y.shape == (2, cfg.adm_in_channels)
    assert torch.equal(y[:, : pooled.shape[1]], pooled)
    for k in range(6):
        start = pooled.shape[1] + k * dim
        assert torch.equal(y[:, start : start + dim], timestep_embedding(time_ids[:, k], dim))
    with pytest.raises(ValueError, match="adm_in_channels"):
        make_y(pooled[:, 1:], time_ids, cfg)


@pytest.mark.parity
@pytest.mark.parametrize("dim", [320, 256, 33])
def test_sinusoids_match_diffusers_bit_exactly(dim):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.cat([torch.arange(1000.0), torch.tensor([0.5, 499.25, 1024.0, 2048.0])])
    ref = embeddings.get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, dim), ref)

    time_ids = make_inputs(TINY.unet, 8, 8)[4]
    add_time_proj = embeddings.Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(time_ids_embedding(time_ids, dim), add_time_proj(time_ids.flatten()).reshape(2, -1))


# --- model -------------------------------------------------------------------------------------------------------


def test_forward_shapes_scalar_timesteps_and_dtype():
    cfg = FOUR_LEVELS
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    x, _, context, pooled, time_ids = make_inputs(cfg, 9, 10)
    y = make_y(pooled, time_ids, cfg)
    with torch.no_grad():
        eps = unet(x, torch.tensor([499.0, 499.0]), context, y)
        assert eps.shape == (2, cfg.out_channels, 9, 10)
        assert torch.equal(unet(x, 499.0, context, y), eps)
        assert torch.equal(unet(x, torch.tensor(499.0), context, y), eps)
        eps_bf16 = unet.to(torch.bfloat16)(x.bfloat16(), 499.0, context.bfloat16(), y)
    assert eps_bf16.dtype == torch.bfloat16
    assert torch.isfinite(eps_bf16).all()


def test_sdxl_turbo_parameter_count():
    with torch.device("meta"):
        unet = UNet(SDXL_TURBO.unet)
    assert sum(p.numel() for p in unet.parameters()) == SDXL_TURBO_PARAMS


@pytest.mark.parity
def test_sdxl_turbo_keys_and_shapes_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = UNet(SDXL_TURBO.unet).state_dict()
        ref = diffusers.UNet2DConditionModel.from_config(OFFICIAL_CONFIG).state_dict()
    assert sorted(ours) == sorted(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.fixture(scope="module", params=list(SMALL_CONFIGS), ids=list(SMALL_CONFIGS))
def unet_pair(request):
    """(cfg, diffusers reference, ours) sharing the reference's random weights."""
    diffusers = pytest.importorskip("diffusers")
    cfg = SMALL_CONFIGS[request.param]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).eval()
    # Norms start at weight 1, bias 0; randomise them so a swapped or misplaced norm shows up in the output.
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ref, ours


@pytest.mark.parity
@pytest.mark.parametrize("height, width", [(8, 8), (8, 12), (9, 10)])
def test_eps_matches_diffusers(unet_pair, height, width):
    cfg, ref, ours = unet_pair
    x, t, context, pooled, time_ids = make_inputs(cfg, height, width)
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        eps = ours(x, t, context, make_y(pooled, time_ids, cfg))
    assert eps.shape == expected.shape
    torch.testing.assert_close(eps, expected, rtol=0, atol=1e-4)
