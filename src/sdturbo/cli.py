"""`sdturbo` command line: parses arguments and calls the library. Bad input ends in one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import warnings
from pathlib import Path

from .limits import MAX_IMAGES_PER_PROMPT, MAX_SIDE_PX, MAX_STEPS, VAE_FACTOR
from .serve import add_serve_arguments, serve_main

DEFAULT_MODEL = "stabilityai/sdxl-turbo"
SEED_LIMIT = 2**64  # torch generators take seeds below it
SUBSTEP_SEED_LIMIT = 2**32  # numpy's RandomState, for --schedule substep, takes seeds below it
DEFAULT_STRENGTH = 0.5
BENCH_SIDE_PX = {"official": 512, "small": 64}  # bench.run_bench runs the small sizes at 64 at most
BENCH_MIN_SIDE_PX = 64  # the small sizes' side; smaller images would time overheads more than the networks


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    return w, h


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="sdturbo.png", help="PNG path; with --n > 1, -0, -1, ... are appended")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, diffusers folder, single .safetensors file, or mini")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id, for single-file checkpoints")
    p.add_argument("--steps", type=int, default=1,
                   help=f"sampling steps, 1-4 for turbo models, at most {MAX_STEPS} (default 1)")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed + i; random (and printed) if omitted")
    p.add_argument("--n", type=int, default=1, help=f"number of images, 1 to {MAX_IMAGES_PER_PROMPT}")
    p.add_argument("--size", type=_parse_size, default=None,
                   help=f"WIDTHxHEIGHT, multiples of 8 up to {MAX_SIDE_PX} (default: the model's; with --image, the "
                   "image's size rounded down to multiples of 8)")
    p.add_argument("--image", default=None, help="input image for image-to-image")
    p.add_argument("--strength", type=float, default=None,
                   help=f"with --image: how much to change the image, in (0, 1] (default {DEFAULT_STRENGTH})")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance; > 1 turns it on")
    p.add_argument("--negative-prompt", default=None, help="used only with --guidance-scale > 1")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    add_vae_dtype_argument(p)
    p.add_argument("--schedule", default="trailing", choices=["trailing", "substep"])
    add_speed_arguments(p)


def add_vae_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the VAE's precision; auto: --dtype, but bf16 instead of fp16 (the SDXL VAE overflows in fp16); "
                   "fp32 reproduces diffusers' fp16 images at a slower decode")


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="the fast path (sdturbo.speed.optimize; on by default): exact rewrites, same images within "
                   "rounding, no start-up cost; --no-fast runs the plain path that the diffusers parity tests check")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also torch.compile the networks (implies --fast; on a CPU the UNet alone): faster per image, but "
                   "the first call of each size compiles for minutes unless the cache (~/.cache/sdturbo/inductor) is "
                   "warm")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (default: reduce-overhead, i.e. CUDA graphs, on a GPU)")


def check_generate_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model, so that they fail in milliseconds rather than after the load."""
    if not 1 <= args.n <= MAX_IMAGES_PER_PROMPT:
        raise UserError(f"--n must be from 1 to {MAX_IMAGES_PER_PROMPT}, got {args.n}")
    if not 1 <= args.steps <= MAX_STEPS:
        raise UserError(f"--steps must be from 1 to {MAX_STEPS} (1-4 for turbo models), got {args.steps}")
    if args.size and not all(VAE_FACTOR <= v <= MAX_SIDE_PX and v % VAE_FACTOR == 0 for v in args.size):
        w, h = args.size
        raise UserError(f"--size {w}x{h}: width and height must be multiples of {VAE_FACTOR} from {VAE_FACTOR} to "
                        f"{MAX_SIDE_PX}, such as {_nearest_side(w)}x{_nearest_side(h)}")
    if args.strength is not None:
        if args.image is None:
            raise UserError("--strength applies to image-to-image: pass --image too, or drop --strength")
        if not 0 < args.strength <= 1:
            raise UserError(f"--strength must be in (0, 1], got {args.strength}")
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    if args.image is not None and (steps := _img2img_steps(args.steps, strength)) > MAX_STEPS:
        raise UserError(f"--strength {strength} needs --steps {steps} or more to run one step; the most is {MAX_STEPS}: "
                        f"use --strength {1 / MAX_STEPS:g} or more")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise UserError(f"--guidance-scale must be 0 or more, got {args.guidance_scale}")
    if args.seed is not None:
        _check_seed(args.seed, args.n, args.steps, args.schedule)


