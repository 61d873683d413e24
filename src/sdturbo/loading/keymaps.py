"""Key maps between the sgm single file (sd_xl_turbo_1.0*.safetensors) and diffusers/transformers names.

sdturbo's modules use the diffusers/transformers names, so a diffusers folder loads by identity and only the sgm
layout needs these maps (spec 8.2-8.3). A map is a list of `Rule`s, one per module, generated from the architecture:
the sgm module path, the diffusers module path, and how the names below them differ. Both directions read the same
rules, so sgm -> diffusers -> sgm is the identity by construction."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..models.configs import ModelSpec, TextEncoderConfig, UNetConfig, VAEConfig

StateDict = Mapping[str, torch.Tensor]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")

SGM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
    "vae": "first_stage_model.",
}

# Buffers that carry no learned information (spec 9, item 12): recomputed by the models, so dropped on load.
IGNORED_SGM_KEYS = frozenset(
    {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale",
        "denoiser.sigmas",
        # CLIP ViT-L saved as CLIPTextModelWithProjection: SDXL uses its hidden states, never the projection
        "conditioner.embedders.0.transformer.text_projection.weight",
    }
)
# sgm training checkpoints carry the EMA copy of the UNet beside it; the weights are model.diffusion_model.*, as in
# diffusers' from_single_file
IGNORED_SGM_PREFIXES = ("model_ema.",)


def is_ignored_sgm_key(key: str) -> bool:
    """Tensors a single file may carry that no SDXL component uses (spec 9, item 12, and the EMA copy)."""
    return key in IGNORED_SGM_KEYS or key.startswith(IGNORED_SGM_PREFIXES)
IGNORED_DIFFUSERS_KEYS = frozenset({"text_model.embeddings.position_ids"})


class LoadError(Exception):
    """A checkpoint that cannot be loaded; the message is one line and says what to do.

    Defined here because every loading module imports this one, the lowest layer of the package."""


def name_list(names: list[str], limit: int = 10) -> str:
    """Up to `limit` names and the count of the rest, for one-line error messages."""
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


@dataclass(frozen=True)
class Codec:
    """How one sgm tensor becomes one or more diffusers tensors, and back."""

    to_diffusers: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    to_sgm: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


def _same(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t,)


def _first(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ts[0]


def _squeeze_1x1(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # sgm VAE attention uses 1x1 convs [C,C,1,1], diffusers uses Linear [C,C]; files converted from a diffusers VAE
    # by some tools keep the [C,C] layout, which diffusers' from_single_file loads as well
    return (t[:, :, 0, 0],) if t.dim() == 4 else (t,)


def _unsqueeze_1x1(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ts[0][:, :, None, None]


def _transpose(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t.T.contiguous(),)  # open_clip applies text_projection as x @ W, a Linear stores W.T


def _transpose_back(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ts[0].T.contiguous()


def _split_qkv(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # clone: row slices share the fused storage, which safetensors refuses to save and which would pin all three
    return tuple(part.clone() for part in t.chunk(3, dim=0))


def _join_qkv(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


SAME = Codec(_same, _first)
CONV_1X1 = Codec(_squeeze_1x1, _unsqueeze_1x1)
TRANSPOSE = Codec(_transpose, _transpose_back)
QKV = Codec(_split_qkv, _join_qkv)


@dataclass(frozen=True)
class Rule:
    """One module: `sgm` and `diffusers` are its paths ("" = the component root).

    Below the module, `renames` maps sgm sub-module paths to diffusers ones (the parameter name after them is kept),
    and `exact` maps whole sgm sub-keys to diffusers keys with a tensor transform. With neither, every name below the
    module is the same on both sides."""

    sgm: str
    diffusers: str
    renames: Mapping[str, str] = field(default_factory=dict)
    exact: Mapping[str, tuple[tuple[str, ...], Codec]] = field(default_factory=dict)

    @property
    def is_transparent(self) -> bool:
        return not self.renames and not self.exact


UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_ATTENTION_CONVS = {
    f"{s}.weight": ((f"{d}.weight",), CONV_1X1) for s, d in VAE_ATTENTION_RENAMES.items() if s != "norm"
}
OPEN_CLIP_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
OPEN_CLIP_QKV = {
    f"attn.in_proj_{p}": (tuple(f"self_attn.{x}_proj.{p}" for x in "qkv"), QKV) for p in ("weight", "bias")
}
OPEN_CLIP_ROOT = Rule(
    "",
    "",
    renames={"token_embedding": "text_model.embeddings.token_embedding", "ln_final": "text_model.final_layer_norm"},
    exact={
        "positional_embedding": (("text_model.embeddings.position_embedding.weight",), SAME),
        "text_projection": (("text_projection.weight",), TRANSPOSE),
    },
)


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    """sgm `input_blocks`/`output_blocks` are flat lists; their indices follow from levels and layers_per_block."""
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    rules = [
        Rule("time_embed.0", "time_embedding.linear_1"),
        Rule("time_embed.2", "time_embedding.linear_2"),
        Rule("label_emb.0.0", "add_embedding.linear_1"),
        Rule("label_emb.0.2", "add_embedding.linear_2"),
        Rule("input_blocks.0.0", "conv_in"),
        Rule("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
        Rule("middle_block.1", "mid_block.attentions.0"),
        Rule("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
        Rule("out.0", "conv_norm_out"),
        Rule("out.2", "conv_out"),
    ]
    i = 1  # input_blocks.0 is conv_in
    for level, depth in enumerate(cfg.transformer_depth):
        for j in range(n):
            rules.append(Rule(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESNET))
            if depth:
                rules.append(Rule(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}"))
            i += 1
        if level < levels - 1:
            rules.append(Rule(f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            i += 1
    o = 0
    for up, depth in enumerate(reversed(cfg.transformer_depth)):
        for j in range(n + 1):  # one more ResBlock per up level: it also consumes the downsampler's skip
            rules.append(Rule(f"output_blocks.{o}.0", f"up_blocks.{up}.resnets.{j}", UNET_RESNET))
            if depth:
                rules.append(Rule(f"output_blocks.{o}.1", f"up_blocks.{up}.attentions.{j}"))
            if j == n and up < levels - 1:
                # the upsampler follows the attention when there is one: index 2, else 1
                rules.append(Rule(f"output_blocks.{o}.{2 if depth else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv"))
            o += 1
    return rules


def _vae_mid_rules(side: str) -> list[Rule]:
    return [
        Rule(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET),
        Rule(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION_RENAMES, VAE_ATTENTION_CONVS),
        Rule(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET),
        Rule(f"{side}.conv_in", f"{side}.conv_in"),
        Rule(f"{side}.norm_out", f"{side}.conv_norm_out"),
        Rule(f"{side}.conv_out", f"{side}.conv_out"),
    ]


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    """sgm numbers decoder levels from the highest resolution, diffusers in execution order:
    up.{b} = up_blocks.{L-1-b}."""
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    rules = [Rule("quant_conv", "quant_conv"), Rule("post_quant_conv", "post_quant_conv")]
    rules += _vae_mid_rules("encoder") + _vae_mid_rules("decoder")
    for level in range(levels):
        down, up = f"encoder.down_blocks.{level}", f"decoder.up_blocks.{levels - 1 - level}"
        for j in range(n):
            rules.append(Rule(f"encoder.down.{level}.block.{j}", f"{down}.resnets.{j}", VAE_RESNET))
        if level < levels - 1:
            rules.append(Rule(f"encoder.down.{level}.downsample.conv", f"{down}.downsamplers.0.conv"))
        for j in range(n + 1):
            rules.append(Rule(f"decoder.up.{level}.block.{j}", f"{up}.resnets.{j}", VAE_RESNET))
        if level > 0:
            rules.append(Rule(f"decoder.up.{level}.upsample.conv", f"{up}.upsamplers.0.conv"))
    return rules


def open_clip_rules(cfg: TextEncoderConfig) -> list[Rule]:
    layers = [
        Rule(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", OPEN_CLIP_RENAMES, OPEN_CLIP_QKV)
        for i in range(cfg.num_layers)
    ]
    return [OPEN_CLIP_ROOT, *layers]


def component_rules(spec: ModelSpec) -> dict[str, list[Rule]]:
    return {
        "unet": unet_rules(spec.unet),
        "text_encoder": [Rule("", "")],  # conditioner.embedders.0 is a transformers CLIPTextModel: names match
        "text_encoder_2": open_clip_rules(spec.text_encoder_2),
        "vae": vae_rules(spec.vae),
    }


def _most_specific_first(rules: list[Rule], side: str) -> list[Rule]:
    """Longest module path first, so that a nested module's rule wins over its parent's."""
    return sorted(rules, key=lambda r: len(getattr(r, side)), reverse=True)


def _below(key: str, path: str) -> str | None:
    """The part of `key` below module `path`, or None when the key is not inside it."""
    if not path:
        return key
    if key.startswith(path + "."):
        return key[len(path) + 1 :]
    return None


def _join(path: str, rest: str) -> str:
    return f"{path}.{rest}" if path else rest


def _rename_below(rest: str, renames: Mapping[str, str]) -> str | None:
    for old, new in renames.items():
        tail = _below(rest, old)
        if tail is not None:
            return f"{new}.{tail}"
    return None


def _map_sgm_key(key: str, rules: list[Rule]) -> tuple[tuple[str, ...], Codec] | None:
    """Diffusers keys and transform for one sgm key (component prefix removed), or None if no rule covers it.

    `rules` are most specific first; the first module containing the key decides."""
    rule = next((r for r in rules if _below(key, r.sgm) is not None), None)
    if rule is None:
        return None
    rest = _below(key, rule.sgm)
    if rule.is_transparent:
        return (_join(rule.diffusers, rest),), SAME
    if rest in rule.exact:
        names, codec = rule.exact[rest]
        return tuple(_join(rule.diffusers, n) for n in names), codec
    renamed = _rename_below(rest, rule.renames)
    return None if renamed is None else ((_join(rule.diffusers, renamed),), SAME)


def _map_diffusers_key(key: str, rules: list[Rule]) -> tuple[str, int, int, Codec] | None:
    """sgm key, slot among the tensors that join into it, number of slots, and transform for one diffusers key."""
    rule = next((r for r in rules if _below(key, r.diffusers) is not None), None)
    if rule is None:
        return None
    rest = _below(key, rule.diffusers)
    if rule.is_transparent:
        return _join(rule.sgm, rest), 0, 1, SAME
    for sgm_name, (names, codec) in rule.exact.items():
        if rest in names:
            return _join(rule.sgm, sgm_name), names.index(rest), len(names), codec
    renamed = _rename_below(rest, {new: old for old, new in rule.renames.items()})
    return None if renamed is None else (_join(rule.sgm, renamed), 0, 1, SAME)


def _plan_sgm(keys: Iterable[str], spec: ModelSpec) -> tuple[dict[str, tuple[str, tuple[str, ...], Codec]], list[str]]:
    """sgm key -> (component, diffusers keys, transform) for every mappable key, and the keys no rule maps.

    Ignored keys (is_ignored_sgm_key) appear in neither."""
    rules = {name: _most_specific_first(rs, "sgm") for name, rs in component_rules(spec).items()}
    plan, unmapped = {}, []
    for key in keys:
        if is_ignored_sgm_key(key):
            continue
        name = next((n for n, p in SGM_PREFIXES.items() if key.startswith(p)), None)
        mapped = None if name is None else _map_sgm_key(key[len(SGM_PREFIXES[name]) :], rules[name])
        if mapped is None:
            unmapped.append(key)
        else:
            plan[key] = (name, *mapped)
    return plan, unmapped


def unmapped_sgm_keys(keys: Iterable[str], spec: ModelSpec) -> list[str]:
    """The sgm keys that are neither ignorable nor mapped by any rule for this architecture."""
    return _plan_sgm(keys, spec)[1]


def sgm_to_diffusers(state_dict: StateDict, spec: ModelSpec) -> dict[str, dict[str, torch.Tensor]]:
    """sgm single-file state dict -> {"unet", "text_encoder", "text_encoder_2", "vae"} diffusers state dicts.

    Ignorable keys (is_ignored_sgm_key) are dropped; raises LoadError naming the keys no rule maps."""
    plan, unmapped = _plan_sgm(state_dict, spec)
    if unmapped:
        raise LoadError(f"{len(unmapped)} keys belong to no SDXL component: {name_list(unmapped)}")
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in COMPONENTS}
    for key, (name, names, codec) in plan.items():
        out[name].update(zip(names, codec.to_diffusers(state_dict[key])))
    return out


def diffusers_to_sgm(components: Mapping[str, StateDict], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """{"unet", "text_encoder", "text_encoder_2", "vae"} diffusers state dicts -> one sgm single-file state dict.

    Raises LoadError naming keys no rule maps and fused tensors with missing parts (e.g. q and k without v)."""
    rules = {name: _most_specific_first(rs, "diffusers") for name, rs in component_rules(spec).items()}
    parts: dict[str, list[torch.Tensor | None]] = {}
    codecs: dict[str, Codec] = {}
    unmapped = []
    for name in COMPONENTS:
        for key, tensor in components[name].items():
            if key in IGNORED_DIFFUSERS_KEYS:
                continue
            mapped = _map_diffusers_key(key, rules[name])
            if mapped is None:
                unmapped.append(f"{name}.{key}")
                continue
            sgm_key, slot, slots, codec = mapped
            sgm_key = SGM_PREFIXES[name] + sgm_key
            parts.setdefault(sgm_key, [None] * slots)[slot] = tensor
            codecs[sgm_key] = codec
    incomplete = [k for k, ts in parts.items() if any(t is None for t in ts)]
    if unmapped or incomplete:
        raise LoadError(f"cannot write sgm keys: unmapped {name_list(unmapped)}, incomplete {name_list(incomplete)}")
    return {k: codecs[k].to_sgm(tuple(ts)) for k, ts in parts.items()}
