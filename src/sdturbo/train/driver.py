"""`sdturbo train add`: distil a teacher into a few-step student with ADD, on one device or many (torchrun).

    train(cfg): join the process group -> load the teacher (any source load_components reads, or "mini") ->
        build student, EMA, discriminator, AdamW -> activation checkpointing, FSDP -> resume from OUT/checkpoints ->
        per step: batch -> frozen text encoders (cached) -> loop.train_step under bf16 autocast -> log
        at intervals: checkpoint, sample grid; at the end: the EMA student as a diffusers folder, OUT/final

A run folder OUT holds config.json (the resolved TrainAddConfig), log.jsonl (one line per step with every loss
term, averaged over ranks), checkpoints/step_NNNNNNN/ (loop.save_checkpoint: safetensors + state.json),
samples/step_NNNNNNN.png (the student's 1-step images on fixed prompts) and final/ (`sdturbo generate --model
OUT/final`). Launch with torchrun for several processes: each rank trains on its own examples."""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
import typing
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from ..loading import HUB_ID, OPEN_CLIP_PAD_ID, load_components, save_diffusers_folder
from ..loading.hub import DEFAULT_REPO, resolve_tokenizer_folder
from ..models.configs import ModelSpec, UNetConfig
from ..models.vit import load_vit
from ..pipeline import MINI_MODEL_DIR, TurboPipeline
from ..tokenizer import read_json_or_empty, special_tokens
from .add import NFSD_NEGATIVE_PROMPT
from .data import HELDOUT_PROMPTS, ShapesStream
from .discriminator import DISCRIMINATOR_SDXL, DISCRIMINATOR_TINY, ProjectedDiscriminator
from .folder_data import ImageCaptionFolder
from .loop import (
    ADDBatch,
    ADDConfig,
    ADDModels,
    Optimizers,
    build_models,
    build_optimizers,
    load_checkpoint,
    rank0_state_dict,
    save_checkpoint,
    train_step,
    unet_conditioning,
)
from .parallel import (
    PARALLELISMS,
    apply_activation_checkpointing,
    apply_fsdp,
    init_distributed,
    rank_and_world,
)

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
DISCRIMINATORS = {"dinov2": DISCRIMINATOR_SDXL, "tiny": DISCRIMINATOR_TINY}
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Fixed prompts of the sample grids for real data: varied subjects, the kind of prompt the model card shows.
PHOTO_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a cinematic shot of a baby racoon wearing an intricate italian priest robe",
    "a red sports car on a mountain road at sunset",
    "a bowl of ramen, studio lighting, high detail",
    "an oil painting of a lighthouse in a storm",
    "a corgi wearing sunglasses on a beach",
    "a futuristic city skyline at night, neon lights",
    "a watercolor illustration of a fox in a snowy forest",
)