def _img2img_steps(steps: int, strength: float) -> int:
    """The pipeline's rule: img2img runs int(steps * strength) steps, and raises steps where that is 0."""
    return steps if steps * strength >= 1 else math.ceil(1 / strength)


def _nearest_side(v: int) -> int:
    return min(max(v - v % VAE_FACTOR, VAE_FACTOR), MAX_SIDE_PX)


def _check_seed(seed: int, n: int, steps: int, schedule: str) -> None:
    """Image i gets seed + i, and each of those must be a valid seed."""
    if schedule == "substep":  # numpy noise: draw k of an image uses RandomState(its seed + k)
        limit, rule = SUBSTEP_SEED_LIMIT - steps, "--schedule substep needs seed + --steps below 2**32"
    else:
        limit, rule = SEED_LIMIT, "seeds must stay below 2**64"
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}")
    if seed + n > limit:
        images = f"with --n {n}, image i gets seed + i, and " if n > 1 else ""
        raise UserError(f"--seed {seed} is too large: {images}{rule}; pass a --seed of at most {limit - n}")


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise UserError(f"output {output} must end in .png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def load_input_image(path: str, size: tuple[int, int] | None):
    """Without --size the output takes the image's size rounded down to multiples of 8, so that size is checked from
    the header, before decoding: a huge image fails at once instead of after a load and gigabytes of memory."""
    from PIL import Image, UnidentifiedImageError

    from .pipeline import rgb_image

    try:
        with warnings.catch_warnings():  # the user's own file: the size check is the guard, not PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if size is None:
                _check_image_size(*im.size)
            im.load()
            return rgb_image(im)  # not convert("RGB"), which clips 16-bit images to white
    except FileNotFoundError:
        raise UserError(f"input image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UserError(f"input image {path} cannot be read as an image ({e})") from None


def _check_image_size(w: int, h: int) -> None:
    if max(w - w % VAE_FACTOR, h - h % VAE_FACTOR) > MAX_SIDE_PX:
        raise UserError(f"--image is {w}x{h}; the largest side is {MAX_SIDE_PX}: pass --size WxH to resize it")
    if min(w, h) < VAE_FACTOR:
        raise UserError(f"--image is {w}x{h}; the smallest side is {VAE_FACTOR}: pass --size WxH to resize it")


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from .output import check_writable, save_png
    from .pipeline import TurboPipeline

    check_generate_arguments(args)
    paths = output_paths(args.output, args.n)
    for path in paths:
        try:
            check_writable(path)
        except OSError as e:
            raise UserError(str(e)) from None
    image = load_input_image(args.image, args.size) if args.image else None
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    if args.seed is None:
        print(f"seed: {seed}")
    width, height = args.size if args.size else (None, None)
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    steps = _img2img_steps(args.steps, strength) if image is not None else args.steps
    if steps != args.steps:  # the pipeline would warn too, in its own argument names
        warnings.warn(f"--steps {args.steps} x --strength {strength} runs no step; using --steps {steps}")

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr)
    pipe = TurboPipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, vae_dtype=args.vae_dtype
    )
    if args.fast or args.compile:
        from .speed import optimize

        optimize(pipe, compile=args.compile, compile_mode=args.compile_mode)
    dtypes = str(pipe.dtype).replace("torch.", "") + f", VAE {str(pipe.vae_dtype).replace('torch.', '')}"
    print(f"loaded in {time.perf_counter() - t0:.1f} s ({pipe.device}, {dtypes})", file=sys.stderr)

    t0 = time.perf_counter()
    out = pipe(
        args.prompt,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        height=height,
        width=width,
        num_images_per_prompt=args.n,
        negative_prompt=args.negative_prompt,
        image=image,
        strength=strength,
        seed=[seed + i for i in range(args.n)],
        schedule=args.schedule,
    )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    for im, params, path in zip(out.images, out.parameters, paths):
        try:
            save_png(im, path, params)
        except OSError as e:  # strerror: the message without the name of the temporary file it failed on
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        print(path)
    print(f"generated {args.n} image(s) in {elapsed:.2f} s", file=sys.stderr)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="official", choices=["official", "small"],
                   help="official SDXL-Turbo sizes (default) or the tiny test sizes for a quick look")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    add_vae_dtype_argument(p)
    p.add_argument("--runs", type=int, default=3, help="timed repetitions; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4],
                   help=f"end-to-end step counts to time, each 1 to {MAX_STEPS}")
    p.add_argument("--batch", type=int, default=1, help=f"images per call, 1 to {MAX_IMAGES_PER_PROMPT}")
    p.add_argument("--size", type=int, default=None,
                   help=f"square image side in pixels, a multiple of 8 from {BENCH_MIN_SIDE_PX} to {MAX_SIDE_PX} "
                   f"(default {BENCH_SIDE_PX['official']}; --config small runs at {BENCH_SIDE_PX['small']} only)")
    p.add_argument("--no-diffusers", action="store_true", help="time sdturbo only")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    add_speed_arguments(p)


