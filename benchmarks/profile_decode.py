"""Where the fast path's VAE decode spends its time: torch.profiler's operator table for one official-size decode.

    python benchmarks/profile_decode.py [--size 512] [--dtype bf16]

Random weights (speed does not depend on their values), CPU, the fast path's decoder (sub-pixel upsampling,
channels_last, kept freed memory), one warm-up decode, then one timed and one profiled decode. The convolutions'
share tells how much any rewrite of the other operators could gain."""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sdturbo import speed
from sdturbo.devices import resolve_dtype
from sdturbo.models.configs import SDXL_TURBO
from sdturbo.models.vae import AutoencoderKL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--dtype", default="bf16", help="bf16 or fp32")
    args = parser.parse_args()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    torch.manual_seed(0)
    vae = AutoencoderKL(SDXL_TURBO.vae).to(dtype).eval()
    speed.use_subpixel_upsample(vae)
    vae.to(memory_format=torch.channels_last)
    speed.keep_freed_memory()
    side = args.size // SDXL_TURBO.vae.downscale_factor
    z = torch.randn(1, SDXL_TURBO.vae.latent_channels, side, side, dtype=dtype)
    with torch.no_grad():
        vae.decode(z)
        started = time.perf_counter()
        vae.decode(z)
        print(f"decode {args.size}x{args.size} {args.dtype}: {time.perf_counter() - started:.2f} s")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            vae.decode(z)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
