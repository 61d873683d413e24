"""The training driver end to end on a GPU, in about a minute: what the CPU tests cover, on CUDA and nccl.

A TINY teacher with random weights and a byte-level tokenizer is written to a temporary folder; then
`torchrun --nproc-per-node 1 -m sdturbo.train.driver` trains it for 3 steps with FSDP2 (nccl), bf16 autocast and
activation checkpointing, checkpointing after step 2, sampling a grid and exporting; a second run resumes from
step 2; the exported model generates an image. Prints a summary and writes it to $OUT/gpu_train_smoke.json (with
the sample grid) when OUT is set.

    python benchmarks/gpu_train_smoke.py                 # on the GPU
    python benchmarks/gpu_train_smoke.py --device cpu    # the same on gloo, for a check without a GPU"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

from sdturbo.loading import save_diffusers_folder
from sdturbo.models.clip import CLIPTextModel
from sdturbo.models.configs import TINY
from sdturbo.models.unet import UNet
from sdturbo.models.vae import AutoencoderKL
from sdturbo.pipeline import TurboPipeline

LOSSES = ("d_loss", "d_real", "d_fake", "r1", "g_loss", "g_adv", "g_distill")


def write_byte_tokenizer(folder: Path) -> Path:
    """A CLIP-style tokenizer with no merges: one token per byte (bare and word-final), bos and eos."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def write_teacher(root: Path) -> Path:
    torch.manual_seed(0)
    models = {
        "unet": UNet(TINY.unet),
        "text_encoder": CLIPTextModel(TINY.text_encoder),
        "text_encoder_2": CLIPTextModel(TINY.text_encoder_2),
        "vae": AutoencoderKL(TINY.vae),
    }
    tokenizers = (write_byte_tokenizer(root / "tok" / "tokenizer"), write_byte_tokenizer(root / "tok" / "tokenizer_2"))
    return save_diffusers_folder(root / "teacher", models, TINY, tokenizers)


def torchrun_train(teacher: Path, out: Path, device: str, *flags: str) -> float:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "sdturbo.train.driver", "--teacher", str(teacher), "--out", str(out), "--device", device,
        "--steps", "3", "--batch-size", "2", "--discriminator", "tiny", "--checkpoint-every", "2",
        "--sample-every", "3", "--parallelism", "fsdp", "--precision", "bf16", "--activation-checkpointing", *flags,
    ]
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - t0


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sdturbo-smoke-"))
    teacher = write_teacher(root)
    out = root / "run"
    summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    summary["train_s"] = round(torchrun_train(teacher, out, args.device), 1)
    first = read_log(out)
    summary["losses"] = [{k: round(r[k], 5) for k in LOSSES} for r in first]
    summary["all_finite"] = all(math.isfinite(r[k]) for r in first for k in LOSSES)
    summary["max_memory_gb"] = max(r.get("max_memory_gb", 0.0) for r in first)

    shutil.rmtree(out / "checkpoints" / "step_0000003")
    summary["resume_s"] = round(torchrun_train(teacher, out, args.device, "--resume"), 1)
    again = read_log(out)[2]
    summary["resume_max_rel_diff"] = max(abs(again[k] - first[2][k]) / max(abs(first[2][k]), 1e-12) for k in LOSSES)

    pipe = TurboPipeline.from_pretrained(out / "final", device=args.device)
    image = pipe("a red circle", seed=0, output_type="np").images
    summary["generate_finite"] = bool(math.isfinite(float(image.sum())))
    print(json.dumps(summary, indent=2))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_train_smoke.json").write_text(json.dumps(summary, indent=2))
        shutil.copy(out / "samples" / "step_0000003.png", Path(os.environ["OUT"]) / "gpu_train_smoke_samples.png")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
