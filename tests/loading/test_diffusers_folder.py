"""diffusers folders: configs -> spec, weight-file choice (variants, shards, pickles), and the written layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sdturbo
from sdturbo.loading import LoadError, read_folder_spec, save_diffusers_folder
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


def _edit_json(path: Path, **changes) -> None:
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not ABSENT}))


ABSENT = object()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "prediction_type",
            "v_prediction",
            (
                r"prediction_type 'v_prediction' is not implemented "
                r"\(sdturbo samples with prediction_type 'epsilon'\); "
                r"set \"prediction_type\": \"epsilon\" in the file"
            ),
        ),
        ("timestep_spacing", "leading", r"timestep_spacing 'leading' is not implemented; sdturbo's schedule= / --schedule"),
        ("timestep_spacing", "linspace", "timestep_spacing 'linspace' is not implemented"),
        ("beta_end", 0.02, r"beta_end 0.02 is not implemented .*set \"beta_end\": 0.012 in the file"),
        ("beta_start", 0.001, "beta_start 0.001 is not implemented"),
        ("num_train_timesteps", 500, "num_train_timesteps 500 is not implemented"),
        ("beta_schedule", "linear", "beta_schedule 'linear' is not implemented"),
        ("beta_schedule", ABSENT, r"beta_schedule 'linear' \(diffusers' default, the key is absent\) is not"),
        ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr True is not implemented"),
        ("use_karras_sigmas", True, "use_karras_sigmas True is not implemented"),
        ("_class_name", "EulerDiscreteScheduler", "_class_name 'EulerDiscreteScheduler' is not implemented"),
    ],
)
def test_scheduler_settings_sdturbo_does_not_implement_are_refused(tiny_folder, tmp_path, key, value, message):
    folder = shutil.copytree(tiny_folder, tmp_path / "other_scheduler")
    _edit_json(folder / "scheduler" / "scheduler_config.json", **{key: value})
    with pytest.raises(LoadError, match=r"scheduler/scheduler_config.json: " + message) as e:
        read_folder_spec(folder)
    assert "\n" not in str(e.value)


def test_scheduler_config_is_optional(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "no_scheduler")
    _edit_json(folder / "scheduler" / "scheduler_config.json", steps_offset=0, clip_sample=True)  # unused by Euler
    assert read_folder_spec(folder) == TINY
    shutil.rmtree(folder / "scheduler")
    assert read_folder_spec(folder) == TINY


@pytest.mark.parametrize(
    ("component", "key", "value", "message"),
    [
        ("vae", "scaling_factor", "0.5", r"vae/config.json: scaling_factor is '0.5', not a number; correct the value"),
        ("vae", "force_upcast", "false", "vae/config.json: force_upcast is 'false', not true or false"),
        ("unet", "sample_size", 8.0, "unet/config.json: sample_size is 8.0, not an integer"),
        ("unet", "cross_attention_dim", "192", "unet/config.json: cross_attention_dim is '192', not an integer"),
        ("unet", "block_out_channels", ["64", "128"], r"block_out_channels is \['64', '128'\], not an integer or a"),
        ("text_encoder", "num_hidden_layers", "3", "text_encoder/config.json: num_hidden_layers is '3', not an int"),
        ("text_encoder_2", "layer_norm_eps", None, "text_encoder_2/config.json: layer_norm_eps is None, not a number"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(tiny_folder, tmp_path, component, key, value, message):
    folder = shutil.copytree(tiny_folder, tmp_path / "typo")
    _edit_json(folder / component / "config.json", **{key: value})
    with pytest.raises(LoadError, match=message):
        read_folder_spec(folder)


def test_config_that_is_not_an_object_is_named(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "list")
    (folder / "scheduler" / "scheduler_config.json").write_text("[]")
    with pytest.raises(LoadError, match="scheduler_config.json holds a JSON list, not an object"):
        read_folder_spec(folder)


@pytest.mark.parametrize("shard", ["../../elsewhere/x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", ".."])
def test_shard_index_naming_files_outside_the_folder_is_refused(tmp_path, shard):
    folder = tmp_path / "vae"
    folder.mkdir()
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "a.safetensors", "b": shard}}))
    with pytest.raises(LoadError, match=f"index.json: weight_map names '{shard}'; shards must be plain file names in"):
        weight_files(folder, "diffusion_pytorch_model.safetensors", None)


def test_shard_index_without_a_weight_map_object_is_named(tmp_path):
    folder = _touch(tmp_path / "vae")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    for weight_map, kind in (["a.safetensors"], "list"), (None, "NoneType"):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(LoadError, match=f"weight_map is a {kind}, not an object mapping tensor names to shard"):
            weight_files(folder, "diffusion_pytorch_model.safetensors", None)


def test_other_variants_are_listed_with_how_to_load_them(tmp_path):
    unet = _touch(tmp_path / "unet", *(f"diffusion_pytorch_model.{v}.safetensors" for v in ("fp32", "ema")))
    with pytest.raises(LoadError) as e:
        weight_files(unet, "diffusion_pytorch_model.safetensors", "fp16")
    assert str(e.value).endswith(
        'has no weights: expected diffusion_pytorch_model.fp16.safetensors or diffusion_pytorch_model.safetensors; '
        'it has the ema, fp32 variant: pass variant="ema" to from_pretrained() or load_components() '
        '(the command line has no variant option: drop ".ema" from the file names)'
    )
    sharded = _touch(tmp_path / "vae", "diffusion_pytorch_model.safetensors.index.bf16.json")
    with pytest.raises(LoadError, match='it has the bf16 variant: pass variant="bf16"'):
        weight_files(sharded, "diffusion_pytorch_model.safetensors", None)


MINI = Path(sdturbo.__file__).parent / "assets" / "mini"


def token_ids(folder: Path) -> list[tuple[int, int, int]]:
    """(bos, eos, pad) of text_encoder/ and text_encoder_2/ config.json."""
    configs = [json.loads((folder / name / "config.json").read_text()) for name in ("text_encoder", "text_encoder_2")]
    return [(c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) for c in configs]


def test_text_configs_carry_the_tokenizers_ids(tiny_folder, tmp_path, tiny_state_dicts):
    """transformers pools at eos_token_id: a folder whose tokenizers are not CLIP's must say theirs."""
    assert token_ids(tiny_folder) == [(49406, 49407, 49407), (49406, 49407, 0)]
    tokenizers = (MINI / "tokenizer", MINI / "tokenizer_2")
    folder = save_diffusers_folder(tmp_path / "own_vocab", tiny_state_dicts, TINY, tokenizers)
    assert token_ids(folder) == [(601, 602, 602), (601, 602, 0)]


def test_shipped_mini_configs_carry_its_tokenizers_ids():
    assert token_ids(MINI) == [(601, 602, 602), (601, 602, 0)]


def test_tokenizer_json_only_folders_are_saved_with_the_model(tmp_path, tiny_state_dicts, tokenizer_folders):
    """transformers >= 5 saves a tokenizer as tokenizer.json alone: save_diffusers_folder must ship that file."""
    transformers = pytest.importorskip("transformers")
    from sdturbo.loading import load_components

    json_only = []
    for folder in tokenizer_folders:
        target = tmp_path / "json_only" / folder.name
        transformers.CLIPTokenizerFast.from_pretrained(folder).save_pretrained(target)
        for legacy in ("vocab.json", "merges.txt"):
            (target / legacy).unlink(missing_ok=True)
        json_only.append(target)
    saved = save_diffusers_folder(tmp_path / "model", tiny_state_dicts, TINY, tokenizer_folders=tuple(json_only))
    assert (saved / "tokenizer" / "tokenizer.json").is_file()
    assert load_components(saved).tokenizer("a red circle")[0, :4].tolist() == [49406, 320, 736, 7117]
