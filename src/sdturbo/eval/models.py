"""Assemble the models directory that `sdturbo eval` reads from a sdturbo-mini work dir:
`python -m sdturbo.eval.models [--workdir runs/mini] [--out runs/mini/models]`.

The mini recipe exports one model (the student) to the package; the evaluation also needs the teacher, with the
same text towers, VAE and tokenizers. Each finished UNet becomes a diffusers folder: teacher/ from the "teacher"
stage, add/ from "student", adv-only/ and distill-only/ from the ablation stages (`sdturbo train mini --stage
adv_only`, `--stage distill_only`). The evaluation reports the rows of absent folders as missing."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..loading import save_diffusers_folder
from ..models.vae import AutoencoderKL
from ..train.mini.checkpoint import load_checkpoint, require_done
from ..train.mini.clip_pretrain import load_text_encoders
from ..train.mini.conditioning import final_vae_state
from ..train.mini.config import MINI
from ..train.mini.stages import DEFAULT_WORKDIR
from .cli import DEFAULT_MODELS_DIR


def _unets(workdir: Path) -> dict[str, torch.nn.Module]:
    from ..train.mini.student import VARIANTS, load_student, student_name
    from ..train.mini.teacher import load_teacher

    unets = {}
    teacher = load_checkpoint(workdir / "teacher.safetensors")  # saved as it trains; only a finished one counts
    if teacher is not None and teacher.get("done"):
        unets["teacher"] = load_teacher(workdir)
    for variant in VARIANTS:
        if (workdir / f"{student_name(variant)}.safetensors").exists():  # written once, when a student finishes
            unets[variant] = load_student(workdir, variant)
    return unets


def write_models_dir(workdir: Path, models_dir: Path) -> list[Path]:
    """One fp16 diffusers folder per finished UNet in workdir; -> the folders written."""
    text_encoder, text_encoder_2 = load_text_encoders(require_done(workdir / "clip.safetensors", "clip"))
    vae_state = final_vae_state(workdir)  # the VAE the export ships, so all folders decode alike
    vae = AutoencoderKL(vae_state["config"])
    vae.load_state_dict(vae_state["vae"])
    spec = replace(MINI, vae=vae_state["config"])
    written = []
    for name, unet in _unets(workdir).items():
        components = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae}
        fp16 = {key: {k: v.detach().half() for k, v in m.state_dict().items()} for key, m in components.items()}
        tokenizers = (workdir / "tokenizer", workdir / "tokenizer_2")
        written.append(save_diffusers_folder(models_dir / name, fp16, spec, tokenizer_folders=tokenizers))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODELS_DIR)
    args = parser.parse_args(argv)
    try:
        if not args.workdir.is_dir():
            raise ValueError(f"--workdir {args.workdir} is not a folder; train sdturbo-mini there first: "
                             f"sdturbo train mini --workdir {args.workdir}")
        written = write_models_dir(args.workdir, args.out)
    except ValueError as e:  # an absent or unfinished work dir; require_done names the stage to run
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written) or f"no finished teacher or student in {args.workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
