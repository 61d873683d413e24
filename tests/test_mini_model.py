"""The shipped sdturbo-mini (src/sdturbo/assets/mini) as a model, not just as files: it follows the background a
prompt names, at 1 and at 4 steps. docs/eval.md has its full evaluation."""

import pytest
import torch

from sdturbo.pipeline import TurboPipeline
from sdturbo.train.data import BACKGROUND_COLORS

PROMPTS = {
    "a blue square on a yellow background": "yellow",
    "a red circle on a white background": "white",
    "a yellow triangle on a purple background": "purple",
    "a white circle on a black background": "black",
}


@pytest.fixture(scope="module")
def pipe():
    return TurboPipeline.from_pretrained("mini", device="cpu", dtype=torch.float32)


def border_color(images: torch.Tensor, width: int = 4) -> torch.Tensor:
    """Mean RGB in [0, 1] of the outer `width` pixels of every image: where the background shows."""
    mask = torch.ones(images.shape[-2:], dtype=torch.bool)
    mask[width:-width, width:-width] = False
    return images[..., mask].mean(dim=(0, 2))


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_background_follows_the_prompt(pipe, prompt, steps):
    images = pipe(prompt, num_inference_steps=steps, num_images_per_prompt=8, seed=list(range(8)), output_type="pt")
    expected = torch.tensor(BACKGROUND_COLORS[PROMPTS[prompt]]) / 255
    assert (border_color(images.images) - expected).abs().max() < 0.15, (border_color(images.images), expected)
