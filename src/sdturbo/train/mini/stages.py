"""The sdturbo-mini recipe as named stages. Each stage reads the finished checkpoints of the stages before it,
writes its own under the work dir (default runs/mini/), saves often and resumes where it stopped.

    data -> tokenizer -> clip (both text towers) -> vae -> teacher -> vae_decoder -> vit -> student -> export

The teacher needs only the VAE's encoder (its latent space), so "vae_decoder", "vit" may run beside "teacher".
Two more stages, not part of the shipped model and not run by "all", train the students of the paper's loss
ablation for `sdturbo eval`: "adv_only" and "distill_only" (after "student", from the same warm start)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import ShapesCache, build_cache, load_cache
from .config import MINI, MiniRecipe

DEFAULT_WORKDIR = Path("runs/mini")
STAGES = ("data", "tokenizer", "clip", "vae", "teacher", "vae_decoder", "vit", "student", "export")
ABLATION_STAGES = ("adv_only", "distill_only")


@dataclass
class Context:
    workdir: Path
    recipe: MiniRecipe
    log: Callable[[str], None]

    def path(self, name: str) -> Path:
        return self.workdir / name

    def cache(self) -> ShapesCache:
        path = self.path("shapes.safetensors")
        if not path.exists():
            raise ValueError(f"no data cache at {path}; run the 'data' stage first "
                             f"(sdturbo train mini --stage data --workdir {self.workdir})")
        return load_cache(path)


def _data(ctx: Context) -> None:
    build_cache(ctx.path("shapes.safetensors"), ctx.recipe.data.num_images, ctx.recipe.data.size_px)


def _tokenizer(ctx: Context) -> None:
    from .tokenizer import train_tokenizers

    if all((ctx.workdir / name / "merges.txt").exists() for name in ("tokenizer", "tokenizer_2")):
        return  # deterministic and already written
    train_tokenizers(ctx.workdir, MINI.text_encoder.vocab_size, ctx.recipe.data.tokenizer_captions)


def _clip(ctx: Context) -> None:
    from .clip_pretrain import train_clip

    train_clip(ctx.path("clip.safetensors"), ctx.workdir / "tokenizer", ctx.recipe.clip, ctx.cache(), ctx.log)


def _vae(ctx: Context) -> None:
    from .vae_train import train_vae

    train_vae(ctx.path("vae.safetensors"), MINI.vae, ctx.recipe.vae, ctx.cache(), ctx.log)


def _vae_decoder(ctx: Context) -> None:
    from .checkpoint import require_done
    from .vae_train import train_vae_decoder

    vae_state = require_done(ctx.path("vae.safetensors"), "vae")
    train_vae_decoder(ctx.path("vae_decoder.safetensors"), vae_state, ctx.recipe.vae_decoder, ctx.cache(), ctx.log)


def _teacher(ctx: Context) -> None:
    from .teacher import train_teacher

    train_teacher(ctx.workdir, ctx.recipe.teacher, ctx.cache(), ctx.log)


def _vit(ctx: Context) -> None:
    from .vit_pretrain import train_vit

    train_vit(ctx.path("vit.safetensors"), ctx.recipe.vit, ctx.cache(), ctx.log)


def _student(variant: str) -> Callable[[Context], None]:
    """The stage of one student: "add" (shipped) or a loss-ablation variant (student.VARIANTS)."""

    def run(ctx: Context) -> None:
        from .student import train_student

        train_student(ctx.workdir, ctx.recipe.student, ctx.cache(), ctx.log, variant=variant)

    return run


def _export(ctx: Context) -> None:
    from .export import export_mini

    export_mini(ctx.workdir, ctx.recipe.export_dir, ctx.log)


RUNNERS: dict[str, Callable[[Context], None]] = {
    "data": _data,
    "tokenizer": _tokenizer,
    "clip": _clip,
    "vae": _vae,
    "teacher": _teacher,
    "vae_decoder": _vae_decoder,
    "vit": _vit,
    "student": _student("add"),
    "export": _export,
    "adv_only": _student("adv-only"),
    "distill_only": _student("distill-only"),
}


def _print_log(path: Path) -> Callable[[str], None]:
    def log(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    return log


def run_stage(name: str, workdir: Path = DEFAULT_WORKDIR, recipe: MiniRecipe | None = None) -> float:
    """Run (or resume) one stage; returns its wall time in seconds."""
    if name not in RUNNERS:
        raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGES + ABLATION_STAGES)}")
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir, recipe or MiniRecipe(), _print_log(workdir / "train.log"))
    if ctx.recipe.threads:
        torch.set_num_threads(ctx.recipe.threads)
    start = time.time()
    ctx.log(f"stage {name} starts")
    RUNNERS[name](ctx)
    seconds = time.time() - start
    ctx.log(f"stage {name} done in {seconds:.0f}s")
    return seconds


def run_all(workdir: Path = DEFAULT_WORKDIR, recipe: MiniRecipe | None = None) -> dict[str, float]:
    """Every stage in order; a finished stage returns at once, so a rerun picks up where the last one stopped."""
    return {name: run_stage(name, workdir, recipe) for name in STAGES}
