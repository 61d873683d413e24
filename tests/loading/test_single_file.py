"""sgm single files: architecture from shapes alone, writing, and the errors for bad files."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import ODD, build_models

from sdturbo.loading import LoadError, diffusers_to_sgm, infer_spec
from sdturbo.loading.single_file import SAMPLE_SIZE_KEY, read_header, read_tensors, spec_metadata
from sdturbo.models.configs import SDXL_TURBO, TINY


def sgm_meta(spec) -> dict[str, torch.Tensor]:
    return diffusers_to_sgm({n: m.state_dict() for n, m in build_models(spec, device="meta").items()}, spec)


def test_infers_sdxl_turbo_from_official_shapes():
    assert infer_spec(sgm_meta(SDXL_TURBO)) == SDXL_TURBO


def test_infers_tiny_and_odd_layouts():
    assert infer_spec(sgm_meta(TINY), {SAMPLE_SIZE_KEY: "8"}) == TINY
    assert infer_spec(sgm_meta(ODD), {SAMPLE_SIZE_KEY: "8"}) == ODD
    # without our metadata the default latent size is SDXL-Turbo's
    assert infer_spec(sgm_meta(TINY)) == dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, sample_size=64))


def test_infer_spec_takes_plain_shapes():
    shapes = {k: tuple(t.shape) for k, t in sgm_meta(TINY).items()}
    assert infer_spec(shapes, {SAMPLE_SIZE_KEY: "8"}) == TINY


def test_not_sdxl_is_refused():
    sd15_like = {k: t for k, t in sgm_meta(TINY).items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(LoadError, match=r"not an SDXL single file: no tensors under conditioner\.embedders\.1\."):
        infer_spec(sd15_like)
    no_label_emb = {k: t for k, t in sgm_meta(TINY).items() if "label_emb.0.0" not in k}
    with pytest.raises(LoadError, match="tensor label_emb.0.0.weight is missing"):
        infer_spec(no_label_emb)


def test_saved_file_has_sgm_keys_and_sample_size(tiny_single_file, tiny_state_dicts):
    shapes, metadata = read_header(tiny_single_file)
    assert metadata[SAMPLE_SIZE_KEY] == "8"
    assert infer_spec(shapes, metadata) == TINY
    expected = diffusers_to_sgm(tiny_state_dicts, TINY)
    assert shapes == {k: tuple(t.shape) for k, t in expected.items()}
    key = "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"
    assert torch.equal(read_tensors(tiny_single_file, [key], None, "cpu")[key], expected[key])


def test_read_tensors_casts_one_by_one(tiny_single_file):
    keys = ["model.diffusion_model.out.2.weight", "first_stage_model.quant_conv.bias"]
    tensors = read_tensors(tiny_single_file, keys, torch.bfloat16, "cpu")
    assert [t.dtype for t in tensors.values()] == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("cut", [0, 7, 1000, -5], ids=["empty", "header-cut", "mid-header", "data-cut"])
def test_truncated_file_says_corrupt(tiny_single_file, tmp_path, cut):
    data = tiny_single_file.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[:cut])
    with pytest.raises(LoadError, match=r"weights file .*broken\.safetensors is corrupt or truncated \(.*\); re-download"):
        read_header(broken)


def test_metadata_records_what_shapes_cannot_tell():
    """sgm files keep these in a yaml config, not in the weights: ours carry them, so a round trip keeps the spec."""
    spec = dataclasses.replace(
        TINY,
        unet=dataclasses.replace(TINY.unet, sample_size=12, head_dim=32),
        text_encoder=dataclasses.replace(TINY.text_encoder, num_heads=2, hidden_act="gelu", layer_norm_eps=1e-6),
        text_encoder_2=dataclasses.replace(TINY.text_encoder_2, hidden_act="quick_gelu"),
        vae=dataclasses.replace(TINY.vae, scaling_factor=0.42469173669815063, force_upcast=False),
    )
    metadata = spec_metadata(spec)
    assert metadata[SAMPLE_SIZE_KEY] == "12"  # the key files written before the others keep working
    assert infer_spec(sgm_meta(spec), metadata) == spec
    # an official file has none of it: SDXL-Turbo's values
    assert infer_spec(sgm_meta(spec)).vae == dataclasses.replace(spec.vae, scaling_factor=0.13025, force_upcast=True)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sdturbo.vae.scaling_factor", '"0.5"', r"sdturbo.vae.scaling_factor = '\"0.5\"' is not a number"),
        ("sdturbo.vae.force_upcast", "1", "sdturbo.vae.force_upcast = '1' is not true or false"),
        ("sdturbo.sample_size", "8.5", "sdturbo.sample_size = '8.5' is not an integer"),
        ("sdturbo.text_encoder.num_heads", "3", "metadata does not fit the tensors: hidden_size 64 is not divisible"),
    ],
)
def test_bad_metadata_is_named(key, value, message):
    with pytest.raises(LoadError, match=message):
        infer_spec(sgm_meta(TINY), {key: value})


def test_integer_tensor_is_refused_with_file_key_and_dtype(tiny_single_file, tmp_path):
    tensors = load_file(tiny_single_file)
    key = "model.diffusion_model.out.2.weight"
    tensors[key] = tensors[key].to(torch.int32)
    path = tmp_path / "ints.safetensors"
    save_file(tensors, path)
    with pytest.raises(LoadError) as e:
        read_tensors(path, [key], torch.float16, "cpu")
    assert str(e.value).startswith(f"{path}: tensor {key} is torch.int32, but every weight sdturbo loads is floating")
