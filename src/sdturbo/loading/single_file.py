"""The sgm single file (sd_xl_turbo_1.0[_fp16].safetensors): read it memory-mapped, infer the architecture from
tensor shapes, write one. Also home of the safetensors reading shared with diffusers folders."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..models.configs import SDXL_TURBO, ModelSpec, TextEncoderConfig, UNetConfig, VAEConfig
from .keymaps import SGM_PREFIXES, LoadError, StateDict, diffusers_to_sgm

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
SAMPLE_SIZE_KEY = "sdturbo.sample_size"  # our metadata: the default latent size is not in the weights
# The spec values that tensor shapes do not give (sgm keeps them in its yaml config): our files record them in the
# metadata as JSON, under sdturbo.{component}.{field}; files without them get SDXL-Turbo's.
RECORDED_FIELDS = {
    "unet": ("sample_size", "head_dim", "norm_num_groups"),
    "text_encoder": ("num_heads", "hidden_act", "layer_norm_eps"),
    "text_encoder_2": ("num_heads", "hidden_act", "layer_norm_eps"),
    "vae": ("norm_num_groups", "scaling_factor", "force_upcast"),
}
HEAD_DIM = 64  # every SDXL attention (UNet and both text towers) uses 64-wide heads; shapes cannot tell heads apart
NORM_GROUPS = 32  # sgm's UNet and VAE hard-code GroupNorm(32, ...)

Shapes = Mapping[str, Sequence[int]]


def is_pickle_name(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: Path) -> LoadError:
    """The error for a pickle checkpoint, with the one-off conversion that makes it loadable: to the name the loader
    looks for (transformers' pytorch_model*.bin become model*.safetensors, diffusers' keep their stem)."""
    name = path.name
    if name.startswith("pytorch_model"):
        name = "model" + name[len("pytorch_model") :]
    target = path.with_name(name).with_suffix(".safetensors")
    convert = (
        f"python -c \"import torch, safetensors.torch as s; sd = torch.load('{path}', weights_only=True); "
        f"s.save_file(sd.get('state_dict', sd), '{target}')\""
    )
    return LoadError(
        f"{path} is a pickle file, which sdturbo does not load (unpickling can run code); "
        f"convert it to safetensors once with: {convert}"
    )


def is_like(value, like) -> bool:
    """Whether a config value has the JSON type of `like`, a valid value: the same type for strings and booleans; for
    numbers an integer where `like` is one, else any number; lists element-wise (a lone number passes for a
    per-level list). A `like` of None accepts anything."""
    if isinstance(like, (list, tuple)):
        return not like or all(is_like(v, like[0]) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if like is None or isinstance(like, (bool, str)):
        return like is None or type(value) is type(like)
    return isinstance(value, int if isinstance(like, int) else (int, float)) and not isinstance(value, bool)


def kind_of(like) -> str:
    """What is_like(value, like) asks for, in words."""
    if isinstance(like, (list, tuple)):
        return f"{kind_of(like[0])} or a list of them"
    return {bool: "true or false", str: "a string", int: "an integer"}.get(type(like), "a number")


def _corrupt(path: Path, error: Exception) -> LoadError:
    if _starts_like_pickle(path):  # renamed, or a .bin shard named in an index
        return refuse_pickle(path)
    return LoadError(f"weights file {path} is corrupt or truncated ({error}); re-download it")


def _starts_like_pickle(path: Path) -> bool:
    """torch.save's two formats: a zip archive (since torch 1.6), or a bare pickle (protocol 2+ starts with 0x80)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and the __metadata__ of a safetensors file, without reading any tensor data."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None


