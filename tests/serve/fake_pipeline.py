"""FakePipeline: TurboPipeline's call signature and output type, with deterministic images and no model.

Each image is a function of its own (prompt, seed, size, steps, guidance, negative prompt, source image, strength),
exactly the property the real pipeline has with per-image seeds, so tests can tell every image's origin."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import torch
from PIL import Image

from sdturbo.output import GenerationParameters
from sdturbo.pipeline import TurboPipelineOutput


def expected_image(
    prompt: str,
    seed: int,
    width: int,
    height: int,
    steps: int = 1,
    guidance_scale: float = 0.0,
    negative_prompt: str | None = None,
    image: Image.Image | None = None,
    strength: float = 0.5,
) -> Image.Image:
    source = hashlib.sha256(image.tobytes()).hexdigest() if image is not None else None
    key = repr((prompt, seed, width, height, steps, float(guidance_scale), negative_prompt, source, strength))
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    tile = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(tile).resize((width, height), Image.NEAREST)


class FakePipeline:
    name = "fake"

    def __init__(self, delay_s: float = 0.0, per_image_s: float = 0.0, after_previews_s: float = 0.0):
        """after_previews_s: how long a call that sent step previews takes after them (a VAE decode's stand-in)."""
        self.delay_s, self.per_image_s, self.after_previews_s = delay_s, per_image_s, after_previews_s
        self.calls: list[list[str]] = []  # the prompts of each call, in call order
        self._lock = threading.Lock()

    def __call__(
        self,
        prompt,
        num_inference_steps=1,
        guidance_scale=0.0,
        height=None,
        width=None,
        num_images_per_prompt=1,
        negative_prompt=None,
        image=None,
        strength=0.5,
        generator=None,
        seed=None,
        schedule="trailing",
        output_type="pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ) -> TurboPipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = num_images_per_prompt
        batch = len(prompts) * n
        height, width = height or 512, width or 512
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {width}x{height}")
        if any(p == "raise ValueError" for p in prompts):
            raise ValueError("prompt 'raise ValueError' is refused by the fake pipeline")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed if seed is not None else 0] * batch
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, (str, type(None))) else negative_prompt
        )
        images = list(image) if isinstance(image, (list, tuple)) else [image] * batch
        with self._lock:
            self.calls.append([prompts[i // n] for i in range(batch)])
        time.sleep(self.delay_s + self.per_image_s * batch)
        out, params = [], []
        for i in range(batch):
            p = prompts[i // n]
            neg = negatives[i // n] if guidance_scale > 1 else None
            src = images[i]
            out.append(
                expected_image(p, seeds[i], width, height, num_inference_steps, guidance_scale, neg, src, strength)
            )
            params.append(
                GenerationParameters(
                    prompt=p,
                    negative_prompt=neg,
                    steps=num_inference_steps,
                    guidance_scale=float(guidance_scale),
                    seed=seeds[i],
                    width=width,
                    height=height,
                    model=self.name,
                    strength=float(strength) if src is not None else None,
                )
            )
        if callback_on_step_end is not None:
            # Row i of the fake x0 estimate holds i, so preview_images can tell which image a row previews.
            rows = torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 4, height // 8, width // 8)
            self._previewed = out
            for step in range(num_inference_steps):
                tensors = {"latents": rows, "denoised": rows}
                callback_on_step_end(self, step, 999 - step, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
            time.sleep(self.after_previews_s)
        return TurboPipelineOutput(out, seeds, params)

    def preview_images(self, latents) -> list[Image.Image]:
        """The call's images at latent size, as the real previews are."""
        h, w = latents.shape[-2:]
        return [self._previewed[int(row[0, 0, 0])].resize((w, h), Image.NEAREST) for row in latents]

    @property
    def batch_sizes(self) -> list[int]:
        with self._lock:
            return [len(c) for c in self.calls]
