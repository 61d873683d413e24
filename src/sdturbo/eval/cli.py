"""`sdturbo eval --json PATH [--num-images N] [--rows ...] [--models-dir DIR]`: argument parsing and the table.

The models directory holds one diffusers folder per model: teacher/, add/, adv-only/, distill-only/. When add/ is
absent, the bundled sdturbo-mini (the ADD student) stands in for it."""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

from .run import ROW_NAMES, ROWS

DEFAULT_MODELS_DIR = Path("runs/mini/models")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, required=True, help="where the results go")
    parser.add_argument("--num-images", type=int, default=1000, help="images per row (default 1000)")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES), help="rows to run (default all)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help=f"teacher/, add/, adv-only/, distill-only/ diffusers folders (default: "
                        f"{DEFAULT_MODELS_DIR}; if that is absent, only the add rows run, on the bundled sdturbo-mini)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per pipeline call")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="the generators'")
    parser.add_argument("--eval-net", type=Path, default=None, help="evaluation network weights (default: shipped)")


def format_table(result: dict) -> str:
    """The rows, then the references, as a Markdown table; missing rows are listed with their note."""
    lines = ["| row | steps | FID ↓ | alignment ↑ | s / image |", "|---|---|---|---|---|"]
    references = [{**r, "steps": "-", "seconds_per_image": None} for r in result["references"]]
    for r in [*result["rows"], *references]:
        if r["fid"] is None:
            lines.append(f"| {r['name']} | {r['steps']} | - | - | - ({r['note']}) |")
            continue
        seconds = "-" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.4f}"
        lines.append(f"| {r['name']} | {r['steps']} | {r['fid']:.2f} | {100 * r['alignment']:.1f}% | {seconds} |")
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> Path:
    """Everything checkable before the (minutes-long) run; -> the models directory."""
    if args.num_images < 2:
        raise ValueError(f"--num-images must be at least 2 (FID needs a covariance), got {args.num_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.json.is_dir():
        raise ValueError(f"--json {args.json} is a folder; give a file name such as {args.json / 'eval.json'}")
    if not args.json.parent.is_dir():
        raise ValueError(f"--json: folder {args.json.parent} does not exist; create it or choose another path")
    if not os.access(args.json.parent, os.W_OK):
        raise ValueError(f"--json: folder {args.json.parent} is not writable; choose another path")
    if args.eval_net is not None and not args.eval_net.is_file():
        raise ValueError(f"--eval-net {args.eval_net} does not exist; give an evaluation network .safetensors file "
                         "or leave the flag out for the shipped one")
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise ValueError(f"--models-dir {args.models_dir} is not a folder; python -m sdturbo.eval.models writes one")
    if args.models_dir is None and not DEFAULT_MODELS_DIR.is_dir():  # a fresh checkout: only the shipped model
        warnings.warn(f"no {DEFAULT_MODELS_DIR} (python -m sdturbo.eval.models writes it, or pass --models-dir): "
                      "only the add rows run, on the bundled sdturbo-mini; the others are reported missing")
    return args.models_dir or DEFAULT_MODELS_DIR


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..devices import resolve_device, resolve_dtype
    from ..pipeline import MINI_MODEL_DIR
    from .networks import WEIGHTS_PATH, load_eval_net
    from .run import evaluate, folder_loader

    models_dir = check_args(args)
    device = resolve_device(args.device)
    net = load_eval_net(args.eval_net or WEIGHTS_PATH, device)
    rows = [row for row in ROWS if row.name in args.rows]
    load = folder_loader(models_dir, {"add": MINI_MODEL_DIR}, device=device, dtype=args.dtype)
    start = time.time()
    result = evaluate(rows, args.num_images, load, net, batch_size=args.batch_size)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["dtype"] = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    result["wall_seconds"] = round(time.time() - start, 1)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_table(result))
    return 0
