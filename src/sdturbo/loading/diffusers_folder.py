"""A diffusers pipeline folder laid out like stabilityai/sdxl-turbo (spec 8.1): read its configs into a ModelSpec and
its weights into state dicts, or write one. Weight names are sdturbo's own, so no key map is involved."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..models.clip import EOS_TOKEN_ID, text_config_from_transformers, text_config_to_transformers
from ..models.configs import SDXL_TURBO, ModelSpec
from ..models.unet import unet_config_from_diffusers, unet_config_to_diffusers
from ..models.vae import vae_config_from_diffusers, vae_config_to_diffusers
from ..sampling import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS
from ..tokenizer import CLIPTokenizer
from .keymaps import COMPONENTS, IGNORED_DIFFUSERS_KEYS, LoadError, StateDict
from .single_file import (
    is_like,
    is_pickle_name,
    kind_of,
    read_header,
    read_tensors,
    refuse_pickle,
    save_tensors,
    state_dict_of,
)

WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
LEGACY_EOS_TOKEN_ID = 2  # the official configs' eos_token_id: transformers then pools at argmax(ids), CLIP's eos

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "feature_extractor": [None, None],
    "force_zeros_for_empty_prompt": True,
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {  # spec 6.2: sdxl-turbo's scheduler_config.json after the Hub's "correct scheduler" fix
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "beta_start": BETA_START,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
# What a scheduler_config.json may say, as (the value sdturbo's sampler implements, diffusers' default when the key is
# absent). timestep_spacing is sdturbo's schedule= argument instead ("trailing" or "substep").
SCHEDULER_SUPPORT = {
    "_class_name": ("EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteScheduler"),
    "num_train_timesteps": (NUM_TRAIN_TIMESTEPS, 1000),
    "beta_start": (BETA_START, 0.0001),
    "beta_end": (BETA_END, 0.02),
    "beta_schedule": ("scaled_linear", "linear"),
    "trained_betas": (None, None),
    "prediction_type": ("epsilon", "epsilon"),
    "timestep_spacing": ("trailing", "linspace"),
    "rescale_betas_zero_snr": (False, False),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
}
# config.json keys of the spec fields named otherwise, and those that hold a number or a list of one per level
PER_LEVEL_KEYS = ("attention_head_dim", "layers_per_block")
CONFIG_KEYS = {
    "context_dim": "cross_attention_dim",
    "adm_in_channels": "projection_class_embeddings_input_dim",
    "transformer_depth": "transformer_layers_per_block",
    "head_dim": "attention_head_dim",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise LoadError(f"{path} is missing: not a diffusers SDXL folder (expected the stabilityai/sdxl-turbo layout)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path} holds a JSON {type(data).__name__}, not an object of settings")
    return data


def _check_model_index(folder: Path) -> None:
    """model_index.json is optional, but when present it must describe a pipeline with SDXL's two text towers."""
    path = folder / "model_index.json"
    if not path.exists():
        return
    index = read_json(path)
    absent = [c for c in COMPONENTS if c not in index]
    if absent:
        pipeline = index.get("_class_name", "pipeline")
        raise LoadError(f"{path} describes a {pipeline} without {', '.join(absent)}: not SDXL")