def run_bench(args: argparse.Namespace) -> None:
    import json

    from .bench import format_table, run_bench as bench
    from .output import check_writable

    check_bench_arguments(args)
    if args.json:
        try:
            check_writable(args.json, "--json", "bench.json")
        except OSError as e:
            raise UserError(str(e)) from None
    try:
        report = bench(config=args.config, device=args.device, dtype=args.dtype, runs=args.runs, warmup=args.warmup,
                       steps=tuple(args.steps), batch=args.batch, size_px=args.size or BENCH_SIDE_PX[args.config],
                       with_diffusers=not args.no_diffusers, fast=args.fast, compile=args.compile,
                       compile_mode=args.compile_mode, vae_dtype=args.vae_dtype)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    print(format_table(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2))
        except OSError as e:
            raise UserError(f"cannot write {args.json}: {e.strerror or e}") from None


def check_bench_arguments(args: argparse.Namespace) -> None:
    if args.runs < 1 or args.warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0")
    if not 1 <= args.batch <= MAX_IMAGES_PER_PROMPT:
        raise UserError(f"--batch must be from 1 to {MAX_IMAGES_PER_PROMPT}, got {args.batch}")
    for steps in args.steps:
        if not 1 <= steps <= MAX_STEPS:
            raise UserError(f"--steps must each be from 1 to {MAX_STEPS}, got {steps}")
    if args.size is None:
        return
    if not (BENCH_MIN_SIDE_PX <= args.size <= MAX_SIDE_PX and args.size % VAE_FACTOR == 0):
        raise UserError(f"--size must be a multiple of {VAE_FACTOR} from {BENCH_MIN_SIDE_PX} to {MAX_SIDE_PX}, "
                        f"got {args.size}")
    if args.config == "small" and args.size != BENCH_SIDE_PX["small"]:
        raise UserError(f"--config small runs at {BENCH_SIDE_PX['small']}x{BENCH_SIDE_PX['small']} only: drop "
                        f"--size {args.size}, or time the official sizes with --config official")


def run_serve(args: argparse.Namespace) -> None:
    code = serve_main(args)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdturbo", description="SDXL-Turbo inference and ADD training")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="draw images from a prompt (and optionally an input image)")
    add_generate_arguments(gen)
    gen.set_defaults(func=run_generate)
    serve = sub.add_parser("serve", help="the real-time demo page and the HTTP API (127.0.0.1:8000 by default)")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    train = sub.add_parser("train", help="train with Adversarial Diffusion Distillation")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    from .train.driver import add_train_add_arguments, run_train_add

    train_add = train_sub.add_parser("add", help="distill a teacher into a 1-4 step student (torchrun for many GPUs)")
    add_train_add_arguments(train_add)
    train_add.set_defaults(func=run_train_add)
    from .train.mini.cli import add_train_arguments as add_train_mini_arguments, run_train as run_train_mini

    train_mini = train_sub.add_parser("mini", help="train sdturbo-mini from scratch, stage by stage (resumable)")
    add_train_mini_arguments(train_mini)
    train_mini.set_defaults(func=run_train_mini)
    from .eval.cli import add_eval_arguments, run_eval

    evaluate = sub.add_parser("eval", help="the model card's evaluation in miniature: FID and prompt alignment")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)
    bench = sub.add_parser("bench", help="time sdturbo against diffusers on the same random weights")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def run_command(func, args: argparse.Namespace) -> int:
    """Run one command's function as the command line does: warnings and bad input in one line each (exit 2 for bad
    input), Ctrl+C as "interrupted" (exit 130). Also for the `python -m` entry points of single commands."""
    warnings.showwarning = _one_line_warning
    from .loading import LoadError

    try:
        code = func(args)
    except (UserError, ValueError, LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
