"""What keeping the text context's k and v saves: one official-size UNet call with and without them.

    python benchmarks/context_kv.py [--device cpu|cuda] [--runs 4]

Times the fast path's UNet (bf16 on CPU, fp16 on CUDA, random weights, 512x512, batch 1) three ways, interleaved,
first repetition dropped: without fused attention (no k/v memo); fused with a new context tensor per call (k and v
projected, as on a pipeline's first step for a new prompt); fused with the same context (k and v kept, as on every
later step and for a cached prompt). Also times the 70 cross-attention k/v projections alone."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdturbo import speed
from sdturbo.bench import _sync, build_ours
from sdturbo.models.configs import PRESETS
from sdturbo.models.unet import make_y


def timed_ms(fn, device: torch.device, setup=None) -> float:
    if setup is not None:
        setup()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    spec = PRESETS["sdxl-turbo"]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        unfused = speed.optimize(build_ours(spec, device, dtype, Path(tmp) / "a"), fuse_qkv=False).unet
        fused = speed.optimize(build_ours(spec, device, dtype, Path(tmp) / "b"), fuse_qkv=True).unet
        cross = [m for m in fused.modules() if isinstance(m, speed.FusedAttention) and not m.is_qkv]
        context = torch.randn(1, 77, spec.unet.context_dim, device=device, dtype=dtype)
        y = make_y(torch.randn(1, spec.text_encoder_2.projection_dim, device=device, dtype=dtype),
                   torch.tensor([[512, 512, 0, 0, 512, 512]], device=device, dtype=dtype), spec.unet)
        x = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
        t = torch.tensor(999.0, device=device).expand(1)

        def project_context():  # untimed: as after a previous step with this context, its k and v are kept
            for m in cross:
                m._kv(context)

        variants = {  # name -> (untimed setup, timed call)
            "unet, k/v not kept (unfused)": (None, lambda: unfused(x, t, context.clone(), y)),
            "unet, new context (k/v projected)": (None, lambda: fused(x, t, context.clone(), y)),
            "unet, same context (k/v kept)": (project_context, lambda: fused(x, t, context, y)),
            f"the {len(cross)} k/v projections alone": (None, lambda: [m._kv(context.clone()) for m in cross]),
        }
        times = {name: [] for name in variants}
        for rep in range(args.runs + 1):
            for name, (setup, fn) in variants.items():
                ms = timed_ms(fn, device, setup)
                if rep:
                    times[name].append(ms)
    print(f"torch {torch.__version__}, {device} {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
          f"median of {args.runs}")
    print("| variant | ms |\n|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {statistics.median(ms):.1f} |")


if __name__ == "__main__":
    main()
