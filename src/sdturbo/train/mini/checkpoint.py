"""Stage checkpoints: one safetensors file per stage under the work dir, written atomically so a killed run resumes
from its last save. A finished stage is marked by `done: True`; the next stages read its models from there.

A state is a nested dict (model and optimizer state dicts, step counters, flags): its tensors go into the
safetensors file and its structure into the file's JSON metadata, so nothing is ever unpickled."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open
from torch import nn

from ...loading.single_file import save_tensors
from ...models.configs import TextEncoderConfig, UNetConfig, VAEConfig

STRUCTURE_KEY = "sdturbo.structure"
CONFIG_CLASSES = {cls.__name__: cls for cls in (UNetConfig, TextEncoderConfig, VAEConfig)}  # configs a state may hold


def _encode(value, tensors: dict[str, torch.Tensor]):
    """Replace each tensor by a reference into `tensors`; keep dict keys' types (optimizer state uses int keys)."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if type(value).__name__ in CONFIG_CLASSES:
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"config": [type(value).__name__, _encode(fields, tensors)]}
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def _decode(node, tensors: dict[str, torch.Tensor]):
    kind, payload = next(iter(node.items()))
    if kind == "tensor":
        return tensors[payload]
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in payload}
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors) for v in payload]
        return tuple(items) if kind == "tuple" else items
    if kind == "config":
        name, fields = payload
        return CONFIG_CLASSES[name](**_decode(fields, tensors))
    return payload


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    tmp = path.with_suffix(".tmp")
    save_tensors(tensors, tmp, metadata={STRUCTURE_KEY: json.dumps(structure)})
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        structure = json.loads(f.metadata()[STRUCTURE_KEY])
    return _decode(structure, load_file(str(path)))


def require_done(path: Path, stage: str) -> dict:
    state = load_checkpoint(path)
    if state is None or not state.get("done"):
        raise ValueError(f"stage {stage!r} has not finished (no completed checkpoint at {path}); run it first "
                         f"(sdturbo train mini --stage {stage} --workdir {path.parent})")
    return state


def resume(state: dict | None, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Load a stage's modules (by their key in the checkpoint) and optimizer; returns the step to continue from."""
    if state is None:
        return 0
    for key, module in modules.items():
        module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * warmup_cosine(step, total, warmup)


def clipped_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, max_norm: float = 1.0) -> None:
    """One optimizer update of every mini stage: backward, clip the gradient norm of `params`, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
