"""Stage "export": write sdturbo-mini in the official diffusers folder layout (model_index.json, scheduler/,
tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/, unet/, vae/) with fp16 safetensors, then load it back
through TurboPipeline and render a grid of the held-out prompts as a check.

The UNet is the ADD student when that stage has finished, otherwise the teacher (a "teacher-only" export that
lets the rest of the system run while the student trains; it needs more steps, e.g. 4, and gives softer images)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from ...loading import save_diffusers_folder
from ..data import HELDOUT_PROMPTS
from .checkpoint import require_done
from .clip_pretrain import load_text_encoders
from .conditioning import final_vae_state
from .config import MINI
from .teacher import load_teacher

MAX_EXPORT_BYTES = 25 * 1024 * 1024


def _fp16(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}


def _unet(workdir: Path, log):
    if (workdir / "student.safetensors").exists():
        from .student import load_student

        log("export: UNet = the ADD student")
        return load_student(workdir), "student"
    log("export: UNet = the teacher (no finished student yet)")
    return load_teacher(workdir, partial=True), "teacher"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_mini(workdir: Path, export_dir: str | Path, log) -> Path:
    from ...models.vae import AutoencoderKL

    export_dir = Path(export_dir)
    text_encoder, text_encoder_2 = load_text_encoders(require_done(workdir / "clip.safetensors", "clip"))
    vae_state = final_vae_state(workdir)
    vae = AutoencoderKL(vae_state["config"])
    vae.load_state_dict(vae_state["vae"])
    unet, which = _unet(workdir, log)
    spec = replace(MINI, vae=vae_state["config"])
    components = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae}
    # Written apart first: the budget counts the model's files only, not others in export_dir, and a model over
    # it leaves export_dir as it was.
    with tempfile.TemporaryDirectory() as staging:
        staged = save_diffusers_folder(
            Path(staging) / "model",
            {name: _fp16(model) for name, model in components.items()},
            spec,
            tokenizer_folders=(workdir / "tokenizer", workdir / "tokenizer_2"),
        )
        size = folder_bytes(staged)
        if size > MAX_EXPORT_BYTES:
            raise ValueError(f"the exported model is {size / 2**20:.1f} MiB, over the 25 MiB budget; {export_dir} "
                             "was left as it was")
        shutil.copytree(staged, export_dir, dirs_exist_ok=True)
    log(f"export: wrote {export_dir} ({size / 2**20:.1f} MiB, {which})")
    render_check_grid(export_dir, workdir / f"samples_{which}.png", steps=1 if which == "student" else 4, log=log)
    return export_dir


def render_check_grid(model_dir: Path, out: Path, steps: int, log, seed: int = 0) -> Path:
    """Load the exported folder as users will and draw the held-out prompts, one row of 4 seeds each."""
    from ...pipeline import TurboPipeline

    pipe = TurboPipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    if pipe.text_encoder_2.eos_token_id != pipe.tokenizer_2.eos_token_id:
        log(
            f"export: warning: the loader pools text_encoder_2 at id {pipe.text_encoder_2.eos_token_id}, not the "
            f"tokenizer's eos {pipe.tokenizer_2.eos_token_id}; using the tokenizer's for this check"
        )
        pipe.text_encoder_2.eos_token_id = pipe.tokenizer_2.eos_token_id
    rows = []
    for prompt in HELDOUT_PROMPTS:
        images = pipe(prompt, num_inference_steps=steps, num_images_per_prompt=4, seed=[seed + i for i in range(4)]).images
        rows.append(images)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (4 * w, len(rows) * h))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * w, r * h))
    grid.save(out)
    log(f"export: check grid ({steps} steps) -> {out}")
    return out