@dataclass
class TrainAddConfig:
    """One ADD run: the models, the data, the schedule of steps and outputs, the hardware plan. The ADD
    hyper-parameters themselves are `add` (loop.ADDConfig), overridden on the command line as --add.FIELD."""

    teacher: str
    """The frozen teacher, also the student's initialisation: a diffusers folder, an sgm single .safetensors file,
    a Hugging Face id (stabilityai/stable-diffusion-xl-base-1.0) or "mini"."""
    out: str
    """Run folder: config.json, log.jsonl, checkpoints/, samples/ and the exported final/ model."""
    student: str | None = None
    """Initial student weights, if not the teacher's (same sources as --teacher; its text encoders and VAE must
    match the teacher's, whose are used)."""
    tokenizer: str | None = None
    """Tokenizer folder or Hub id for single-file checkpoints (default: stabilityai/sdxl-turbo's)."""
    data: str = "shapes"
    """"shapes" (the procedural captioned shapes of sdturbo-mini) or a folder of images with same-name .txt
    captions."""
    steps: int = 1000
    """Total optimizer steps of the run (a resumed run continues up to this count)."""
    batch_size: int = 4
    """Images per rank and step; the global batch is batch_size x the number of ranks."""
    size_px: int | None = None
    """Square training resolution in pixels; default: the teacher's native size. ADD trains at 512 (spec-add §7):
    pass 512 for SDXL 1.0 base, whose native size is 1024. The exported model takes it as its default size."""
    discriminator: str = "dinov2"
    """Feature networks of the discriminator: "dinov2" (ViT-S/14 features, ViT-L/14 image condition, 224 px input,
    spec-add §5) or "tiny" (the test-size ViT at 56 px)."""
    feature_net: str | None = None
    """model.safetensors of DINOv2 ViT-S/14 (facebook/dinov2-small) for the features; without it the ViT is random,
    which only tests the plumbing."""
    image_net: str | None = None
    """model.safetensors of DINOv2 ViT-L/14 (facebook/dinov2-large) for the image condition c_img; random without."""
    precision: str = "bf16"
    """"bf16": forwards under bf16 autocast, frozen models stored in bf16, the student's master weights, gradients
    and AdamW moments in fp32. "fp32": everything in fp32."""
    activation_checkpointing: bool = False
    """Recompute the student's and the VAE decoder's blocks in backward instead of keeping their activations
    (needed for SDXL at 512 px, spec-add §13.2)."""
    parallelism: str = "dp"
    """"dp": every rank holds the whole student and gradients are averaged. "fsdp": student, EMA, gradients and
    AdamW moments are sharded over the ranks (FSDP2), for students whose training state does not fit one GPU."""
    device: str = "auto"
    """"auto" (GPU LOCAL_RANK if there are GPUs, else the CPU), "cpu" or "cuda"."""
    resume: bool = False
    """Continue from the latest checkpoint in OUT. Without it, an OUT that already has checkpoints is refused."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and always after the last step)."""
    keep_checkpoints: int = 2
    """How many of the most recent checkpoints to keep on disk."""
    sample_every: int = 500
    """Write a grid of the student's 1-step samples every this many steps, at the start and at the end; 0: never."""
    sample_prompts: tuple[str, ...] = ()
    """The grid's prompts; default: held-out shapes prompts for "shapes", fixed photo prompts for a folder."""
    sample_seed: int = 0
    """Seed of the grid's noise, fixed so that grids of different steps are comparable."""
    data_workers: int = 0
    """DataLoader worker processes that decode images ahead of the step (0: in the training process)."""
    text_cache_size: int = 4096
    """Encoded captions kept on the device (about 0.3 MB each for SDXL in bf16)."""
    export_dtype: str = "fp16"
    """dtype of the exported final/ model: fp16 (as stabilityai/sdxl-turbo ships), bf16 or fp32."""
    add: ADDConfig = field(default_factory=ADDConfig)
    """ADD hyper-parameters (loop.ADDConfig)."""

    def __post_init__(self):
        choices = {
            "precision": PRECISIONS, "parallelism": PARALLELISMS, "discriminator": DISCRIMINATORS,
            "export_dtype": EXPORT_DTYPES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "text_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sample_every < 0 or self.data_workers < 0:
            raise ValueError("sample_every and data_workers must be at least 0")


# -- models -------------------------------------------------------------------------------------------------------


def _source(model: str) -> str | Path:
    return MINI_MODEL_DIR if model == "mini" else model


def build_discriminator(cfg: TrainAddConfig, c_text_dim: int, device: torch.device) -> ProjectedDiscriminator:
    """Heads freshly initialised; the frozen ViTs from their DINOv2 files when given (random otherwise)."""
    disc_cfg = replace(DISCRIMINATORS[cfg.discriminator], c_text_dim=c_text_dim)
    # Seeded: every rank must start from the same heads, and a run from the same heads as its rerun.
    torch.manual_seed(cfg.add.seed)
    with torch.device(device):
        disc = ProjectedDiscriminator(disc_cfg)
    for name, path in (("feature_net", cfg.feature_net), ("image_net", cfg.image_net)):
        if path is not None:
            setattr(disc, name, load_vit(path, getattr(disc_cfg, name), device))
    return disc


def load_models(cfg: TrainAddConfig, device: torch.device) -> tuple[ADDModels, TurboPipeline]:
    """-> (ADD models, the teacher's pipeline, whose text encoders and tokenizers encode the captions).

    Everything loads in fp32; the student (and EMA) copy the fp32 weights before the frozen models drop to the
    precision's dtype, so bf16 runs keep full-precision master weights."""
    teacher = TurboPipeline.from_pretrained(cfg.teacher, device=device, dtype=torch.float32, tokenizer=cfg.tokenizer)
    student = None
    if cfg.student is not None:
        other = load_components(_source(cfg.student), device=device, dtype=torch.float32, tokenizer=cfg.tokenizer)
        if (other.spec.text_encoder, other.spec.text_encoder_2, other.spec.vae) != (
            teacher.spec.text_encoder, teacher.spec.text_encoder_2, teacher.spec.vae
        ):
            raise ValueError(f"student {cfg.student} has other text encoders or VAE than teacher {cfg.teacher}")
        student = other.unet
    disc = build_discriminator(cfg, teacher.spec.text_encoder_2.projection_dim, device)
    models = build_models(teacher.unet, teacher.vae, disc, cfg.add, student=student)
    frozen_dtype = PRECISIONS[cfg.precision]
    for module in (models.teacher, models.vae, teacher.text_encoder, teacher.text_encoder_2, disc.feature_net,
                   disc.image_net):
        module.to(frozen_dtype)
    return models, teacher


def parallelize(models: ADDModels, cfg: TrainAddConfig, device: torch.device) -> None:
    """Memory savers and sharding on the built models, in torchtitan's order: checkpointing, then FSDP."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(models.student, models.vae)
    if cfg.parallelism == "fsdp":
        param_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        apply_fsdp(models.student, models.ema, device, param_dtype)


def autocast(cfg: TrainAddConfig, device: torch.device):
    if cfg.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[cfg.precision])


# -- data ---------------------------------------------------------------------------------------------------------


class StepBatches(torch.utils.data.Dataset):
    """Item k is this rank's batch of step k: map-style, so DataLoader workers prepare steps ahead, in order."""

    def __init__(self, source: ShapesStream | ImageCaptionFolder, batch_size: int, rank: int, world: int):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world

    def __getitem__(self, step: int):
        return self.source.batch(step, self.batch_size, self.rank, self.world)


def data_source(cfg: TrainAddConfig, size_px: int) -> ShapesStream | ImageCaptionFolder:
    if cfg.data == "shapes":
        return ShapesStream(seed=cfg.add.seed, size_px=size_px)
    return ImageCaptionFolder(cfg.data, size_px, seed=cfg.add.seed)


def data_loader(
    cfg: TrainAddConfig, source: ShapesStream | ImageCaptionFolder, start: int, device: torch.device
) -> torch.utils.data.DataLoader:
    rank, world = rank_and_world()
    return torch.utils.data.DataLoader(
        StepBatches(source, cfg.batch_size, rank, world),
        batch_size=None,  # items are whole batches
        sampler=range(start, cfg.steps),
        num_workers=cfg.data_workers,
        pin_memory=device.type == "cuda",
    )


class PromptEncoder:
    """Captions -> (context [B, 77, ctx], pooled [B, proj]) from the frozen text encoders, remembering the last
    `capacity` captions: the shapes world repeats a few thousand captions, and every pass over a folder repeats its
    own."""

    def __init__(self, pipe: TurboPipeline, capacity: int, dtype: torch.dtype):
        self.pipe, self.capacity, self.dtype = pipe, capacity, dtype
        pipe.prompt_cache_size = 0  # its cache holds whole prompt lists: training batches rarely repeat as a whole
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if missing:
            context, pooled = self.pipe.encode_prompt(missing)
            for i, caption in enumerate(missing):
                self.cache[caption] = (context[i].to(self.dtype), pooled[i].to(self.dtype))
        context = torch.stack([self.cache[c][0] for c in captions])
        pooled = torch.stack([self.cache[c][1] for c in captions])
        while len(self.cache) > self.capacity:  # oldest first: dicts keep insertion order
            del self.cache[next(iter(self.cache))]
        return context, pooled


@dataclass
class Conditioner:
    """Data batches -> ADD batches: text conditioning, plus the empty and NFSD-negative prompts the teacher needs
    when it is guided (spec-add §12)."""

    encoder: PromptEncoder
    unet_cfg: UNetConfig
    size_px: int
    add: ADDConfig

    def __call__(self, images: torch.Tensor, captions: list[str], device: torch.device) -> ADDBatch:
        context, pooled = self.encoder(captions)
        cond = unet_conditioning(context, pooled, self.size_px, self.unet_cfg)
        uncond = negative = None
        if self.add.teacher_guidance_scale != 1.0 or self.add.weighting == "nfsd":
            # SDXL's force_zeros_for_empty_prompt: the unconditional embedding is zeros, as at inference
            uncond = unet_conditioning(torch.zeros_like(context), torch.zeros_like(pooled), self.size_px, self.unet_cfg)
        if self.add.weighting == "nfsd":
            negative_context, negative_pooled = self.encoder([NFSD_NEGATIVE_PROMPT] * len(captions))
            negative = unet_conditioning(negative_context, negative_pooled, self.size_px, self.unet_cfg)
        return ADDBatch(images.to(device, non_blocking=True), cond, pooled, uncond, negative)


# -- outputs ------------------------------------------------------------------------------------------------------


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (renamed from .partial once written), oldest first."""
    found = (p.parent for p in (out / "checkpoints").glob("step_*/state.json"))
    return sorted(p for p in found if p.suffix != ".partial")


def write_checkpoint(
    out: Path, models: ADDModels, optimizers: Optimizers, cfg: TrainAddConfig, step: int, run: dict
) -> None:
    """Save into a temporary folder, then rename, so a crash mid-save never leaves a half checkpoint that looks
    complete; keep the newest keep_checkpoints. Every rank calls it (FSDP gathers), rank 0 writes. run: run_settings,
    which a resume compares with its own."""
    final = out / "checkpoints" / f"step_{step:07d}"
    partial = final.with_name(final.name + ".partial")
    save_checkpoint(partial, models, optimizers, cfg.add, step, run)
    if rank_and_world()[0] == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in checkpoints(out)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def student_spec(teacher: ModelSpec, student: UNetConfig, size_px: int) -> ModelSpec:
    """The trained model's architecture: the student's UNet, whose default size becomes the training size, with the
    teacher's text encoders and VAE."""
    if size_px % teacher.vae.downscale_factor:
        raise ValueError(f"size_px {size_px} must be a multiple of the VAE's {teacher.vae.downscale_factor}")
    return replace(teacher, unet=replace(student, sample_size=size_px // teacher.vae.downscale_factor))


def sample_student(
    models: ADDModels, teacher: TurboPipeline, spec: ModelSpec, prompts: tuple[str, ...], seed: int
) -> Image.Image:
    """The student's 1-step images (the released models' use) on fixed prompts and noise, as one grid. Every rank
    runs it, since an FSDP student forwards collectively."""
    pipe = TurboPipeline(models.student, teacher.text_encoder, teacher.text_encoder_2, models.vae, teacher.tokenizer,
                         teacher.tokenizer_2, spec, name="student")
    images = pipe(list(prompts), num_inference_steps=1, seed=seed).images
    return image_grid(images, columns=min(4, len(images)))


def replica_fingerprints(models: ADDModels) -> list[str]:
    """sha256 of every replicated (not FSDP-sharded) trained tensor, one digest per rank: after averaged updates
    all ranks must hold bit-identical copies."""
    digest = hashlib.sha256()
    for module in (models.student, models.ema, models.discriminator.heads):
        for value in (module.state_dict().values() if module is not None else ()):
            if not isinstance(value, DTensor):
                digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    _, world = rank_and_world()
    if world == 1:
        return [digest.hexdigest()]
    gathered = [None] * world
    dist.all_gather_object(gathered, digest.hexdigest())
    return gathered


TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
FLAT_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def tokenizer_source(cfg: TrainAddConfig) -> Path:
    """The folder of the run's tokenizers, shipped with the exported model: tokenizer/ + tokenizer_2/, or one flat
    vocab.json + merges.txt for both towers. Checked before training, so that the export cannot fail on it."""
    source = cfg.tokenizer or cfg.teacher
    folder = Path(_source(source))
    if not folder.is_dir():  # a Hub id, or a single file, whose tokenizers come from sdxl-turbo as when loading
        folder = resolve_tokenizer_folder(source if HUB_ID.fullmatch(source) else DEFAULT_REPO)
    if not (all((folder / name).is_dir() for name in TOKENIZER_FOLDERS)
            or all((folder / name).is_file() for name in FLAT_TOKENIZER_FILES)):
        raise ValueError(f"{folder} has neither tokenizer/ and tokenizer_2/ nor vocab.json and merges.txt to ship "
                         "with the model; pass --tokenizer with such a folder")
    return folder


def tokenizer_folders(folder: Path, scratch: Path) -> tuple[Path, Path]:
    """The tokenizer/ and tokenizer_2/ folders to copy next to the exported weights. A flat vocab.json + merges.txt
    becomes two folders under scratch, each padding as loading pads that tower (TE1 with eos, TE2 with id 0, "!" in
    CLIP's vocabulary): sdxl-turbo's layout, which every loader reads the same way."""
    if all((folder / name).is_dir() for name in TOKENIZER_FOLDERS):
        return folder / "tokenizer", folder / "tokenizer_2"
    config = read_json_or_empty(folder / "tokenizer_config.json")
    special_tokens_map = read_json_or_empty(folder / "special_tokens_map.json")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    eos = special_tokens(config, special_tokens_map)["eos_token"]
    for name, pad in zip(TOKENIZER_FOLDERS, (eos, {i: t for t, i in vocab.items()}[OPEN_CLIP_PAD_ID])):
        (scratch / name).mkdir()
        for filename in FLAT_TOKENIZER_FILES:
            shutil.copyfile(folder / filename, scratch / name / filename)
        _write_json(scratch / name / "tokenizer_config.json", {**config, "pad_token": pad})
        if special_tokens_map:  # transformers lets this file's pad override tokenizer_config's
            _write_json(scratch / name / "special_tokens_map.json", {**special_tokens_map, "pad_token": pad})
    return scratch / "tokenizer", scratch / "tokenizer_2"


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def export_student(out: Path, models: ADDModels, spec: ModelSpec, cfg: TrainAddConfig) -> Path:
    """The EMA student (the raw student without EMA) with the teacher's text encoders and VAE, re-read from the
    source so they ship unchanged, as a diffusers folder. Every rank calls it (FSDP gathers), rank 0 writes."""
    unet = rank0_state_dict(models.ema if models.ema is not None else models.student)
    final = out / "final"
    if rank_and_world()[0] != 0:
        return final
    dtype = EXPORT_DTYPES[cfg.export_dtype]
    frozen = load_components(_source(cfg.teacher), device="cpu", dtype=dtype, tokenizer=cfg.tokenizer)
    components = frozen.models() | {"unet": {k: v.to(dtype) for k, v in unet.items()}}
    shutil.rmtree(final, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        folders = tokenizer_folders(tokenizer_source(cfg), Path(scratch))
        save_diffusers_folder(final, components, spec, tokenizer_folders=folders)
    return final


# -- the run ------------------------------------------------------------------------------------------------------


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    _, world = rank_and_world()
    if world == 1:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(metrics, (values / world).tolist()))


def check_inputs(cfg: TrainAddConfig) -> None:
    """Before any loading or writing, so that a typo fails in a second: the paths the flags name."""
    for flag, model in (("--teacher", cfg.teacher), ("--student", cfg.student)):
        if model not in (None, "mini") and not Path(model).exists() and not HUB_ID.fullmatch(model):
            raise ValueError(f"{flag} {model} does not exist; give a diffusers folder, a .safetensors file, "
                             "a Hugging Face model id or mini")
    if cfg.data != "shapes" and not Path(cfg.data).is_dir():
        raise ValueError(f"--data {cfg.data} is not a folder; give a folder of images with .txt captions, or shapes")
    for flag, path in (("--feature-net", cfg.feature_net), ("--image-net", cfg.image_net)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path} does not exist; give a DINOv2 model.safetensors file")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out} is a file; give a folder for the run")
    # The paper's discriminator reads pretrained DINOv2 features; random ones give the student no useful signal.
    if cfg.discriminator == "dinov2" and cfg.feature_net is None and rank_and_world()[0] == 0:
        warnings.warn("--discriminator dinov2 without --feature-net trains against a randomly initialised ViT, "
                      "which only tests the plumbing; pass --feature-net with DINOv2 ViT-S/14 weights "
                      "(huggingface-cli download facebook/dinov2-small model.safetensors)")


def check_out(out: Path, cfg: TrainAddConfig) -> None:
    """Before any loading: a new run must not mix into an old one, a resumed run needs a checkpoint, whose
    discriminator heads only the discriminator they were trained for can take."""
    found = checkpoints(out)
    if found and not cfg.resume:
        raise ValueError(f"{out} already has checkpoints ({found[-1].name}); pass --resume or another --out")
    if cfg.resume and not found:
        raise ValueError(f"--resume: {out / 'checkpoints'} holds no complete checkpoint")
    if cfg.resume:
        run = json.loads((found[-1] / "state.json").read_text()).get("run", {})  # run_settings; older versions: none
        saved = run.get("discriminator", cfg.discriminator)
        if saved != cfg.discriminator:
            raise ValueError(f"--resume: this run's discriminator was {saved} (its checkpoint holds heads for it, not "
                             f"for {cfg.discriminator}); resume with --discriminator {saved}")


def run_settings(cfg: TrainAddConfig, source: ShapesStream | ImageCaptionFolder) -> dict:
    """What a checkpoint keeps of the run beside the ADD settings: the discriminator its heads were built for, and
    what the batch of each step depends on."""
    settings = {"discriminator": cfg.discriminator, "data": cfg.data}
    if isinstance(source, ImageCaptionFolder):  # a folder's shuffle depends on its number of examples
        settings.update(data=str(Path(cfg.data).resolve()), examples=len(source))
    return settings | {"batch_size": cfg.batch_size, "world_size": rank_and_world()[1]}


def start_step(out: Path, cfg: TrainAddConfig, models: ADDModels, optimizers: Optimizers, run: dict) -> int:
    """0 for a new run; for --resume the step after the latest checkpoint, whose state is loaded."""
    if not cfg.resume:
        return 0
    checkpoint = load_checkpoint(checkpoints(out)[-1], models, optimizers)
    # The settings given now apply, also to the optimizers, whose saved param_groups carry the old ones.
    for optimizer, lr, betas in ((optimizers.student, cfg.add.lr_student, cfg.add.betas_student),
                                 (optimizers.discriminator, cfg.add.lr_discriminator, cfg.add.betas_discriminator)):
        for group in optimizer.param_groups:
            group.update(lr=lr, betas=betas, weight_decay=cfg.add.weight_decay)
    saved = ADDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint.config.items()})
    if saved != cfg.add and rank_and_world()[0] == 0:
        changed = {k: (v, getattr(cfg.add, k)) for k, v in asdict(saved).items() if getattr(cfg.add, k) != v}
        print(f"resuming with changed ADD settings (saved -> now): {changed}", file=sys.stderr)
    data_changes = {k: (v, run.get(k)) for k, v in checkpoint.run.items() if run.get(k) != v}
    if data_changes and rank_and_world()[0] == 0:
        print(f"resuming with changed data settings (saved -> now): {data_changes}; the batches from here on differ "
              "from those of an uninterrupted run", file=sys.stderr)
    if checkpoint.ema_from_student and rank_and_world()[0] == 0:
        print(f"resuming with EMA (--add.ema-decay {cfg.add.ema_decay}) from a checkpoint saved without one: the EMA "
              f"starts from the student of step {checkpoint.step}", file=sys.stderr)
    return checkpoint.step


