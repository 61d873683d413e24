"""The shipped sdturbo-mini draws the same images in diffusers as in sdturbo (its text configs name its own
tokenizer's end token, where transformers pools), and the same again after a round trip through the single file
(whose metadata keeps the VAE scaling factor that the sgm layout does not hold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdturbo.loading import load_components, save_single_file
from sdturbo.pipeline import MINI_MODEL_DIR, TurboPipeline

LATENT_TOL = 1e-4
IMAGE_TOL = 1e-3
PROMPTS = ["a red circle on a white background", "a small blue square above a yellow triangle!"]


@pytest.fixture(scope="module")
def pipe() -> TurboPipeline:
    return TurboPipeline.from_pretrained("mini", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(
        MINI_MODEL_DIR, torch_dtype=torch.float32, add_watermarker=False
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 4])
def test_diffusers_draws_the_same_images(pipe, reference, steps):
    """64 px (the mini's size), seed=int as one CPU torch.Generator for the batch (README)."""
    for output_type, tol in (("latent", LATENT_TOL), ("np", IMAGE_TOL)):
        ref = reference(PROMPTS, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
                        generator=torch.Generator("cpu").manual_seed(7), output_type=output_type).images
        ours = pipe(PROMPTS, num_inference_steps=steps, height=64, width=64, seed=7, output_type=output_type).images
        assert ours.shape == ref.shape
        assert max_diff(ours, ref) <= tol, output_type


def test_single_file_round_trip_draws_the_same_image(pipe, tmp_path):
    c = load_components(MINI_MODEL_DIR, dtype=None)
    path = save_single_file(tmp_path / "mini.safetensors", c.models(), c.spec)
    again = TurboPipeline.from_pretrained(path, tokenizer=MINI_MODEL_DIR, device="cpu", dtype="fp32")
    assert again.spec == pipe.spec
    for steps in (1, 4):
        ours = again(PROMPTS[0], num_inference_steps=steps, seed=3, output_type="np").images
        folder = pipe(PROMPTS[0], num_inference_steps=steps, seed=3, output_type="np").images
        assert max_diff(ours, folder) <= 1e-6
