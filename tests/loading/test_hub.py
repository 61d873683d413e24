"""Hub ids, offline only: a cold cache gives a LoadError that says what to download; a filled cache loads."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from sdturbo.loading import LoadError, load_components
from sdturbo.loading.hub import CONFIG_FILES, TOKENIZER_PATTERNS, weight_patterns
from sdturbo.loading.keymaps import COMPONENTS
from sdturbo.models.configs import TINY

# stabilityai/sdxl-turbo's files (spec 8.1), plus the ONNX exports some revisions carry
SDXL_TURBO_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    *(
        f"{d}/{f}"
        for d in ("tokenizer", "tokenizer_2")
        for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
    ),
    *(
        f"{c}/{f}"
        for c in ("text_encoder", "text_encoder_2")
        for f in ("config.json", "model.safetensors", "model.fp16.safetensors", "model.onnx")
    ),
    *(
        f"{c}/{f}"
        for c in ("unet", "vae")
        for f in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    ),
    "unet/model.onnx",
    "unet/model.onnx_data",
    "vae_decoder/model.onnx",
    "vae_encoder/model.onnx",
    "sd_xl_turbo_1.0.safetensors",
    "sd_xl_turbo_1.0_fp16.safetensors",
]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE with an empty HF_HOME; any socket connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time, so patch the module too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize("variant", ["fp16", None])
def test_only_the_needed_files_are_requested(variant):
    patterns = CONFIG_FILES + TOKENIZER_PATTERNS + weight_patterns(list(COMPONENTS), variant)
    chosen = set(filter_repo_objects(SDXL_TURBO_FILES, allow_patterns=patterns))
    infix = ".fp16" if variant else ""
    weights = {
        f"unet/diffusion_pytorch_model{infix}.safetensors",
        f"vae/diffusion_pytorch_model{infix}.safetensors",
        f"text_encoder/model{infix}.safetensors",
        f"text_encoder_2/model{infix}.safetensors",
    }
    assert chosen == {f for f in SDXL_TURBO_FILES if f.endswith(".json") or f.endswith(".txt")} | weights


def test_cold_cache_offline_says_what_to_download(offline_hub):
    with pytest.raises(LoadError) as e:
        load_components("stabilityai/sdxl-turbo")
    message = str(e.value)
    assert "\n" not in message
    assert f"stabilityai/sdxl-turbo is not in the Hugging Face cache ({offline_hub})" in message
    assert "`hf download stabilityai/sdxl-turbo --include 'model_index.json'" in message
    assert "'unet/diffusion_pytorch_model.fp16.safetensors'" in message and "'tokenizer_2/*'" in message
    assert "with `--local-dir DIR` pass DIR instead), or pass a local diffusers folder" in message


def test_single_file_without_tokenizer_offline_names_the_tokenizer_files(offline_hub, tiny_single_file):
    with pytest.raises(LoadError, match=r"--include 'tokenizer/\*' 'tokenizer_2/\*'`.*or pass tokenizer= a folder"):
        load_components(tiny_single_file)


def test_cached_snapshot_loads_offline(offline_hub, tiny_folder, tiny_state_dicts):
    """A cache laid out like huggingface_hub's own (refs/main -> snapshots/<commit>/...), holding only plain
    weights: the default fp16 variant falls back to them without any network."""
    repo = offline_hub / "models--org--tiny-sdxl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    c = load_components("org/tiny-sdxl", dtype=torch.float16)
    assert c.spec == TINY and c.name == "org/tiny-sdxl"
    assert torch.equal(c.vae.decoder.conv_out.weight, tiny_state_dicts["vae"]["decoder.conv_out.weight"].half())
    assert c.tokenizer_2("a")[0, -1].item() == 0


def test_tokenizer_repo_with_only_tokenizer_json(offline_hub, tiny_single_file, tokenizer_folders):
    """transformers >= 5 saves a tokenizer as tokenizer.json alone: such a repository serves as tokenizer= too."""
    transformers = pytest.importorskip("transformers")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = offline_hub / "models--org--tok-only" / "snapshots" / commit
    for folder, name in zip(tokenizer_folders, ("tokenizer", "tokenizer_2")):
        transformers.CLIPTokenizerFast.from_pretrained(folder).save_pretrained(snapshot / name)
        for legacy in ("vocab.json", "merges.txt"):
            (snapshot / name / legacy).unlink(missing_ok=True)
        assert (snapshot / name / "tokenizer.json").is_file()
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    c = load_components(tiny_single_file, tokenizer="org/tok-only")
    assert c.tokenizer("a red circle")[0, :4].tolist() == [49406, 320, 736, 7117]


def test_a_path_like_id_says_it_is_no_local_folder_either(offline_hub):
    with pytest.raises(LoadError, match=r"^models/my-sdxl is no local folder or file; as a Hugging Face model id: "):
        load_components("models/my-sdxl")
