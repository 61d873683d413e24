"""Data parallelism that leaves the training code single-device: each rank reads its own examples (the data stream
and the step generators take the rank), and average_gradients runs before every optimizer step. With no process
group (a plain `python` run) both helpers report one process and do nothing; under torchrun they use the group
the launcher set up (gloo on CPU, nccl on GPUs)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of every parameter's gradient over the ranks, in one flat all-reduce; nothing to do on one process.

    Explicit averaging rather than a DistributedDataParallel wrapper: the discriminator heads run in both the
    discriminator and the student update but are trained only in the first, which DDP's per-forward gradient hooks
    do not allow without unwrapping."""
    _, world = rank_and_world()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
