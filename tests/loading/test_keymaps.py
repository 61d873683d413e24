"""sgm <-> diffusers key maps: total and shape-exact for the official sizes, value-exact on tiny random weights, and
equal to diffusers' own single-file conversion."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_checkpoints import ODD, build_models, random_state_dicts

from sdturbo.loading import LoadError, diffusers_to_sgm, sgm_to_diffusers
from sdturbo.loading.keymaps import COMPONENTS, IGNORED_SGM_KEYS, unmapped_sgm_keys
from sdturbo.models.configs import SDXL_TURBO, TINY
from sdturbo.models.unet import unet_config_to_diffusers
from sdturbo.models.vae import vae_config_to_diffusers


def shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in state_dict.items()}


@pytest.fixture(scope="module")
def official_meta() -> dict[str, dict[str, torch.Tensor]]:
    """The official SDXL-Turbo state dicts as meta tensors: all shapes, no memory."""
    return {name: model.state_dict() for name, model in build_models(SDXL_TURBO, device="meta").items()}


@pytest.fixture(scope="module")
def official_sgm(official_meta) -> dict[str, torch.Tensor]:
    return diffusers_to_sgm(official_meta, SDXL_TURBO)


def test_official_round_trip_is_identity_with_equal_shapes(official_meta, official_sgm):
    back = sgm_to_diffusers(official_sgm, SDXL_TURBO)
    for name in COMPONENTS:
        assert shapes(back[name]) == shapes(official_meta[name]), name


def test_official_sgm_keys_match_spec_8_2(official_sgm):
    # 1680 UNet + 248 VAE + 196 CLIP-L + 389 bigG (q/k/v fused: 517 - 32 * 4) = 2513, before the ignorable buffers
    assert len(official_sgm) == 2513
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight": (5120, 640),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.2.weight": (640, 2560),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.emb_layers.1.weight": (320, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight": (1280, 5120),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
        "first_stage_model.encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    }
    assert {k: tuple(official_sgm[k].shape) for k in expected} == expected
    assert not any("decoder.up.0.upsample" in k or "encoder.down.3.downsample" in k for k in official_sgm)


def test_every_official_sgm_key_maps_and_buffers_are_ignored(official_sgm):
    buffers = {k: torch.zeros(1) for k in IGNORED_SGM_KEYS}
    assert unmapped_sgm_keys([*official_sgm, *buffers], SDXL_TURBO) == []
    back = sgm_to_diffusers({**official_sgm, **buffers}, SDXL_TURBO)
    assert sum(len(sd) for sd in back.values()) == 1680 + 196 + 517 + 248


@pytest.fixture(scope="module")
def odd_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    return random_state_dicts(ODD)


def test_unmapped_sgm_keys_are_named(tiny_state_dicts):
    state_dict = diffusers_to_sgm(tiny_state_dicts, TINY)
    extra = [
        "model.diffusion_model.input_blocks.99.0.in_layers.0.weight",  # beyond TINY's 9 input blocks
        "model.diffusion_model.input_blocks.1.0.in_layers.7.weight",  # not a ResBlock part
        "first_stage_model.encoder.mid.attn_1.qkv.weight",
        "conditioner.embedders.1.model.transformer.resblocks.3.ln_1.weight",  # TINY's bigG has 3 layers
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",  # an SD1 prefix
    ]
    assert unmapped_sgm_keys([*state_dict, *extra], TINY) == extra
    with pytest.raises(LoadError, match="5 keys belong to no SDXL component") as e:
        sgm_to_diffusers({**state_dict, **{k: torch.zeros(1) for k in extra}}, TINY)
    assert all(k in str(e.value) for k in extra)


LAYOUTS = pytest.mark.parametrize(
    "spec, weights", [(TINY, "tiny_state_dicts"), (ODD, "odd_state_dicts")], ids=["tiny", "odd-layout"]
)


@LAYOUTS
def test_values_survive_both_directions(spec, weights, request):
    state_dicts = request.getfixturevalue(weights)
    sgm = diffusers_to_sgm(state_dicts, spec)
    back = sgm_to_diffusers(sgm, spec)
    for name in COMPONENTS:
        assert back[name].keys() == state_dicts[name].keys()
        assert all(torch.equal(back[name][k], t) for k, t in state_dicts[name].items()), name
    again = diffusers_to_sgm(back, spec)
    assert again.keys() == sgm.keys() and all(torch.equal(again[k], t) for k, t in sgm.items())


def test_fused_qkv_and_projection_layout(tiny_state_dicts):
    state_dicts = tiny_state_dicts
    te2 = state_dicts["text_encoder_2"]
    sgm = diffusers_to_sgm(state_dicts, TINY)
    prefix = "conditioner.embedders.1.model."
    fused = sgm[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    layer = "text_model.encoder.layers.1.self_attn."
    expected = torch.cat([te2[layer + f"{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(fused, expected)
    assert torch.equal(sgm[prefix + "text_projection"], te2["text_projection.weight"].T)
    q = sgm["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert torch.equal(q[:, :, 0, 0], state_dicts["vae"]["decoder.mid_block.attentions.0.to_q.weight"])


def test_incomplete_fused_tensor_is_refused(tiny_state_dicts):
    state_dicts = {**tiny_state_dicts, "text_encoder_2": dict(tiny_state_dicts["text_encoder_2"])}
    del state_dicts["text_encoder_2"]["text_model.encoder.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(LoadError, match=r"incomplete \[conditioner.embedders.1.model.transformer.resblocks.0.attn"):
        diffusers_to_sgm(state_dicts, TINY)


@LAYOUTS
def test_matches_diffusers_single_file_conversion(spec, weights, request):
    """diffusers' own converters, run on our sgm dict, must give back exactly our diffusers-named tensors."""
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    state_dicts = request.getfixturevalue(weights)
    sgm = diffusers_to_sgm(state_dicts, spec)
    unet = utils.convert_ldm_unet_checkpoint(sgm, unet_config_to_diffusers(spec.unet))
    vae = utils.convert_ldm_vae_checkpoint(sgm, vae_config_to_diffusers(spec.vae))
    clip_l = utils.convert_ldm_clip_checkpoint(sgm)
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=spec.text_encoder_2.hidden_size))
    big_g = utils.convert_open_clip_checkpoint(text_model, sgm, prefix="conditioner.embedders.1.model.")
    reference = {"unet": unet, "text_encoder": clip_l, "text_encoder_2": big_g, "vae": vae}
    for name in COMPONENTS:
        assert reference[name].keys() == state_dicts[name].keys(), name
        assert all(torch.equal(reference[name][k], t) for k, t in state_dicts[name].items()), name