def append_log(
    path: Path, step: int, metrics: dict[str, float], seconds: float, images: int, device: torch.device
) -> None:
    """One JSON line per step: every loss term (mean over ranks), the step's time and throughput, peak memory."""
    record = {"step": step, **metrics, "step_s": seconds, "images_per_s": images / seconds}
    if device.type == "cuda":
        record["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, start: int) -> None:
    """Drop log lines of steps at or after `start`: a resumed run rewrites them. A last line cut short (a crash
    while it was written) is dropped too, with a warning: the checkpoint, not the log, is the run's state."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except json.JSONDecodeError as e:
            if number == len(lines):
                warnings.warn(f"{path} ends in a line cut short (line {number}: a crash while it was written?); "
                              "dropped it")
                break
            raise ValueError(f"{path} line {number} is not JSON ({e}); repair or delete that line") from None
        except (TypeError, KeyError):
            raise ValueError(f"{path} line {number} has no step; repair or delete that line") from None
        if step < start:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: TrainAddConfig) -> Path:
    """Run (or resume) one ADD training run; returns the exported model folder OUT/final."""
    device = init_distributed(cfg.device)
    try:
        return _train(cfg, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class StopAtStepEnd:
    """Ctrl+C in a one-process run: finish the step, checkpoint it, then stop, so no trained step is lost (a second
    Ctrl+C stops at once). Under torchrun ranks could stop at different steps, so there Ctrl+C interrupts as usual."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.previous = None

    def __enter__(self) -> "StopAtStepEnd":
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


def _train(cfg: TrainAddConfig, device: torch.device) -> Path:
    rank, world = rank_and_world()
    is_main = rank == 0
    out = Path(cfg.out)
    check_inputs(cfg)
    check_out(out, cfg)
    models, teacher = load_models(cfg, device)
    size_px = cfg.size_px or teacher.spec.unet.sample_size * teacher.spec.vae.downscale_factor
    spec = student_spec(teacher.spec, models.student.cfg, size_px)
    tokenizer_source(cfg)  # the export ships these tokenizers: one it could not ship fails now, not after training
    # Before OUT is written: a --data folder without captioned images fails here, leaving nothing behind.
    source = data_source(cfg, size_px)
    run = run_settings(cfg, source)
    parallelize(models, cfg, device)
    optimizers = build_optimizers(models, cfg.add)
    start = start_step(out, cfg, models, optimizers, run)
    if start >= cfg.steps and is_main:
        print(f"{out} is already at step {start} of --steps {cfg.steps}: nothing to train; exporting final/ again",
              file=sys.stderr)
    conditioner = Conditioner(PromptEncoder(teacher, cfg.text_cache_size, PRECISIONS[cfg.precision]),
                              teacher.spec.unet, size_px, cfg.add)
    prompts = cfg.sample_prompts or (HELDOUT_PROMPTS[:8] if cfg.data == "shapes" else PHOTO_PROMPTS)
    log_path = out / "log.jsonl"
    batches: Iterator = iter(data_loader(cfg, source, start, device))
    if is_main:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        truncate_log(log_path, start)

    def sample(step: int) -> None:
        with autocast(cfg, device):
            grid = sample_student(models, teacher, spec, prompts, cfg.sample_seed)
        if is_main:
            grid.save(out / "samples" / f"step_{step:07d}.png")

    if start == 0 and cfg.sample_every:
        sample(0)
    progress = tqdm(total=cfg.steps, initial=start, disable=not is_main, desc="ADD", dynamic_ncols=True)
    with StopAtStepEnd(world == 1) as stop:
        try:
            for step in range(start, cfg.steps):
                data = next(batches)
                t0 = time.perf_counter()
                batch = conditioner(data.image, data.captions, device)
                with autocast(cfg, device):
                    metrics = train_step(models, optimizers, batch, cfg.add, step)
                metrics = mean_over_ranks(metrics, device)
                seconds = time.perf_counter() - t0
                done = step + 1
                if is_main:
                    append_log(log_path, step, metrics, seconds, cfg.batch_size * world, device)
                    progress.set_postfix(g=f"{metrics['g_loss']:.3f}", d=f"{metrics['d_loss']:.3f}")
                    progress.update()
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.requested:
                    write_checkpoint(out, models, optimizers, cfg, done, run)
                if stop.requested:
                    raise KeyboardInterrupt
                if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
                    sample(done)
        except KeyboardInterrupt:
            progress.close()
            if is_main:
                found = checkpoints(out)
                saved = f"the newest checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
                print(f"\ninterrupted: {saved}; run the same command with --resume to go on from it", file=sys.stderr)
            raise
    progress.close()

    fingerprints = replica_fingerprints(models)
    if is_main:
        (out / "replicas.json").write_text(json.dumps({"sha256": fingerprints}, indent=2))
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"ranks hold different weights after training: {fingerprints}")
    return export_student(out, models, spec, cfg)


