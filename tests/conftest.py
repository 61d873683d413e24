"""Session fixtures: tokenizer folders and a tiny random-weights SDXL in the diffusers folder layout.
Helpers that build test data live in tests/fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures import CLIP_BPE_GZ, EOS_TOKEN, write_clip_tokenizer_folder


@pytest.fixture(scope="session")
def tokenizer_folders(tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer/, tokenizer_2/) folders laid out like sdxl-turbo's: pad "<|endoftext|>" (49407) and "!" (0)."""
    if CLIP_BPE_GZ is None:
        pytest.skip("open_clip's CLIP BPE merges file is not installed")
    root = tmp_path_factory.mktemp("sdxl_tokenizers")
    return (
        write_clip_tokenizer_folder(root / "tokenizer", pad_token=EOS_TOKEN),
        write_clip_tokenizer_folder(root / "tokenizer_2", pad_token="!"),
    )


def build_reference_pipeline(spec, tokenizer_folders, seed: int = 0):
    """diffusers' StableDiffusionXLPipeline with random weights in `spec`'s sizes and the sdxl-turbo scheduler."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from sdturbo.models.clip import text_config_to_transformers
    from sdturbo.models.unet import unet_config_to_diffusers
    from sdturbo.models.vae import vae_config_to_diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(spec.unet))
    vae = diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(spec.vae))
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config_to_transformers(spec.text_encoder, False)))
    te2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**text_config_to_transformers(spec.text_encoder_2, True))
    )
    scheduler = diffusers.EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
        prediction_type="epsilon",
    )
    tok1 = transformers.CLIPTokenizer.from_pretrained(tokenizer_folders[0])
    tok2 = transformers.CLIPTokenizer.from_pretrained(tokenizer_folders[1])
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1.eval(),
        text_encoder_2=te2.eval(),
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet.eval(),
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_pipeline(tokenizer_folders):
    from sdturbo.models.configs import TINY

    return build_reference_pipeline(TINY, tokenizer_folders)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, reference_pipeline) -> Path:
    """The tiny reference pipeline saved by diffusers itself: a real diffusers folder (safetensors, fp32)."""
    path = tmp_path_factory.mktemp("tiny-sdxl") / "model"
    reference_pipeline.save_pretrained(path, safe_serialization=True)
    return path
