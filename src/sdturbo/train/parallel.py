"""Parallelism and memory savers, applied to the plain single-device models after they are built (torchtitan
style), so the training code stays single-device code.

Data parallelism: each rank reads its own examples (the data stream and the step generators take the rank), and
average_gradients runs before every optimizer step. With no process group (a plain `python` run) the helpers
report one process and do nothing; under torchrun init_distributed joins the group the launcher describes (gloo
on CPU, nccl on GPUs).

In the order the driver applies them:
  activation checkpointing   recompute the student's and the VAE decoder's blocks in backward (spec-add §13.2);
  FSDP2 (fully_shard)        shard the student, its EMA, their gradients and AdamW moments over the ranks, for
                             students whose training state does not fit one GPU."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..models.layers import ResnetBlock2D
from ..models.unet import BasicTransformerBlock, UNet
from ..models.vae import AutoencoderKL, MidAttention

PARALLELISMS = ("dp", "fsdp")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> torch.device:
    """Join torchrun's process group if launched by it (WORLD_SIZE set, also to 1) and return this rank's device:
    "auto" is the GPU numbered LOCAL_RANK when there are GPUs, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of every parameter's gradient over the ranks, in one flat all-reduce; nothing to do on one process.

    Explicit averaging rather than a DistributedDataParallel wrapper: the discriminator heads run in both the
    discriminator and the student update but are trained only in the first, which DDP's per-forward gradient hooks
    do not allow without unwrapping. FSDP-sharded parameters (DTensor) are skipped: their gradients arrive
    reduce-scattered, already averaged."""
    _, world = rank_and_world()
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _blocks(module: nn.Module, kinds: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kinds)]


def apply_activation_checkpointing(student: UNet, vae: AutoencoderKL) -> None:
    """Keep only block inputs during forward and recompute the blocks in backward: every ResBlock and transformer
    block of the student, and of the VAE decoder, which decodes the student's output with gradient at full
    resolution, the largest activations of an ADD step. Parameter names do not change (composable checkpoint)."""
    for block in _blocks(student, (ResnetBlock2D, BasicTransformerBlock)):
        checkpoint(block)
    for block in _blocks(vae.decoder, (ResnetBlock2D, MidAttention)):
        checkpoint(block)


def apply_fsdp(student: UNet, ema: UNet | None, device: torch.device, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over all ranks: each ResBlock and transformer block is one unit (gathered just before it runs, freed
    after), the rest of the UNet (embeddings, projections, conv_in/out) the root unit. The EMA copy is sharded
    alike so that its update is a local lerp of shards; it never runs forward in training.

    param_dtype: the dtype blocks are gathered and run in (bf16 halves traffic); gradients are reduced in fp32
    and the sharded master weights stay in their own dtype."""
    if not dist.is_initialized():
        raise ValueError("FSDP shards over a process group: launch with torchrun (also for one GPU)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for model in (student, ema):
        if model is None:
            continue
        for block in _blocks(model, (ResnetBlock2D, BasicTransformerBlock)):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