# -- command line: every TrainAddConfig field is a flag, every ADDConfig field an --add.FIELD override ---------------


def field_docs(cls: type) -> dict[str, str]:
    """The string under each dataclass field (its docstring), which Python does not keep at runtime."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _argument(annotation) -> dict:
    """argparse keywords for one field type: bool, int, float, str, X | None, or a tuple (space-separated)."""
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return {"type": args[0], "nargs": "+"}
    return {"type": args[0] if args else annotation}


def _help(f, doc: str) -> str:
    if f.default not in (MISSING, None, ()):
        doc += f" (default: {f.default})"
    return doc.replace("%", "%%")  # argparse formats help strings


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            _add_fields(parser, hints[f.name], f"{prefix}{f.name}.")
            continue
        parser.add_argument(
            f"--{prefix}{f.name.replace('_', '-')}",
            dest=f"{prefix}{f.name}",
            metavar=f.name.upper(),
            required=f.default is MISSING and f.default_factory is MISSING,
            default=argparse.SUPPRESS,  # absent flags keep the dataclass defaults
            help=_help(f, docs.get(f.name, "")),
            **_argument(hints[f.name]),
        )


def add_train_add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `sdturbo train add`: --teacher, --out, --data, --steps, --batch-size, ... and --add.FIELD."""
    _add_fields(parser, TrainAddConfig, "")


def config_from_args(args: argparse.Namespace) -> TrainAddConfig:
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    add = ADDConfig(**{k.removeprefix("add."): v for k, v in values.items() if k.startswith("add.")})
    top = {f.name: values[f.name] for f in fields(TrainAddConfig) if f.name in values and f.name != "add"}
    return TrainAddConfig(**top, add=add)


def run_train_add(args: argparse.Namespace) -> None:
    final = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now
        print(f"trained model: {final}  (sdturbo generate --model {final} PROMPT)")


def main(argv: list[str] | None = None) -> int:
    """`python -m sdturbo.train.driver ...`, the same as `sdturbo train add ...`, errors included."""
    from ..cli import run_command

    parser = argparse.ArgumentParser(prog="sdturbo train add", description=__doc__.split("\n")[0])
    add_train_add_arguments(parser)
    return run_command(run_train_add, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
