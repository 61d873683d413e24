"""A diffusers pipeline folder laid out like stabilityai/sdxl-turbo (spec 8.1): read its configs into a ModelSpec and
its weights into state dicts, or write one. Weight names are sdturbo's own, so no key map is involved."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..models.clip import text_config_from_transformers, text_config_to_transformers
from ..models.configs import ModelSpec
from ..models.unet import unet_config_from_diffusers, unet_config_to_diffusers
from ..models.vae import vae_config_from_diffusers, vae_config_to_diffusers
from ..sampling import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS
from .keymaps import COMPONENTS, IGNORED_DIFFUSERS_KEYS, LoadError, StateDict
from .single_file import PICKLE_SUFFIXES, read_header, read_tensors, refuse_pickle, state_dict_of

WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

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


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise LoadError(f"{path} is missing: not a diffusers SDXL folder (expected the stabilityai/sdxl-turbo layout)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({e})") from None


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


def read_folder_spec(folder: str | Path) -> ModelSpec:
    """The architecture from unet/, text_encoder/, text_encoder_2/ and vae/ config.json."""
    folder = Path(folder)
    _check_model_index(folder)
    readers = {
        "unet": unet_config_from_diffusers,
        "text_encoder": text_config_from_transformers,
        "text_encoder_2": text_config_from_transformers,
        "vae": vae_config_from_diffusers,
    }
    configs = {}
    for name, reader in readers.items():
        path = folder / name / "config.json"
        try:
            configs[name] = reader(read_json(path))
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"{path} is not a supported SDXL config: {type(e).__name__}: {e}") from None
    return ModelSpec(**configs)


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
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            return [component_dir / shard for shard in shards]
    pickles = sorted(p for p in component_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse_pickle(pickles[0])
    names = " or ".join(with_variant(filename, v) for v in variant_order(variant))
    raise LoadError(f"{component_dir} has no weights: expected {names}")


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


def component_configs(spec: ModelSpec) -> dict[str, dict]:
    """config.json contents per component, as diffusers and transformers write them."""
    return {
        "unet": unet_config_to_diffusers(spec.unet),
        "text_encoder": text_config_to_transformers(spec.text_encoder, with_projection=False),
        "text_encoder_2": text_config_to_transformers(spec.text_encoder_2, with_projection=True),
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
    _write_json(path / "model_index.json", MODEL_INDEX)
    _write_json(path / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    for name, config in component_configs(spec).items():
        _write_json(path / name / "config.json", config)
        tensors = {k: t.detach().contiguous().cpu() for k, t in state_dict_of(components[name]).items()}
        # transformers refuses safetensors files without format metadata
        save_file(tensors, str(path / name / with_variant(WEIGHT_NAMES[name], variant)), metadata={"format": "pt"})
    for name, source in zip(TOKENIZER_FOLDERS, tokenizer_folders or ()):
        (path / name).mkdir(parents=True, exist_ok=True)
        for filename in TOKENIZER_FILES:
            if (Path(source) / filename).exists():
                shutil.copyfile(Path(source) / filename, path / name / filename)
    return path
