"""load_components: a diffusers folder, an sgm single .safetensors file or a Hub id -> ready models and tokenizers.

Models are built on the meta device and adopt the checkpoint's tensors (load_state_dict(assign=True)), each read
memory-mapped and cast on its own, so loading in 16 bits never holds a 32-bit copy of the model. Loading is strict:
after dropping the known-harmless buffers (spec 9, item 12), every missing, unexpected or mis-shaped tensor is
named in one LoadError."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..devices import resolve_device
from ..models.clip import CLIPTextModel
from ..models.configs import ModelSpec
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..tokenizer import CLIPTokenizer
from .diffusers_folder import (
    TOKENIZER_FOLDERS,
    check_eos_token_ids,
    read_component,
    read_folder_spec,
    save_diffusers_folder,
)
from .hub import DEFAULT_REPO, resolve_hub_id, resolve_tokenizer_folder
from .keymaps import (
    COMPONENTS,
    LoadError,
    diffusers_to_sgm,
    is_ignored_sgm_key,
    name_list,
    sgm_to_diffusers,
    unmapped_sgm_keys,
)
from .single_file import (
    PICKLE_SUFFIXES,
    check_safetensors_path,
    infer_spec,
    read_header,
    read_tensors,
    save_single_file,
)

__all__ = [
    "Components",
    "LoadError",
    "diffusers_to_sgm",
    "infer_spec",
    "load_components",
    "read_folder_spec",
    "save_diffusers_folder",
    "save_single_file",
    "sgm_to_diffusers",
]

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
OPEN_CLIP_PAD_ID = 0  # TE2's pad id ("!"), as open_clip and sdxl-turbo's tokenizer_2; TE1 pads with its eos


@dataclass
class Components:
    """Everything a pipeline needs, loaded; spec is the architecture the weights were read with."""

    unet: UNet
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModel
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    spec: ModelSpec
    name: str  # the source as the caller gave it

    def models(self) -> dict[str, nn.Module]:
        """{"unet", "text_encoder", "text_encoder_2", "vae"}: what save_single_file / save_diffusers_folder take."""
        return {name: getattr(self, name) for name in COMPONENTS}


def load_components(
    source: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    tokenizer: str | Path | None = None,
    variant: str | None = "fp16",
) -> Components:
    """source: a diffusers folder, a single sgm .safetensors file, or a Hub id ("stabilityai/sdxl-turbo").

    dtype casts every floating-point tensor (None keeps the file's). variant picks *.{variant}.safetensors in a
    folder or on the Hub, falling back to the plain files (and None the other way round). tokenizer overrides the
    tokenizers: a folder with tokenizer/ and tokenizer_2/, a folder with one vocab.json + merges.txt for both, or a
    Hub id; a single file has none of its own, so it defaults to stabilityai/sdxl-turbo's. Models come in eval mode."""
    device = resolve_device(device)  # a device sdturbo cannot run on is refused before any reading
    folder = _diffusers_folder(source, variant)  # None: a single file
    if folder is None:  # a pickle or a corrupt header is the first thing to report
        check_safetensors_path(Path(source))
        read_header(Path(source))
    tokenizer_1, tokenizer_2 = _load_tokenizers(tokenizer, folder)  # before the weights: fails fast offline
    if folder is None:
        spec, state_dicts, unmapped = _read_single_file(Path(source), dtype, device)
    else:
        eos_token_ids = (tokenizer_1.eos_token_id, tokenizer_2.eos_token_id)
        spec, state_dicts, unmapped = _read_folder(folder, variant, dtype, device, eos_token_ids)
    models = _build_on_meta(spec, tokenizer_1.eos_token_id, tokenizer_2.eos_token_id)
    _check_state_dicts(str(source), models, state_dicts, unmapped)
    for name, model in models.items():
        model.load_state_dict(state_dicts[name], strict=True, assign=True)
        model.eval()
    return Components(**models, tokenizer=tokenizer_1, tokenizer_2=tokenizer_2, spec=spec, name=str(source))


def _diffusers_folder(source: str | Path, variant: str | None) -> Path | None:
    """The local folder behind `source`, downloading a Hub id; None when source names a single file."""
    path = Path(source)
    if path.is_dir():
        if not any((path / name).exists() for name in ("model_index.json", *COMPONENTS)):
            raise LoadError(f"{source} is not a diffusers model folder (no model_index.json, unet/ or vae/ in it); "
                            "pass the folder that holds them, or a single .safetensors file")
        return path
    if path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        return None
    if HUB_ID.fullmatch(str(source)):
        try:
            return resolve_hub_id(str(source), variant)
        except LoadError as e:  # "models/my-sdxl" may be a mistyped local path as well as an id
            raise LoadError(f"{source} is no local folder or file; as a Hugging Face model id: {e}") from None
    # "mini", the bundled model, is a name TurboPipeline.from_pretrained takes only spelt exactly so
    hint = "; did you mean mini?" if str(source).lower() == "mini" else ""
    raise LoadError(f"{source} is neither a folder, a .safetensors file nor a Hugging Face model id{hint}")


def _read_folder(
    folder: Path, variant: str | None, dtype: torch.dtype | None, device: torch.device, eos_token_ids: tuple[int, int]
) -> tuple[ModelSpec, dict, list[str]]:
    spec = read_folder_spec(folder)
    check_eos_token_ids(folder, eos_token_ids)
    return spec, {name: read_component(folder, name, variant, dtype, device) for name in COMPONENTS}, []


def _read_single_file(
    path: Path, dtype: torch.dtype | None, device: torch.device | str
) -> tuple[ModelSpec, dict, list[str]]:
    """Reads only the tensors that map; the others are reported with the strict check."""
    check_safetensors_path(path)
    shapes, metadata = read_header(path)
    try:
        spec = infer_spec(shapes, metadata)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    unmapped = unmapped_sgm_keys(shapes, spec)
    skipped = set(unmapped)
    tensors = read_tensors(path, [k for k in shapes if k not in skipped and not is_ignored_sgm_key(k)], dtype, device)
    return spec, sgm_to_diffusers(tensors, spec), unmapped


def _build_on_meta(spec: ModelSpec, eos_token_id_1: int, eos_token_id_2: int) -> dict[str, nn.Module]:
    """Shapes without storage: the checkpoint's tensors become the parameters, so nothing is allocated twice.
    The text towers pool at their tokenizer's eos id (49407 for CLIP's vocab, another for a model's own vocab)."""
    with torch.device("meta"):
        return {
            "unet": UNet(spec.unet),
            "text_encoder": CLIPTextModel(spec.text_encoder, eos_token_id=eos_token_id_1),
            "text_encoder_2": CLIPTextModel(spec.text_encoder_2, eos_token_id=eos_token_id_2),
            "vae": AutoencoderKL(spec.vae),
        }


def _check_state_dicts(source: str, models: dict[str, nn.Module], state_dicts: dict, unmapped: list[str]) -> None:
    """One LoadError naming every missing, unexpected (incl. unmapped sgm keys) and mis-shaped tensor."""
    missing, unexpected, misshaped = [], list(unmapped), []
    for name, model in models.items():
        expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        got = {k: tuple(t.shape) for k, t in state_dicts[name].items()}
        missing += [f"{name}.{k}" for k in expected if k not in got]
        unexpected += [f"{name}.{k}" for k in got if k not in expected]
        misshaped += [
            f"{name}.{k} {list(got[k])} (model: {list(shape)})"
            for k, shape in expected.items()
            if k in got and got[k] != shape
        ]
    problems = [
        f"{len(keys)} {kind} {name_list(keys)}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise LoadError(f"{source} does not match the architecture it describes: {'; '.join(problems)}")


def _load_tokenizers(tokenizer: str | Path | None, folder: Path | None) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    if tokenizer is None:
        return _tokenizers_from(folder if folder is not None else resolve_tokenizer_folder(DEFAULT_REPO))
    path = Path(tokenizer)
    if path.is_dir():
        return _tokenizers_from(path)
    if HUB_ID.fullmatch(str(tokenizer)):
        return _tokenizers_from(resolve_tokenizer_folder(str(tokenizer)))
    raise LoadError(f"tokenizer {tokenizer} is neither a folder nor a Hugging Face model id")


def _tokenizers_from(folder: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """tokenizer/ + tokenizer_2/ subfolders, or one vocab.json + merges.txt for both towers with each one's pad id."""
    if all((folder / name).is_dir() for name in TOKENIZER_FOLDERS):
        return tuple(_tokenizer(folder / name) for name in TOKENIZER_FOLDERS)
    tokenizer_1, tokenizer_2 = _tokenizer(folder), _tokenizer(folder)
    tokenizer_1.pad_token_id = tokenizer_1.eos_token_id
    tokenizer_2.pad_token_id = OPEN_CLIP_PAD_ID
    return tokenizer_1, tokenizer_2


def _tokenizer(folder: Path) -> CLIPTokenizer:
    has_bpe_files = all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))
    if not has_bpe_files and not (folder / "tokenizer.json").is_file():
        raise LoadError(
            f"tokenizer folder {folder} has no vocab.json + merges.txt or tokenizer.json (nor tokenizer/ and tokenizer_2/)"
        )
    try:
        return CLIPTokenizer.from_folder(folder)
    except Exception as e:  # the tokenizers library raises its own untyped errors for malformed files
        raise LoadError(f"tokenizer folder {folder} is unreadable ({type(e).__name__}: {e})") from None
