"""CLIP text encoders: transformers' state dict layout and outputs on identical random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fixtures import CLIP_BPE_GZ, write_clip_tokenizer_folder
from sdturbo.models.clip import (
    CLIPTextModel,
    eos_positions,
    text_config_from_transformers,
    text_config_to_transformers,
)
from sdturbo.models.configs import SDXL_TURBO, TINY, TextEncoderConfig
from sdturbo.tokenizer import CLIPTokenizer

PARITY_TOL = 1e-5

# text_encoder/config.json and text_encoder_2/config.json of stabilityai/sdxl-turbo (spec 4.2, 4.3).
OFFICIAL_TE1_JSON = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "float16", "vocab_size": 49408,
}  # fmt: skip
OFFICIAL_TE2_JSON = {
    **OFFICIAL_TE1_JSON, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "projection_dim": 1280,
}  # fmt: skip

# A second small size: head dim 32, a projection narrower than the width, and (below) a small vocab whose eos id
# is not 49407.
SMALL_VOCAB_MERGES = 1000
SMALL_TE = TextEncoderConfig(
    vocab_size=512 + SMALL_VOCAB_MERGES + 2, hidden_size=96, intermediate_size=160, num_layers=4, num_heads=3,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=48,
)  # fmt: skip

SMALL_LOW_EOS_ID = 7  # not 2: transformers reads eos_token_id 2 as the legacy "pool at argmax" flag

PROMPTS = [
    "a photo of a cat",
    "Hello! World!! a!b",  # tokenizer_2 turns every "!" into id 0, its pad id
    "",
    "a literal <|endoftext|> before the end",  # the first eos is not the appended one
    "a " * 75,  # no padding at all
]


def transformers_keys(model) -> dict[str, torch.Size]:
    """transformers 5 drops the `text_model.` prefix from CLIPTextModel's own keys (it re-adds it when loading old
    checkpoints); diffusers folders and this package keep it."""
    return {
        key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": value.shape
        for key, value in model.state_dict().items()
    }


def transformers_state_dict(model) -> dict[str, torch.Tensor]:
    return {key: value for key, value in zip(transformers_keys(model), model.state_dict().values())}


def build_transformers(cfg: TextEncoderConfig, eos_token_id: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        **text_config_to_transformers(cfg, cfg.projection_dim is not None, eos_token_id=eos_token_id)
    )
    config._attn_implementation = "eager"  # the plain-math reference
    cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
    return cls(config).eval()


@pytest.fixture(scope="module")
def token_ids(tokenizer_folders, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Real tokenizer output: padded with 49407 (tokenizer), with 0 (tokenizer_2), and with a small vocab's ids."""
    small = write_clip_tokenizer_folder(tmp_path_factory.mktemp("small_vocab"), "!", num_merges=SMALL_VOCAB_MERGES)
    ids = {name: CLIPTokenizer.from_folder(folder)(PROMPTS) for name, folder in
           (("tokenizer", tokenizer_folders[0]), ("tokenizer_2", tokenizer_folders[1]), ("small", small))}  # fmt: skip
    # A vocab whose eos is not its largest id (a trainer may put special tokens first): argmax(ids) would be wrong.
    ids["small_low_eos"] = ids["small"].masked_fill(ids["small"] == 1513, SMALL_LOW_EOS_ID)
    return ids


PARITY_CASES = {
    # name: (config, token ids, eos id the model pools at, eos id in the transformers config)
    "tiny_te1": (TINY.text_encoder, "tokenizer", 49407, 49407),
    "tiny_te2": (TINY.text_encoder_2, "tokenizer_2", 49407, 49407),
    "tiny_te2_te1_ids": (TINY.text_encoder_2, "tokenizer", 49407, 49407),
    # the official configs' legacy eos id 2 makes transformers pool at argmax(ids): the same positions
    "tiny_te2_legacy_eos": (TINY.text_encoder_2, "tokenizer_2", 49407, 2),
    "small_vocab": (SMALL_TE, "small", 1513, 1513),
    "small_vocab_no_projection": (dataclasses.replace(SMALL_TE, projection_dim=None), "small", 1513, 1513),
    "small_vocab_low_eos": (SMALL_TE, "small_low_eos", SMALL_LOW_EOS_ID, SMALL_LOW_EOS_ID),
}


