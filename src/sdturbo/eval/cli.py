"""`sdturbo eval --json PATH [--num-images N] [--rows ...] [--models-dir DIR]`: argument parsing and the table.

The models directory holds one diffusers folder per model: teacher/, add/, adv-only/, distill-only/. When add/ is
absent, the bundled sdturbo-mini (the ADD student) stands in for it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .run import ROW_NAMES, ROWS

DEFAULT_MODELS_DIR = Path("runs/mini/models")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, required=True, help="where the results go")
    parser.add_argument("--num-images", type=int, default=1000, help="images per row (default 1000)")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES), help="rows to run (default all)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help="teacher/, add/, adv-only/, distill-only/ diffusers folders")
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


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..devices import resolve_device, resolve_dtype
    from ..pipeline import MINI_MODEL_DIR
    from .networks import WEIGHTS_PATH, load_eval_net
    from .run import evaluate, folder_loader

    if args.num_images < 2:
        raise ValueError(f"--num-images must be at least 2 (FID needs a covariance), got {args.num_images}")
    device = resolve_device(args.device)
    net = load_eval_net(args.eval_net or WEIGHTS_PATH, device)
    rows = [row for row in ROWS if row.name in args.rows]
    load = folder_loader(args.models_dir, {"add": MINI_MODEL_DIR}, device=device, dtype=args.dtype)
    start = time.time()
    result = evaluate(rows, args.num_images, load, net, batch_size=args.batch_size)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["dtype"] = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    result["wall_seconds"] = round(time.time() - start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_table(result))
    return 0
