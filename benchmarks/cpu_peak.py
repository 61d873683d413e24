"""The CPU's attainable bf16 throughput, and the time floor it puts under an exact SDXL-Turbo image.

    python benchmarks/cpu_peak.py [--threads N]

Times one large bf16 GEMM and the 3x3 convolutions of the VAE decoder's four resolutions (channels_last), median
of a few runs, and divides the pipeline's FLOPs (issue 3: UNet 1.59 TFLOP per step, VAE decoder 2.51, text encoders
0.11) by the best rate seen. No implementation that computes the same convolutions and matmuls can beat that floor
on this machine; compare it with `sdturbo bench` and with 0.35x diffusers' time."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

UNET_TFLOP, VAE_DECODER_TFLOP, TEXT_TFLOP = 1.59, 2.51, 0.11
SUBPIXEL_SAVING = 0.28  # share of the decoder's FLOPs the exact sub-pixel upsample rewrite (speed.py) removes


def gflops(fn, flop: float, runs: int = 5) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernel
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flop / sorted(times)[len(times) // 2] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rates = {}
    n = 4096
    a, b = (torch.randn(n, n, dtype=torch.bfloat16) for _ in range(2))
    rates[f"bf16 GEMM {n}^3"] = gflops(lambda: a @ b, 2 * n**3)
    af, bf = a.float(), b.float()
    rates[f"fp32 GEMM {n}^3"] = gflops(lambda: af @ bf, 2 * n**3)
    for channels, size in ((512, 64), (512, 128), (256, 256), (128, 512)):  # the VAE decoder's levels
        x = torch.randn(1, channels, size, size, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        flop = 2 * channels * channels * 9 * size * size
        rates[f"bf16 conv3x3 {channels}ch {size}px"] = gflops(lambda: F.conv2d(x, w, padding=1), flop, runs=3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| kernel | GFLOP/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} |")
    best = max(v for k, v in rates.items() if k.startswith("bf16"))
    print(f"\nfloor at the best bf16 rate ({best:.0f} GFLOP/s), 512x512, batch 1:")
    for steps in (1, 4):
        tflop = steps * UNET_TFLOP + VAE_DECODER_TFLOP + TEXT_TFLOP
        fast = tflop - SUBPIXEL_SAVING * VAE_DECODER_TFLOP
        print(f"  {steps} step(s): {tflop:.2f} TFLOP -> {tflop / best * 1e3:.1f} s;"
              f" with the sub-pixel upsample {fast:.2f} TFLOP -> {fast / best * 1e3:.1f} s")


if __name__ == "__main__":
    main()
