"""sdturbo-mini: the architecture preset and the per-stage training hyper-parameters.

The recipe's stages summed to 88 min on 2 otherwise idle CPU cores (2026-11-26: data 1, clip 4, vae 19, vae_decoder 7,
teacher 43, vit 2, student 12 min), under the issue's 2.5 h; the ablation stages add ~3 min each. Sizes keep the
shipped fp16 weights under 25 MB (17.5 MiB), while keeping every structural feature of SDXL-Turbo: two CLIP
towers (quick_gelu without projection, gelu with projection), head size 64, a 3-level UNet with attention on the
lower levels, a KL VAE with 4 latent channels. Images are 64 x 64 px; the VAE downscales by 8 as SDXL's does, so latents are 4 x 8 x 8."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from ...models.configs import ModelSpec, TextEncoderConfig, UNetConfig, VAEConfig
from ...models.vit import ViTConfig
from ...pipeline import MINI_MODEL_DIR

IMAGE_SIZE_PX = 64
VOCAB_SIZE = 640  # room for 512 byte symbols (bare and word-final) + 126 merges + bos + eos; the ~40 caption words need ~90 merges, so ids stop at 602
MAX_TOKENS = 77  # CLIP's context, kept so prompts and pipelines behave as with the official model
TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION = 64, 128, 128
TIME_EMBED_DIM = 32  # sinusoid width of each of the 6 size/crop conditions

MINI = ModelSpec(
    unet=UNetConfig(
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        transformer_depth=(0, 1, 1),
        layers_per_block=1,
        head_dim=64,  # the official head size, so the single-file path infers heads the same way
        context_dim=TE1_HIDDEN + TE2_HIDDEN,
        addition_time_embed_dim=TIME_EMBED_DIM,
        adm_in_channels=TE2_PROJECTION + 6 * TIME_EMBED_DIM,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE_PX // 8,
    ),
    text_encoder=TextEncoderConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TE1_HIDDEN,
        intermediate_size=4 * TE1_HIDDEN,
        num_layers=3,
        num_heads=1,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=None,
    ),
    text_encoder_2=TextEncoderConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TE2_HIDDEN,
        intermediate_size=4 * TE2_HIDDEN,
        num_layers=3,
        num_heads=2,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=TE2_PROJECTION,
    ),
    vae=VAEConfig(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64, 64),  # 4 levels: downscale 8, as SDXL's
        layers_per_block=1,
        norm_num_groups=32,
        scaling_factor=1.0,  # replaced by 1 / std of the trained latents when the VAE stage finishes
        force_upcast=False,
    ),
)

# The discriminator's feature network: DINOv2's architecture at a size that runs at 56 px (4 x 4 patches of 14).
MINI_VIT = ViTConfig(
    image_size=56, patch_size=14, hidden_size=64, num_layers=4, num_heads=2, intermediate_size=128, layer_norm_eps=1e-6
)


@dataclass(frozen=True)
class VAEStage:
    steps: int = 2000
    batch_size: int = 16
    # Whole 64 px images: 32 px crops cost a quarter but left shapes as blobs at full size (squares and triangles
    # lost, eval "real through the VAE" alignment 35 %), which the decoder fine-tune did not repair.
    crop_px: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-6  # SD's value: keeps the latent near N(0, 1) without blurring
    scale_images: int = 512  # images used to measure the latent std
    seed: int = 10
    log_every: int = 50
    save_every: int = 250


@dataclass(frozen=True)
class VAEDecoderStage:
    steps: int = 1000  # the VAE stage's 2,000 steps end with blotchy objects; the decoder alone is cheaper to train
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 20
    seed: int = 11
    log_every: int = 25
    save_every: int = 100


@dataclass(frozen=True)
class ClipStage:
    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    embed_dim: int = 128  # shared contrastive space of the two text towers and the image tower
    seed: int = 20
    log_every: int = 25
    save_every: int = 100


@dataclass(frozen=True)
class TeacherStage:
    steps: int = 8000  # 1,200 steps gave a teacher that put the named colour on an object in 25 % of images
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    cfg_dropout: float = 0.1  # share of samples trained without text, for classifier-free guidance
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    seed: int = 30
    log_every: int = 25
    save_every: int = 500


@dataclass(frozen=True)
class VitStage:
    steps: int = 3000  # 600 steps (loss 1.6) gave a student 10 FID worse at 4 steps (eval 2026-11-26); 2 min more
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 30
    seed: int = 40
    log_every: int = 100
    save_every: int = 500


@dataclass(frozen=True)
class StudentStage:
    steps: int = 400
    batch_size: int = 8
    # The student's x0 = (z - sigma * eps) / alpha multiplies eps errors by 1 / alpha_999 = 14.6: 1e-4 diverged
    # within 250 steps, the paper's ~1e-5 range holds.
    lr_student: float = 2e-5
    lr_discriminator: float = 1e-4
    teacher_guidance_scale: float = 1.5  # mildly guided targets; 3.0 oversaturated with this small teacher
    ema_decay: float = 0.99  # averages the last ~100 steps of a short run
    warm_steps: int = 1500  # x0 regression at the student timesteps before ADD (student.warm_start)
    warm_batch_size: int = 32
    warm_lr: float = 2e-4
    warmup_steps: int = 0  # loop.py runs constant learning rates; kept for MiniRecipe.scaled
    seed: int = 50
    log_every: int = 10
    save_every: int = 25


@dataclass(frozen=True)
class DataStage:
    num_images: int = 30000  # the first N examples of the stream, rendered once (~10 ms each)
    size_px: int = IMAGE_SIZE_PX
    tokenizer_captions: int = 20000


@dataclass(frozen=True)
class MiniRecipe:
    """Every stage's hyper-parameters; `scaled(f)` multiplies all step counts (tests use tiny factors)."""

    data: DataStage = field(default_factory=DataStage)
    clip: ClipStage = field(default_factory=ClipStage)
    vae: VAEStage = field(default_factory=VAEStage)
    vae_decoder: VAEDecoderStage = field(default_factory=VAEDecoderStage)
    teacher: TeacherStage = field(default_factory=TeacherStage)
    vit: VitStage = field(default_factory=VitStage)
    student: StudentStage = field(default_factory=StudentStage)
    threads: int | None = None  # torch threads; None keeps torch's default
    export_dir: str = str(MINI_MODEL_DIR)  # the package's bundled model, wherever the command runs

    def scaled(self, factor: float) -> MiniRecipe:
        """Every training stage with factor x its steps (at least 2), warm-up and save interval scaled alike."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"--steps-scale must be a positive finite number, got {factor}")
        if factor == 1.0:
            return self
        stages = {}
        for f in fields(self):
            stage = getattr(self, f.name)
            if hasattr(stage, "steps"):
                steps = max(2, round(stage.steps * factor))
                stages[f.name] = replace(
                    stage,
                    steps=steps,
                    warmup_steps=max(1, round(stage.warmup_steps * factor)),
                    save_every=max(1, min(stage.save_every, steps // 2)),
                    log_every=max(1, min(stage.log_every, steps)),
                )
                if hasattr(stage, "warm_steps"):
                    stages[f.name] = replace(stages[f.name], warm_steps=max(2, round(stage.warm_steps * factor)))
        return replace(self, **stages)