@pytest.mark.parity
@pytest.mark.skipif(CLIP_BPE_GZ is None, reason="open_clip's CLIP BPE merges file is not installed")
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_matches_transformers(case, token_ids):
    cfg, ids_name, eos_token_id, reference_eos_token_id = PARITY_CASES[case]
    ids = token_ids[ids_name]
    torch.manual_seed(0)
    reference = build_transformers(cfg, reference_eos_token_id)
    with torch.no_grad():
        # Move every weight off its init value (LayerNorms start at 1 / 0) so swapped names cannot agree.
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model = CLIPTextModel(cfg, eos_token_id=eos_token_id).eval()
    model.load_state_dict(transformers_state_dict(reference), strict=True)

    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        hidden, pooled = model(ids)

    assert hidden.shape == (len(PROMPTS), 77, cfg.hidden_size)
    assert (hidden - expected.hidden_states[-2]).abs().max() <= PARITY_TOL
    if cfg.projection_dim is None:
        assert pooled is None
    else:
        assert pooled.shape == (len(PROMPTS), cfg.projection_dim)
        assert (pooled - expected.text_embeds).abs().max() <= PARITY_TOL


@pytest.mark.parametrize("cfg", [SDXL_TURBO.text_encoder, SDXL_TURBO.text_encoder_2], ids=["te1", "te2"])
def test_official_keys_and_shapes_match_transformers(cfg):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(**text_config_to_transformers(cfg, cfg.projection_dim is not None))
    cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
    with torch.device("meta"):
        reference = cls(config)
        model = CLIPTextModel(cfg)
    assert {key: value.shape for key, value in model.state_dict().items()} == transformers_keys(reference)


@pytest.mark.parametrize(
    ("cfg", "count"), [(SDXL_TURBO.text_encoder, 123_060_480), (SDXL_TURBO.text_encoder_2, 694_659_840)]
)
def test_official_parameter_counts(cfg, count):
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    assert sum(param.numel() for param in model.parameters()) == count
    assert not list(model.buffers())  # no position_ids buffer to load or save


def test_config_from_official_json():
    assert text_config_from_transformers(OFFICIAL_TE1_JSON) == SDXL_TURBO.text_encoder
    assert text_config_from_transformers(OFFICIAL_TE2_JSON) == SDXL_TURBO.text_encoder_2


@pytest.mark.parametrize(
    ("cfg", "official"),
    [(SDXL_TURBO.text_encoder, OFFICIAL_TE1_JSON), (SDXL_TURBO.text_encoder_2, OFFICIAL_TE2_JSON)],
    ids=["te1", "te2"],
)
def test_config_to_transformers_round_trips(cfg, official):
    converted = text_config_to_transformers(cfg, with_projection=cfg.projection_dim is not None)
    assert text_config_from_transformers(converted) == cfg
    shared = set(converted) - {"eos_token_id"}  # the official files carry the legacy eos id 2
    assert {key: converted[key] for key in shared} == {key: official[key] for key in shared}
    transformers = pytest.importorskip("transformers")
    assert transformers.CLIPTextConfig(**converted).num_hidden_layers == cfg.num_layers


def test_projection_needs_projection_dim():
    with pytest.raises(ValueError, match="projection_dim"):
        text_config_to_transformers(SDXL_TURBO.text_encoder, with_projection=True)


def test_eos_position_is_the_first_eos():
    ids = torch.tensor([[49406, 320, 49407, 49407, 49407], [49406, 49407, 5, 49407, 0], [7, 3, 1, 1, 1]])
    assert eos_positions(ids, 49407).tolist() == [2, 1, 0]
    assert eos_positions(ids, 1).tolist() == [0, 0, 2]  # a small vocab whose eos is not its largest id


def test_te1_never_runs_its_last_layer():
    model = CLIPTextModel(TINY.text_encoder)

    def fail(*_):
        raise AssertionError("the last layer ran")

    model.text_model.encoder.layers[-1].register_forward_pre_hook(fail)
    hidden, pooled = model(torch.zeros(2, 77, dtype=torch.long))
    assert hidden.shape == (2, 77, TINY.text_encoder.hidden_size) and pooled is None