def _check_scheduler(folder: Path) -> None:
    """scheduler/scheduler_config.json is optional, but what it says must be what sdturbo samples with."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.exists():
        return
    config = read_json(path)
    for key, (supported, default) in SCHEDULER_SUPPORT.items():
        value = config.get(key, default)
        if value == supported:
            continue
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:36]}..."  # trained_betas: 1000 numbers
        said = f"{key} {shown}" + ("" if key in config else " (diffusers' default, the key is absent)")
        if key == "timestep_spacing":
            raise LoadError(
                f"{path}: {said} is not implemented; sdturbo's schedule= / --schedule picks the spacing ('trailing', "
                "the default, or 'substep'): set \"timestep_spacing\": \"trailing\" in the file"
            )
        raise LoadError(
            f"{path}: {said} is not implemented (sdturbo samples with {key} {supported!r}); "
            f"set \"{key}\": {json.dumps(supported)} in the file if the model was trained that way"
        )


def _check_types(path: Path, config: dict, preset) -> None:
    """Every number (and string, flag) the spec takes from config.json has the JSON type it needs (that of the
    preset's field): "0.5" for a number would otherwise load and fail at the first generation."""
    for field, like in vars(preset).items():
        key = CONFIG_KEYS.get(field, field)
        like = [like] if key in PER_LEVEL_KEYS else like
        if key in config and not is_like(config[key], like):
            raise LoadError(f"{path}: {key} is {config[key]!r}, not {kind_of(like)}; correct the value in the file")


def read_folder_spec(folder: str | Path) -> ModelSpec:
    """The architecture from unet/, text_encoder/, text_encoder_2/ and vae/ config.json; scheduler/ must describe
    sdturbo's sampler."""
    folder = Path(folder)
    _check_model_index(folder)
    _check_scheduler(folder)
    readers = {
        "unet": unet_config_from_diffusers,
        "text_encoder": text_config_from_transformers,
        "text_encoder_2": text_config_from_transformers,
        "vae": vae_config_from_diffusers,
    }
    configs = {}
    for name, reader in readers.items():
        path = folder / name / "config.json"
        config = read_json(path)
        _check_types(path, config, getattr(SDXL_TURBO, name))
        try:
            configs[name] = reader(config)
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"{path} is not a supported SDXL config: {type(e).__name__}: {e}") from None
    try:
        return ModelSpec(**configs)
    except ValueError as e:
        raise LoadError(f"{folder}: {e}") from None


def check_eos_token_ids(folder: Path, eos_token_ids: tuple[int, int]) -> None:
    """transformers pools a text tower at the first eos_token_id of its config.json (at argmax(ids) for the official
    files' legacy 2), sdturbo at its tokenizer's eos: where they disagree diffusers draws another image. sdturbo's is
    the right one, so this warns (folders saved before save_diffusers_folder wrote the tokenizer's ids still load)."""
    for name, eos in zip(TEXT_ENCODERS, eos_token_ids):
        path = folder / name / "config.json"
        configured = read_json(path).get("eos_token_id", EOS_TOKEN_ID)  # absent: transformers' default
        if configured not in (LEGACY_EOS_TOKEN_ID, eos):
            warnings.warn(
                f"{path}: eos_token_id {configured!r} is not the tokenizer's end token {eos}: sdturbo pools the prompt "
                f"at the tokenizer's, diffusers would pool elsewhere and draw other images; set \"eos_token_id\": "
                f"{eos} in the file"
            )


def with_variant(filename: str, variant: str | None) -> str:
    """diffusers' and transformers' variant naming: the variant goes before the last suffix
    (model.safetensors -> model.fp16.safetensors, x.safetensors.index.json -> x.safetensors.index.fp16.json)."""
    if not variant:
        return filename
    stem, suffix = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def variant_order(variant: str | None) -> list[str | None]:
    """The preferred variant first, then the other: a folder with only one kind of weights still loads."""
    return [variant, None] if variant else [None, "fp16"]


def weight_files(component_dir: Path, filename: str, variant: str | None) -> list[Path]:
    """The safetensors file(s) holding a component's weights: the preferred variant, else the other one; a sharded
    checkpoint's index lists several. Pickle checkpoints are refused with the way to convert them."""
    if not component_dir.is_dir():
        raise LoadError(f"{component_dir} is missing: not a diffusers SDXL folder")
    for v in variant_order(variant):
        single = component_dir / with_variant(filename, v)
        if single.is_file():
            return [single]
        index = component_dir / with_variant(filename + ".index.json", v)
        if index.is_file():
            return [component_dir / shard for shard in _shards(index)]
    pickles = sorted(p for p in component_dir.iterdir() if is_pickle_name(p))
    if pickles:
        raise refuse_pickle(pickles[0])
    names = " or ".join(with_variant(filename, v) for v in variant_order(variant))
    stem, suffix = filename.rsplit(".", 1)
    variants = [*component_dir.glob(f"{stem}.*.{suffix}"), *component_dir.glob(f"{filename}.index.*.json")]
    found = sorted({p.name.split(".")[-2] for p in variants})
    hint = (
        f"; it has the {', '.join(found)} variant: pass variant=\"{found[0]}\" to from_pretrained() or "
        f"load_components() (the command line has no variant option: drop \".{found[0]}\" from the file names)"
        if found
        else ""
    )
    raise LoadError(f"{component_dir} has no weights: expected {names}{hint}")