def read_tensors(
    path: str | Path, keys: Iterable[str], dtype: torch.dtype | None, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """The named tensors of a memory-mapped safetensors file, each moved to `device` and its floating-point values
    cast to `dtype` one at a time, so a 16-bit load never holds a 32-bit copy of the whole model."""
    path = Path(path)
    out = {}
    try:
        # safetensors reads straight onto cuda devices; other devices go through the CPU
        read_device = str(device) if torch.device(device).type in ("cpu", "cuda") else "cpu"
        with safe_open(path, framework="pt", device=read_device) as f:
            for key in keys:
                t = f.get_tensor(key)
                if not t.is_floating_point():
                    raise LoadError(
                        f"{path}: tensor {key} is {t.dtype}, but every weight sdturbo loads is floating point; "
                        "re-export the checkpoint with float16/bfloat16/float32 weights"
                    )
                out[key] = _convert(t, dtype, device)
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None
    return out


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def check_safetensors_path(path: Path) -> None:
    """A readable .safetensors file, or a LoadError saying what is wrong with `path`."""
    if is_pickle_name(path):
        raise refuse_pickle(path)
    if not path.is_file():
        raise LoadError(f"weights file {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise LoadError(f"{path} is not a .safetensors file")


# -- architecture from shapes ----------------------------------------------------------------------------------


def _component(shapes: Shapes, name: str) -> dict[str, tuple[int, ...]]:
    prefix = SGM_PREFIXES[name]
    return {k[len(prefix) :]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        # diffusers' convert_diffusers_to_original_sdxl.py writes TE2's projection as text_projection.weight
        found = f" (the file has {key}.weight {list(shapes[key + '.weight'])}: a Linear layout some converters write; " \
            "load the diffusers folder it was converted from instead)" if key + ".weight" in shapes else ""
        raise LoadError(f"cannot infer the SDXL architecture: tensor {key} is missing{found}")
    return tuple(shapes[key])


def _count(shapes: Shapes, prefix: str) -> int:
    """How many numbered children `prefix` has, e.g. _count(shapes, "input_blocks.") = 9 for SDXL."""
    indices = {k[len(prefix) :].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
    return len({int(i) for i in indices if i.isdigit()})


def metadata_key(component: str, field: str) -> str:
    return SAMPLE_SIZE_KEY if (component, field) == ("unet", "sample_size") else f"sdturbo.{component}.{field}"


def _recorded(metadata: Mapping[str, str], component: str, **defaults) -> dict:
    """`defaults` (SDXL-Turbo's values of RECORDED_FIELDS[component]) with those our metadata records instead."""
    values = dict(defaults)
    for field, default in defaults.items():
        key = metadata_key(component, field)
        if key not in metadata:
            continue
        try:
            values[field] = json.loads(metadata[key])
        except json.JSONDecodeError:
            values[field] = metadata[key]
        if not is_like(values[field], default):
            raise LoadError(
                f"metadata {key} = {metadata[key]!r} is not {kind_of(default)}; correct it, or delete the key to "
                f"use SDXL-Turbo's {default!r}"
            )
    return values


def _unet_config(shapes: Shapes, pooled_dim: int, metadata: Mapping[str, str]) -> UNetConfig:
    n_inputs = _count(shapes, "input_blocks.")
    n_downsamplers = sum(f"input_blocks.{i}.0.op.weight" in shapes for i in range(n_inputs))
    levels = n_downsamplers + 1
    # input_blocks = conv_in, then per level layers_per_block ResBlocks, then a downsampler except at the last level
    layers_per_block, remainder = divmod(n_inputs - 1 - n_downsamplers, levels)
    if remainder or layers_per_block < 1:
        raise LoadError(f"cannot infer the SDXL architecture: {n_inputs} input blocks do not fit {levels} levels")
    first_blocks = [1 + level * (layers_per_block + 1) for level in range(levels)]
    adm_in_channels = _shape(shapes, "label_emb.0.0.weight")[1]
    time_dims, remainder = divmod(adm_in_channels - pooled_dim, 6)  # y = pooled + 6 size/crop sinusoids
    if remainder:
        raise LoadError(
            f"cannot infer the SDXL architecture: y width {adm_in_channels} minus pooled {pooled_dim} "
            "is not 6 sinusoids"
        )
    conv_in = _shape(shapes, "input_blocks.0.0.weight")  # [model_channels, in_channels, 3, 3]
    return UNetConfig(
        in_channels=conv_in[1],
        out_channels=_shape(shapes, "out.2.weight")[0],
        block_out_channels=tuple(_shape(shapes, f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first_blocks),
        transformer_depth=tuple(_count(shapes, f"input_blocks.{i}.1.transformer_blocks.") for i in first_blocks),
        layers_per_block=layers_per_block,
        context_dim=_shape(shapes, "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        addition_time_embed_dim=time_dims,
        adm_in_channels=adm_in_channels,
        **_recorded(
            metadata, "unet", sample_size=SDXL_TURBO.unet.sample_size, head_dim=HEAD_DIM, norm_num_groups=NORM_GROUPS
        ),
    )


def _clip_config(shapes: Shapes, metadata: Mapping[str, str]) -> TextEncoderConfig:
    """TE1 is stored as a transformers CLIPTextModel (OpenAI CLIP ViT-L: quick_gelu)."""
    vocab_size, width = _shape(shapes, "text_model.embeddings.token_embedding.weight")
    return TextEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=_shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=_count(shapes, "text_model.encoder.layers."),
        max_position_embeddings=_shape(shapes, "text_model.embeddings.position_embedding.weight")[0],
        projection_dim=None,
        **_recorded(
            metadata, "text_encoder", num_heads=width // HEAD_DIM, hidden_act="quick_gelu", layer_norm_eps=1e-5
        ),
    )


def _open_clip_config(shapes: Shapes, metadata: Mapping[str, str]) -> TextEncoderConfig:
    """TE2 is stored as an open_clip text tower (OpenCLIP bigG: exact gelu, projection applied as x @ W)."""
    vocab_size, width = _shape(shapes, "token_embedding.weight")
    return TextEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=_shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_layers=_count(shapes, "transformer.resblocks."),
        max_position_embeddings=_shape(shapes, "positional_embedding")[0],
        projection_dim=_shape(shapes, "text_projection")[1],
        **_recorded(metadata, "text_encoder_2", num_heads=width // HEAD_DIM, hidden_act="gelu", layer_norm_eps=1e-5),
    )


def _vae_config(shapes: Shapes, metadata: Mapping[str, str]) -> VAEConfig:
    """Scaling factor and fp16 behaviour are not in the weights: our metadata's, else SDXL's VAE values."""
    levels = _count(shapes, "encoder.down.")
    return VAEConfig(
        in_channels=_shape(shapes, "encoder.conv_in.weight")[1],
        out_channels=_shape(shapes, "decoder.conv_out.weight")[0],
        latent_channels=_shape(shapes, "post_quant_conv.weight")[0],
        block_out_channels=tuple(_shape(shapes, f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)),
        layers_per_block=_count(shapes, "encoder.down.0.block."),
        **_recorded(
            metadata,
            "vae",
            norm_num_groups=NORM_GROUPS,
            scaling_factor=SDXL_TURBO.vae.scaling_factor,
            force_upcast=SDXL_TURBO.vae.force_upcast,
        ),
    )


def infer_spec(
    shapes: Mapping[str, Sequence[int] | torch.Tensor], metadata: Mapping[str, str] | None = None
) -> ModelSpec:
    """The architecture of an sgm single file from its key names and tensor shapes (tensors work too: meta ones
    need no memory). What shapes cannot tell (RECORDED_FIELDS: the default latent size, the VAE's scaling factor,
    ...) our files store in the metadata; others get SDXL-Turbo's values."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    absent = [p for p in SGM_PREFIXES.values() if not any(k.startswith(p) for k in shapes)]
    if absent:
        raise LoadError(f"not an SDXL single file: no tensors under {', '.join(absent)}")
    metadata = metadata or {}
    try:
        text_encoder_2 = _open_clip_config(_component(shapes, "text_encoder_2"), metadata)
        configs = dict(
            unet=_unet_config(_component(shapes, "unet"), text_encoder_2.projection_dim, metadata),
            text_encoder=_clip_config(_component(shapes, "text_encoder"), metadata),
            text_encoder_2=text_encoder_2,
            vae=_vae_config(_component(shapes, "vae"), metadata),
        )
    except ValueError as e:  # a config's own check: values from the metadata that do not fit the shapes
        raise LoadError(f"the sdturbo.* metadata does not fit the tensors: {e}") from None
    try:
        return ModelSpec(**configs)
    except ValueError as e:
        raise LoadError(str(e)) from None


# -- writing ---------------------------------------------------------------------------------------------------


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, leaving the file with the mode of any other new file: save_file writes a 0600 temporary
    file and renames it into place, so checkpoints and exported weights were readable by their owner alone while the
    JSON beside them was not (a run folder shared with a group, or served, was half unreadable)."""
    save_file(dict(tensors), str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux tells it without changing it; os.umask can only read it by setting it, racing other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def state_dict_of(component: nn.Module | StateDict) -> StateDict:
    return component.state_dict() if isinstance(component, nn.Module) else component


def save_single_file(path: str | Path, components: Mapping[str, nn.Module | StateDict], spec: ModelSpec) -> Path:
    """Write {"unet", "text_encoder", "text_encoder_2", "vae"} (modules or diffusers-named state dicts) as one sgm
    single file, in the tensors' own dtype, with what the shapes do not tell of `spec` in the metadata."""
    path = Path(path)
    sgm = diffusers_to_sgm({name: state_dict_of(c) for name, c in components.items()}, spec)
    tensors = {k: t.detach().contiguous().cpu() for k, t in sgm.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, path, metadata={"format": "pt", **spec_metadata(spec)})
    return path


def spec_metadata(spec: ModelSpec) -> dict[str, str]:
    """The RECORDED_FIELDS of `spec`, as JSON strings under their metadata keys."""
    return {
        metadata_key(component, field): json.dumps(getattr(getattr(spec, component), field))
        for component, fields in RECORDED_FIELDS.items()
        for field in fields
    }
