"""One full-size ADD training step on one GPU: peak memory and time per step.

SDXL student and teacher at the official sizes (2.57B-parameter UNets) with random weights, the SDXL VAE decoding
the student's output with gradient at 512 x 512, the DINOv2 ViT-S/14 discriminator with its ViT-L/14 image
condition and R1, EMA, AdamW, batch 1: loop.train_step exactly as `sdturbo train add` runs it, with activation
checkpointing and bf16 autocast. The text encoders are not part of a step (the driver caches their outputs), so
the conditioning is random.

Models are built on the meta device and get their random weights directly on the GPU in their final dtype, so
construction takes seconds and never holds an fp32 or host copy. Two variants, each built from scratch:
  bf16         every weight, gradient and AdamW moment in bf16: the smallest footprint
  fp32-master  the student and EMA in fp32 (master weights, gradients, moments), frozen models in bf16, forwards
               under bf16 autocast: what `sdturbo train add --precision bf16` runs

    python benchmarks/gpu_add_step.py                      # official sizes on the GPU
    python benchmarks/gpu_add_step.py --config tiny --device cpu   # the same code on TINY, seconds on a CPU

Prints a table and writes it as JSON to $OUT/gpu_add_step.json when OUT is set (or to --json)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdturbo.models.configs import SDXL_TURBO, TINY, ModelSpec
from sdturbo.models.unet import UNet
from sdturbo.models.vae import AutoencoderKL
from sdturbo.train.discriminator import (
    DISCRIMINATOR_SDXL,
    DISCRIMINATOR_TINY,
    DiscriminatorConfig,
    ProjectedDiscriminator,
)
from sdturbo.train.loop import (
    ADDBatch,
    ADDConfig,
    ADDModels,
    Optimizers,
    build_models,
    build_optimizers,
    train_step,
    unet_conditioning,
)
from sdturbo.train.parallel import apply_activation_checkpointing

CONFIGS: dict[str, tuple[ModelSpec, DiscriminatorConfig, int]] = {
    "official": (SDXL_TURBO, DISCRIMINATOR_SDXL, 512),
    "tiny": (TINY, DISCRIMINATOR_TINY, 64),
}
VARIANTS = ("bf16", "fp32-master")


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A meta-built module -> random weights of `dtype` on `device`: storage is allocated where it lives
    (to_empty) and every layer re-runs its own initialisation (reset_parameters) on it."""
    module.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
            elif any(True for _ in layer.parameters(recurse=False)):
                raise TypeError(f"{type(layer).__name__} has parameters but no reset_parameters")
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


@dataclass
class Setup:
    models: ADDModels
    optimizers: Optimizers
    batch: ADDBatch
    student_params: int


def build(config: str, variant: str, device: torch.device, batch_size: int) -> Setup:
    spec, disc_cfg, size_px = CONFIGS[config]
    frozen = torch.bfloat16
    with torch.device("meta"):
        teacher, vae = UNet(spec.unet), AutoencoderKL(spec.vae)
    materialize(teacher, device, frozen)
    materialize(vae, device, frozen)
    with torch.device(device):
        disc = ProjectedDiscriminator(disc_cfg)  # the heads train in fp32; their spectral norm is set up here
    disc.feature_net.to(frozen)
    disc.image_net.to(frozen)
    add_cfg = ADDConfig()
    models = build_models(teacher, vae, disc, add_cfg)
    if variant == "fp32-master":
        models.student.float()
        models.ema.float()
    apply_activation_checkpointing(models.student, models.vae)
    optimizers = build_optimizers(models, add_cfg)

    g = torch.Generator().manual_seed(0)
    image = (torch.rand(batch_size, 3, size_px, size_px, generator=g) * 2 - 1).to(device)
    context = torch.randn(batch_size, 77, spec.unet.context_dim, generator=g).to(device, frozen)
    pooled = torch.randn(batch_size, spec.text_encoder_2.projection_dim, generator=g).to(device, frozen)
    batch = ADDBatch(image, unet_conditioning(context, pooled, size_px, spec.unet), pooled)
    return Setup(models, optimizers, batch, sum(p.numel() for p in models.student.parameters()))


def run_variant(config: str, variant: str, device: torch.device, batch_size: int, warmup: int, steps: int) -> dict:
    row = {"variant": variant}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    setup = build(config, variant, device, batch_size)
    sync(device)
    row["build_s"] = round(time.perf_counter() - t0, 1)
    row["student_params_b"] = round(setup.student_params / 1e9, 3)
    if device.type == "cuda":
        row["weights_gb"] = gib(torch.cuda.memory_allocated(device))  # before AdamW allocates its moments
    times, metrics = [], {}
    for step in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            metrics = train_step(setup.models, setup.optimizers, setup.batch, ADDConfig(), step)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    row["step_s"] = round(statistics.median(times), 3)
    row["images_per_s"] = round(batch_size / row["step_s"], 2)
    row["losses_finite"] = all(torch.isfinite(torch.tensor(v)).item() for v in metrics.values())
    if device.type == "cuda":
        row["peak_memory_gb"] = gib(torch.cuda.max_memory_allocated(device))
        row["peak_reserved_gb"] = gib(torch.cuda.max_memory_reserved(device))
    return row


def format_table(report: dict) -> str:
    columns = ["variant", "student_params_b", "build_s", "weights_gb", "peak_memory_gb", "peak_reserved_gb",
               "step_s", "images_per_s", "losses_finite", "error"]
    columns = [c for c in columns if any(c in row for row in report["rows"])]
    title = (f"ADD step, {report['config']} sizes, batch {report['batch_size']}, {report['size_px']} px, "
             f"{report['device']} (median of {report['steps']} steps after {report['warmup']} warm-up)")
    lines = [title, " | ".join(columns)]
    lines += [" | ".join(str(row.get(c, "")) for c in columns) for row in report["rows"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="official", choices=list(CONFIGS))
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--json", default=None, help="JSON path (default: $OUT/gpu_add_step.json if OUT is set)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    report = {"config": args.config, "batch_size": args.batch_size, "size_px": CONFIGS[args.config][2],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "warmup": args.warmup, "steps": args.steps, "rows": []}
    path = Path(args.json) if args.json else None
    if path is None and os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_add_step.json"
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        try:
            report["rows"].append(run_variant(args.config, variant, device, args.batch_size, args.warmup, args.steps))
        except torch.OutOfMemoryError as e:  # the other variant may still fit: report and go on
            report["rows"].append({"variant": variant, "error": f"out of memory: {str(e).splitlines()[0]}"})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # After every variant, so that a run cut short still leaves what it measured.
        print(format_table(report), flush=True)
        if path:
            path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