def _shards(index: Path) -> list[str]:
    """The shard files a *.safetensors.index.json names: plain file names next to it, never paths elsewhere."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        kind = type(weight_map).__name__
        raise LoadError(f"{index}: weight_map is a {kind}, not an object mapping tensor names to shard files")
    shards = sorted(set(map(str, weight_map.values())))
    outside = [s for s in shards if Path(s).name != s or s in ("", ".", "..") or "\\" in s]
    if outside:
        raise LoadError(f"{index}: weight_map names {outside[0]!r}; shards must be plain file names in {index.parent}")
    return shards


def read_component(
    folder: str | Path, name: str, variant: str | None, dtype: torch.dtype | None, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """One component's state dict, cast tensor by tensor; ignorable buffers (position_ids) are skipped."""
    state_dict = {}
    for path in weight_files(Path(folder) / name, WEIGHT_NAMES[name], variant):
        if not path.is_file():
            raise LoadError(f"weights file {path} (listed in the shard index) does not exist")
        shapes, _ = read_header(path)
        keys = [k for k in shapes if k not in IGNORED_DIFFUSERS_KEYS]
        state_dict.update(read_tensors(path, keys, dtype, device))
    if name.startswith("text_encoder"):
        state_dict = with_text_model_prefix(state_dict)
    return state_dict


def with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves CLIPTextModel without the "text_model." prefix that the hub's files (and our names) have."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state_dict.items()}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def component_configs(spec: ModelSpec, tokenizers: tuple[CLIPTokenizer, CLIPTokenizer] | None = None) -> dict:
    """config.json contents per component, as diffusers and transformers write them; the text towers' carry their
    tokenizer's start, end and pad ids (without tokenizers, sdxl-turbo's: CLIP's vocab, TE2 padding with 0)."""
    ids = [(t.bos_token_id, t.eos_token_id, t.pad_token_id) for t in tokenizers or ()]
    ids = ids or [(EOS_TOKEN_ID - 1, EOS_TOKEN_ID, EOS_TOKEN_ID), (EOS_TOKEN_ID - 1, EOS_TOKEN_ID, 0)]
    token_ids = [dict(zip(("bos_token_id", "eos_token_id", "pad_token_id"), t)) for t in ids]
    return {
        "unet": unet_config_to_diffusers(spec.unet),
        "text_encoder": {**text_config_to_transformers(spec.text_encoder, with_projection=False), **token_ids[0]},
        "text_encoder_2": {**text_config_to_transformers(spec.text_encoder_2, with_projection=True), **token_ids[1]},
        "vae": {"_class_name": "AutoencoderKL", **vae_config_to_diffusers(spec.vae)},
    }


def save_diffusers_folder(
    path: str | Path,
    components: Mapping[str, nn.Module | StateDict],
    spec: ModelSpec,
    tokenizer_folders: tuple[str | Path, str | Path] | None = None,
    variant: str | None = None,
) -> Path:
    """Write the official layout: model_index.json, scheduler/, the four components' config.json and weights (in the
    tensors' own dtype, named for `variant`), and copies of the tokenizer/ and tokenizer_2/ files when given."""
    path = Path(path)
    tokenizers = tuple(CLIPTokenizer.from_folder(f) for f in tokenizer_folders) if tokenizer_folders else None
    _write_json(path / "model_index.json", MODEL_INDEX)
    _write_json(path / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    for name, config in component_configs(spec, tokenizers).items():
        _write_json(path / name / "config.json", config)
        tensors = {k: t.detach().contiguous().cpu() for k, t in state_dict_of(components[name]).items()}
        # transformers refuses safetensors files without format metadata
        save_tensors(tensors, path / name / with_variant(WEIGHT_NAMES[name], variant), metadata={"format": "pt"})
    for name, source in zip(TOKENIZER_FOLDERS, tokenizer_folders or ()):
        (path / name).mkdir(parents=True, exist_ok=True)
        for filename in TOKENIZER_FILES:
            if (Path(source) / filename).exists():
                shutil.copyfile(Path(source) / filename, path / name / filename)
    return path
