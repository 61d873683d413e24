"""One GPU session's worth of measurements for issue 3, in stages that each print a table and save JSON.

Stages: plain eager (and diffusers, when importable) -> fast path eager -> an fp32 VAE's decode time (--vae-dtype
fp32) -> eager batches -> twice the side (1024x1024, eager) -> fast path compiled with CUDA graphs (mode
reduce-overhead: cold compile time, steady-state parts, exactness against the plain path) -> compiled batches -> bf16
VAE against an fp32 VAE. A stage starts only while the deadline leaves room, so the whole run stays inside
its budget; `--warm-start` instead times a fresh process's first image with the compile cache the first run filled.
Random weights: speed does not depend on their values. Installs nothing; run from the repository root:
    PYTHONPATH=src python3 benchmarks/gpu_check.py [--device cuda] [--config official] [--budget-s 330]"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from sdturbo import speed
from sdturbo.bench import build_ours, build_pair, part_functions, time_parts
from sdturbo.devices import resolve_device, resolve_dtype
from sdturbo.models.configs import PRESETS
from sdturbo.models.vae import AutoencoderKL

T0 = time.perf_counter()


def elapsed_s() -> float:
    return time.perf_counter() - T0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_s(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def measure(stage: str, pipe, ref, args, batch: int = 1, parts_wanted=None) -> list[dict]:
    parts = part_functions(pipe, ref, args.size, batch, [1, 4])
    if parts_wanted:
        parts = {k: v for k, v in parts.items() if k in parts_wanted}
    impls = ["sdturbo", "diffusers"][: len(next(iter(parts.values())))]
    results = time_parts(parts, impls, pipe.device, args.runs, args.warmup)
    rows = []
    for (impl, name), m in results.items():
        row = {"stage": stage, "impl": impl, "part": name, "batch": batch, "median_ms": m.median_ms,
               "min_ms": min(m.times_ms)}
        if name.startswith("end_to_end"):
            row["images_per_s"] = batch * 1000 / m.median_ms
        rows.append(row)
    return rows


def measure_cached_prompt(stage: str, pipe, args) -> list[dict]:
    """End to end with the prompt already encoded: what typing in real time pays for an unchanged prompt."""
    prompts = ["a photograph of a red fox in the snow"]
    parts = {f"end_to_end_{s}_step_cached_prompt": (lambda s=s: pipe(prompts, num_inference_steps=s, height=args.size,
                                                                       width=args.size, seed=0),) for s in (1, 4)}
    pipe.encode_prompt(prompts)
    return [{"stage": stage, "impl": "sdturbo", "part": name, "batch": 1, "median_ms": m.median_ms,
             "min_ms": min(m.times_ms), "images_per_s": 1000 / m.median_ms}
            for (_, name), m in time_parts(parts, ["sdturbo"], pipe.device, args.runs, args.warmup).items()]


def image(pipe, args, steps: int = 1) -> torch.Tensor:
    pipe.prompt_cache.clear()
    out = pipe("a photograph of a red fox in the snow", num_inference_steps=steps, height=args.size, width=args.size,
               seed=0, output_type="pt")
    return out.images.float()


def vae_precision(spec, device, args) -> dict:
    """The fast path's bf16 VAE decode against the plain fp32 VAE, on random weights with PyTorch's default init
    (activations O(1); the real VAE has wider ranges, so treat this as a lower bound on the real error)."""
    torch.manual_seed(0)
    vae32 = AutoencoderKL(spec.vae).to(device).eval()
    plain16 = copy.deepcopy(vae32).to(torch.bfloat16)
    fast16 = copy.deepcopy(plain16)
    speed.use_subpixel_upsample(fast16)
    fast16.to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, device=device)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # a true fp32 reference
    ref = vae32.decode(z).clamp(-1, 1)
    torch.backends.cudnn.allow_tf32 = tf32
    report = {"image_std_fp32": ref.std().item()}
    for name, vae in (("plain_bf16", plain16), ("fast_bf16", fast16)):
        out = vae.decode(z).float().clamp(-1, 1)
        report[name] = {"max_abs_vs_fp32": (out - ref).abs().max().item(),
                        "rel_l2_vs_fp32": ((out - ref).norm() / ref.norm()).item()}
    return report


def vae_fp32_decode(pipe, args) -> list[dict]:
    """The decode `--vae-dtype fp32` pays for diffusers' images, beside the default bf16 one (both fast path, eager)."""
    vae32 = copy.deepcopy(pipe.vae).float()
    z = torch.randn(1, 4, args.size // 8, args.size // 8, device=pipe.device)
    parts = {"vae_decode_bf16": (lambda: pipe.vae.decode(z),), "vae_decode_fp32": (lambda: vae32.decode(z),)}
    return [{"stage": "vae_dtype", "impl": "sdturbo", "part": name, "batch": 1, "median_ms": m.median_ms,
             "min_ms": min(m.times_ms)}
            for (_, name), m in time_parts(parts, ["sdturbo"], pipe.device, args.runs, args.warmup).items()]


def print_rows(rows: list[dict]) -> None:
    print(f"{'stage':<26}{'impl':<10}{'part':<34}{'batch':>6}{'median ms':>11}{'min ms':>9}{'img/s':>8}", flush=True)
    for r in rows:
        ips = f"{r['images_per_s']:>8.1f}" if "images_per_s" in r else ""
        print(f"{r['stage']:<26}{r['impl']:<10}{r['part']:<34}{r['batch']:>6}{r['median_ms']:>11.2f}{r['min_ms']:>9.2f}"
              f"{ips}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--config", default="official", choices=["official", "small"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="CUDA graphs record on the 2nd call, replay from the 3rd")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16], help="for images/s at the best batch")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no stage that would end after this")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--skip-compile", action="store_true", help="for a quick CPU dry run")
    p.add_argument("--warm-start", action="store_true", help="only: time to the first compiled image (cache warm)")
    p.add_argument("--json", default=None, help="default: $OUT/gpu_check[_warm].json when $OUT is set")
    args = p.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)
    if args.config == "small":
        args.size = min(args.size, 64)
    out_json = args.json or (os.path.join(os.environ["OUT"], "gpu_check_warm.json" if args.warm_start else
                                          "gpu_check.json") if os.environ.get("OUT") else None)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": str(dtype), "size_px": args.size, "config": args.config, "rows": [], "notes": {}}

    def save(stage: str) -> None:
        report["notes"][f"{stage}_done_at_s"] = round(elapsed_s(), 1)
        if out_json:
            Path(out_json).write_text(json.dumps(report, indent=2))

    def room_for(stage_s: float) -> bool:
        return elapsed_s() + stage_s < args.budget_s

    def stage(name: str, fn) -> None:
        """Run one stage; a failure is recorded and the run goes on, so one broken path costs one stage."""
        try:
            rows = fn() or []
        except Exception as e:  # noqa: BLE001 - the report must survive any one stage
            report["notes"][f"{name}_error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"stage {name} failed: {report['notes'][f'{name}_error']}", flush=True)
            rows = []
        report["rows"] += rows
        save(name)
        print_rows(rows)

    try:
        import diffusers  # noqa: F401

        with_diffusers = not args.warm_start
    except ImportError:
        with_diffusers = False
    report["notes"]["diffusers"] = with_diffusers
    spec = PRESETS["sdxl-turbo" if args.config == "official" else "tiny"]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        if with_diffusers:
            pipe, ref = build_pair(spec, device, dtype, Path(tmp))
        else:
            pipe, ref = build_ours(spec, device, dtype, Path(tmp)), None
        report["notes"]["build_s"] = round(elapsed_s(), 1)
        print(f"built in {elapsed_s():.1f} s on {report['device']}, diffusers: {with_diffusers}", flush=True)

        if args.warm_start:
            speed.optimize(pipe, compile=True, compile_mode=args.compile_mode)
            t = time.perf_counter()
            image(pipe, args)
            sync(device)
            report["notes"]["first_image_s_warm_cache"] = time.perf_counter() - t
            print(f"first compiled image with a warm cache: {report['notes']['first_image_s_warm_cache']:.1f} s")
            save("warm_start")
            return

        plain_image = image(pipe, args)
        stage("plain_eager", lambda: measure("plain_eager", pipe, ref, args))
        ref = None  # diffusers is done; the weights it shares with ours stay

        def fast_eager():
            speed.optimize(pipe, compile=False)
            report["notes"]["fast_eager_max_abs_vs_plain"] = (image(pipe, args) - plain_image).abs().max().item()
            return measure("fast_eager", pipe, None, args) + measure_cached_prompt("fast_eager", pipe, args)

        stage("fast_eager", fast_eager)
        if room_for(30):
            stage("vae_dtype", lambda: vae_fp32_decode(pipe, args))
        batch_parts = {"end_to_end_1_step", "unet", "vae_decode"}
        for batch in args.batches:  # eager first: no compile per batch size
            if room_for(30):
                stage(f"batch_fast_eager_{batch}", lambda b=batch: measure("batch_fast_eager", pipe, None, args, b,
                                                                            parts_wanted=batch_parts))
        if room_for(40):  # before compiling: afterwards a new size would compile every network again
            big = argparse.Namespace(**{**vars(args), "size": 2 * args.size, "runs": 3, "warmup": 1})
            stage("size_2x", lambda: measure(f"fast_eager_{big.size}px", pipe, None, big, parts_wanted=batch_parts))

        def compiled():
            pipe.unet.to(memory_format=torch.channels_last)  # what optimize picks on CUDA with compile
            pipe.vae.to(memory_format=torch.channels_last)
            speed.compile_models(pipe, args.compile_mode)
            report["notes"]["first_image_s_cold_compile"] = timed_s(lambda: image(pipe, args), device)
            report["notes"]["first_4_step_image_s_after_1_step"] = timed_s(lambda: image(pipe, args, 4), device)
            report["notes"]["compiled_max_abs_vs_plain"] = (image(pipe, args) - plain_image).abs().max().item()
            name = f"compiled_{args.compile_mode}"
            return measure(name, pipe, None, args) + measure_cached_prompt(name, pipe, args)

        if not args.skip_compile and room_for(200):
            stage("compiled", compiled)
        if "first_image_s_cold_compile" in report["notes"]:  # each new batch size compiles every network again
            for batch in args.batches[::-1]:
                if room_for(150):
                    stage(f"batch_compiled_{batch}", lambda b=batch: measure("batch_compiled", pipe, None, args, b,
                                                                              parts_wanted=batch_parts))
        if room_for(20):
            stage("vae_precision", lambda: report["notes"].update(vae_precision=vae_precision(spec, device, args)))
    print(json.dumps(report["notes"], indent=1), flush=True)
    print_rows(report["rows"])


if __name__ == "__main__":
    main()
