"""diffusers folders: configs -> spec, weight-file choice (variants, shards, pickles), and the written layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdturbo.loading import LoadError, read_folder_spec
from sdturbo.loading.diffusers_folder import read_component, weight_files, with_variant
from sdturbo.models.configs import TINY


def test_written_layout_is_the_official_one(tiny_folder):
    files = {str(p.relative_to(tiny_folder)) for p in tiny_folder.rglob("*") if p.is_file()}
    tokenizer_files = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert files == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        *(f"{folder}/{name}" for folder in ("tokenizer", "tokenizer_2") for name in tokenizer_files),
    }
    scheduler = json.loads((tiny_folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing"


def test_spec_round_trips_through_config_files(tiny_folder):
    assert read_folder_spec(tiny_folder) == TINY


def test_model_index_without_second_text_encoder_is_refused(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "sd15")
    sd15_index = {"_class_name": "StableDiffusionPipeline", "unet": [], "vae": []}
    (folder / "model_index.json").write_text(json.dumps(sd15_index))
    with pytest.raises(LoadError, match="describes a StableDiffusionPipeline without text_encoder, text_encoder_2"):
        read_folder_spec(folder)


def test_unsupported_config_is_named(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "odd")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "time_embedding_type": "fourier"}))
    with pytest.raises(LoadError, match=r"unet/config.json is not a supported SDXL config: ValueError: .*time_embedding"):
        read_folder_spec(folder)


def test_variant_names():
    assert with_variant("model.safetensors", "fp16") == "model.fp16.safetensors"
    assert with_variant("model.safetensors.index.json", "fp16") == "model.safetensors.index.fp16.json"
    assert with_variant("model.safetensors", None) == "model.safetensors"


def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_variant_choice_prefers_then_falls_back(tmp_path):
    both = _touch(tmp_path / "both", "model.safetensors", "model.fp16.safetensors")
    assert weight_files(both, "model.safetensors", "fp16") == [both / "model.fp16.safetensors"]
    assert weight_files(both, "model.safetensors", None) == [both / "model.safetensors"]
    plain = _touch(tmp_path / "plain", "model.safetensors")
    assert weight_files(plain, "model.safetensors", "fp16") == [plain / "model.safetensors"]
    half = _touch(tmp_path / "half", "model.fp16.safetensors")
    assert weight_files(half, "model.safetensors", None) == [half / "model.fp16.safetensors"]


def test_pickle_weights_are_refused_with_the_conversion(tmp_path):
    unet = _touch(tmp_path / "unet", "diffusion_pytorch_model.bin")
    with pytest.raises(LoadError) as e:
        weight_files(unet, "diffusion_pytorch_model.safetensors", "fp16")
    message = str(e.value)
    assert "\n" not in message
    assert "diffusion_pytorch_model.bin is a pickle file, which sdturbo does not load" in message
    assert "torch.load(" in message and "weights_only=True" in message and "save_file(" in message


def test_missing_weights_and_folders_are_named(tmp_path):
    empty = _touch(tmp_path / "vae")
    with pytest.raises(LoadError, match=r"has no weights: expected diffusion_pytorch_model.fp16.safetensors or "):
        weight_files(empty, "diffusion_pytorch_model.safetensors", "fp16")
    with pytest.raises(LoadError, match=r"nowhere is missing: not a diffusers SDXL folder"):
        weight_files(tmp_path / "nowhere", "model.safetensors", None)
    with pytest.raises(LoadError, match=r"unet/config.json is missing: not a diffusers SDXL folder"):
        read_folder_spec(tmp_path)


def test_sharded_weights_are_read_from_the_index(tmp_path, tiny_state_dicts):
    vae = tiny_state_dicts["vae"]
    keys = sorted(vae)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    folder = tmp_path / "vae"
    folder.mkdir()
    for shard, shard_keys in halves.items():
        save_file({k: vae[k] for k in shard_keys}, str(folder / shard))
    index = {"weight_map": {k: shard for shard, shard_keys in halves.items() for k in shard_keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    loaded = read_component(tmp_path, "vae", "fp16", torch.float16, "cpu")
    assert loaded.keys() == vae.keys()
    assert all(torch.equal(loaded[k], t.half()) for k, t in vae.items())


def test_diffusers_and_transformers_load_the_written_folder(tiny_folder, tiny_state_dicts):
    """Our configs and weight files are what the reference libraries expect: they load them strictly, unchanged."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    loaded = {
        "unet": diffusers.UNet2DConditionModel.from_pretrained(tiny_folder / "unet"),
        "vae": diffusers.AutoencoderKL.from_pretrained(tiny_folder / "vae"),
        "text_encoder": transformers.CLIPTextModel.from_pretrained(tiny_folder / "text_encoder"),
        "text_encoder_2": transformers.CLIPTextModelWithProjection.from_pretrained(tiny_folder / "text_encoder_2"),
    }
    for name, model in loaded.items():
        state_dict = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        ours = tiny_state_dicts[name]
        assert len(state_dict) == len(ours), name
        # transformers 5's CLIPTextModel has no text_model wrapper; its loader strips the files' "text_model." prefix
        assert all(torch.equal(t, ours[k if k in ours else f"text_model.{k}"]) for k, t in state_dict.items()), name
