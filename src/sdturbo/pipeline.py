"""TurboPipeline: prompt (and optionally an image) -> images. The only place that glues the models together.

Argument names and random-number use follow diffusers' StableDiffusionXLPipeline / Img2ImgPipeline, so the same
seed gives the same image; schedule="substep" follows generative-models' turbo demo instead."""

from __future__ import annotations

import hashlib
import math
import numbers
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import sampling
from .devices import resolve_device, resolve_dtype
from .limits import MAX_IMAGES_PER_PROMPT, MAX_SIDE_PX
from .models.configs import SDXL_TURBO, ModelSpec
from .models.unet import make_y
from .models.vae import sample_latent, vae_compute_dtype
from .output import GenerationParameters
from .preview import SDXL_LATENT_RGB, fit_latent_rgb, preview_pixels

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# What a step callback may ask for: diffusers' "latents" (x after the step) and our "denoised" (its x0 estimate).
CALLBACK_TENSOR_INPUTS = ("latents", "denoised")
MINI_MODEL_DIR = Path(__file__).parent / "assets" / "mini"  # sdturbo-mini, trained by `sdturbo train mini`
MAX_GUIDANCE_SCALE = 100  # far above any useful value (turbo: 0; SDXL: 5-15); 1e38 overflows to NaN
PROMPT_CACHE_SIZE = 32  # encode_prompt results kept; each is ~0.3 MB in 16-bit
ENCODE_CACHE_SIZE = 4  # VAE encodings of img2img inputs kept; ~0.1 MB each at 512x512


@dataclass
class TurboPipelineOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int | None]  # per image; None where a caller's generator was used
    parameters: list[GenerationParameters]  # per image, for PNG metadata


class TurboPipeline:
    def __init__(self, unet, text_encoder, text_encoder_2, vae, tokenizer, tokenizer_2, spec: ModelSpec, name: str):
        self.unet, self.text_encoder, self.text_encoder_2, self.vae = unet, text_encoder, text_encoder_2, vae
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.spec, self.name = spec, name
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vae_dtype = next(vae.parameters()).dtype
        # Recent encode_prompt results, newest last: an unchanged prompt (live typing, a stream of img2img frames)
        # costs no text encoding. Clear it after changing the text encoders' weights; size 0 turns it off.
        self.prompt_cache: OrderedDict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.prompt_cache_size = PROMPT_CACHE_SIZE
        # The same for img2img inputs: an unchanged image (typing over an upload or a drawing) skips the VAE encoder,
        # 2.8 s of a 512 px img2img call on a 2-core CPU. Keyed by the input's bytes; clear it after changing the VAE's
        # weights; size 0 turns it off.
        self.encode_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.encode_cache_size = ENCODE_CACHE_SIZE
        self._preview_factors = None  # fitted on first use where the VAE is not SDXL's (preview_images)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None,
        tokenizer: str | Path | None = None,
        variant: str | None = "fp16",
        vae_dtype: str | torch.dtype | None = None,
    ) -> "TurboPipeline":
        """model: a hub id ("stabilityai/sdxl-turbo"), a diffusers folder, a single .safetensors file, or "mini".

        vae_dtype: None/"auto" runs the VAE in `dtype`, except that an fp16 model gets a bf16 VAE (fp32 where bf16 is
        not native), since the SDXL VAE overflows in fp16. "fp32" reproduces diffusers' fp16 pipeline, which upcasts
        its VAE, at the cost of a slower decode."""
        from .loading import LoadError, load_components

        name = Path(model).stem if Path(model).exists() else str(model)  # a hub id as such, a path by its name
        if str(model) == "mini":
            model, name = MINI_MODEL_DIR, "sdturbo-mini"
            if not (model / "model_index.json").exists():
                raise LoadError(f"the bundled mini model is missing from {model}; reinstall sdturbo or run: sdturbo train mini")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        try:
            requested_vae_dtype = None if vae_dtype in (None, "auto") else resolve_dtype(vae_dtype, device)
        except ValueError as e:
            raise ValueError(f"vae_dtype: {e}") from None
        c = load_components(model, device=device, dtype=dtype, tokenizer=tokenizer, variant=variant)
        c.vae.to(vae_compute_dtype(dtype, device, c.spec.vae.force_upcast, requested_vae_dtype))
        return cls(c.unet, c.text_encoder, c.text_encoder_2, c.vae, c.tokenizer, c.tokenizer_2, c.spec, name)

    # -- conditioning -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(
        self, prompt: str | list[str], prompt_2: str | list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context [B,77,ctx] (both towers' penultimate states), pooled [B,proj] (tower 2's projected EOS): what
        __call__ takes as prompt_embeds and pooled_prompt_embeds (diffusers' encode_prompt also returns the negative
        pair; here encode the negative prompt the same way). prompt_2 goes to the second tower instead of prompt.
        The tensors are the caller's to change (prompt weighting): copies of self.prompt_cache's."""
        context, pooled = self._encode_prompt_cached(prompt, prompt_2)
        return context.clone(), pooled.clone()

    def _encode_prompt_cached(self, prompts, prompts_2=None) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_prompt through self.prompt_cache: an unchanged prompt costs no text encoding. The tensors are the
        cache's own, so that the fast path's cross-attention keeps their k and v: never modify them."""
        prompts = _as_prompt_list(prompts, "prompt")
        prompts_2 = prompts if prompts_2 is None else _prompts_for(prompts_2, len(prompts), "prompt_2")
        key = tuple(prompts) if prompts_2 == prompts else (tuple(prompts), tuple(prompts_2))  # tuples: no clash
        if key in self.prompt_cache:
            self.prompt_cache.move_to_end(key)
            return self.prompt_cache[key]
        with torch.no_grad():
            ids1 = self.tokenizer(prompts).to(self.device)
            ids2 = self.tokenizer_2(prompts_2).to(self.device)
            # clone: under CUDA graphs (speed.compile_models) the next network's replay may reuse an output's memory
            h1 = self.text_encoder(ids1)[0].clone()
            h2, pooled = self.text_encoder_2(ids2)
            result = torch.cat([h1, h2], dim=-1).to(self.dtype), pooled.to(self.dtype).clone()
        if self.prompt_cache_size > 0:
            self.prompt_cache[key] = result
            while len(self.prompt_cache) > self.prompt_cache_size:
                self.prompt_cache.popitem(last=False)
        return result

    def _conditioning(self, positive, negative, n: int, guidance_scale: float, time_ids: list[int]):
        """(context, pooled) of the prompts and, with CFG, of the negative prompts (None: zeros, diffusers'
        force_zeros_for_empty_prompt) -> context and y for the UNet batch; the unconditional half comes first."""
        context, pooled = positive
        if guidance_scale > 1.0:
            neg_context, neg_pooled = negative or (torch.zeros_like(context), torch.zeros_like(pooled))
            if neg_context.shape != context.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(neg_context.shape)} must have the prompt's embedding "
                                 f"shape {tuple(context.shape)}")
            context = torch.cat([neg_context.repeat_interleave(n, 0), context.repeat_interleave(n, 0)])
            pooled = torch.cat([neg_pooled.repeat_interleave(n, 0), pooled.repeat_interleave(n, 0)])
        elif n > 1:
            context, pooled = context.repeat_interleave(n, 0), pooled.repeat_interleave(n, 0)
        # else the prompt cache's own tensors: the fast path's cross-attention keeps their k and v between calls
        time_ids = torch.tensor([time_ids], dtype=torch.float32, device=self.device)  # fp16 ends at 65504
        y = make_y(pooled, time_ids.expand(pooled.shape[0], -1), self.spec.unet)
        return context, y

    def _check_embeds(self, context, pooled, name: str, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeds [B,T,ctx] with pooled_prompt_embeds [B,proj] (as encode_prompt returns them), on the
        pipeline's device and dtype."""
        ctx, proj = self.spec.unet.context_dim, self.spec.text_encoder_2.projection_dim
        pooled_name = name.replace("prompt_embeds", "pooled_prompt_embeds")
        for value, what, shape in ((context, name, f"[B, T, {ctx}]"), (pooled, pooled_name, f"[B, {proj}]")):
            if value is None:
                raise ValueError(f"{name} needs {pooled_name}: pass both, {shape} tensors as encode_prompt returns")
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{what} must be a torch tensor {shape}, got {type(value).__name__}")
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(f"{what} must be a finite floating-point tensor")
        if context.ndim != 3 or context.shape[2] != ctx or pooled.shape != (context.shape[0], proj):
            raise ValueError(f"{name} {tuple(context.shape)} and {pooled_name} {tuple(pooled.shape)} must be "
                             f"[B, T, {ctx}] and [B, {proj}] with the same B")
        if not context.shape[0] or not context.shape[1]:
            raise ValueError(f"{name} holds no prompt or no token")
        if batch is not None and context.shape[0] != batch:
            raise ValueError(f"{name} holds {context.shape[0]} prompts, the prompts {batch}")
        return context.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    # -- the call -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        negative_prompt: str | Sequence[str] | None = None,
        image: Image.Image | Sequence[Image.Image] | torch.Tensor | None = None,
        strength: float = 0.5,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        schedule: str = "trailing",
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        return_dict: bool = True,
    ) -> TurboPipelineOutput | tuple:
        """callback_on_step_end(pipe, step_index, timestep, tensors) runs after every step, as in diffusers: tensors
        holds the names in callback_on_step_end_tensor_inputs ("latents", "denoised"), and a "latents" entry in the
        dict it returns replaces x. step_index counts the steps this call runs (img2img's first is 0).

        image: PIL image(s), or a float [B,3,H,W] tensor in [0, 1] (or in [-1, 1] where it has values below 0, as
        diffusers takes it). strength is checked with or without an image, but only an image uses it.

        The keyword-only arguments are diffusers' StableDiffusionXLPipeline's: prompt_2 / negative_prompt_2 go to the
        second text encoder; prompt_embeds with pooled_prompt_embeds replace the prompt (encode_prompt makes them;
        the images' parameters then carry an empty prompt); latents are text-to-image's initial noise
        [B,4,H/8,W/8] (the seed then drives only the later steps' noise, and the parameters carry no seed);
        original_size, crops_coords_top_left and target_size are SDXL's size conditions ((height, width), (top,
        left), (height, width); default: the image's size, (0, 0), the image's size); return_dict=False returns
        (images,)."""
        if prompt_embeds is None and pooled_prompt_embeds is not None:
            raise ValueError("pooled_prompt_embeds goes with prompt_embeds, which was not passed")
        if negative_prompt_embeds is None and negative_pooled_prompt_embeds is not None:
            raise ValueError("negative_pooled_prompt_embeds goes with negative_prompt_embeds, which was not passed")
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt, or prompt_embeds with pooled_prompt_embeds")
            prompts = _as_prompt_list(prompt, "prompt")
            prompts_2 = _prompts_for(prompt_2, len(prompts), "prompt_2")
        else:
            if prompt is not None or prompt_2 is not None:
                raise ValueError("pass either prompt (and prompt_2) or prompt_embeds, not both")
            prompt_embeds = self._check_embeds(prompt_embeds, pooled_prompt_embeds, "prompt_embeds")
            prompts, prompts_2 = [""] * prompt_embeds[0].shape[0], None
        n = _check_int(num_images_per_prompt, "num_images_per_prompt", 1, MAX_IMAGES_PER_PROMPT)
        steps = _check_int(num_inference_steps, "num_inference_steps", 1, sampling.MAX_STEPS)
        batch = len(prompts) * n
        negative_prompts = _prompts_for(negative_prompt, len(prompts), "negative_prompt")
        negative_prompts_2 = _prompts_for(negative_prompt_2, len(prompts), "negative_prompt_2")
        if negative_prompts_2 and not negative_prompts:
            raise ValueError("negative_prompt_2 needs negative_prompt (without one, the unconditional half is zeros)")
        if negative_prompt_embeds is not None:
            if negative_prompts:
                raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
            negative_prompt_embeds = self._check_embeds(
                negative_prompt_embeds, negative_pooled_prompt_embeds, "negative_prompt_embeds", len(prompts)
            )
        if not _is_number(guidance_scale) or not 0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(f"guidance_scale must be a number from 0 to {MAX_GUIDANCE_SCALE}, got {guidance_scale!r}")
        guidance_scale = float(guidance_scale)
        if (negative_prompts or negative_prompt_embeds is not None) and guidance_scale <= 1:  # diffusers: silently
            warnings.warn(f"negative_prompt is used only with guidance_scale > 1, not {guidance_scale}; it is ignored")
        if not _is_number(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        strength = float(strength)
        height = None if height is None else self._check_side(height, "height")
        width = None if width is None else self._check_side(width, "width")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if schedule not in sampling.SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(sampling.SCHEDULES)}, got {schedule!r}")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not among {list(CALLBACK_TENSOR_INPUTS)}")

        pixels = None
        if image is not None:
            if steps * strength < 1:
                new_steps = math.ceil(1 / strength)
                if new_steps > sampling.MAX_STEPS:
                    raise ValueError(
                        f"strength {strength} needs at least {new_steps} steps to run one; the most is "
                        f"{sampling.MAX_STEPS}: use strength >= {1 / sampling.MAX_STEPS:g}"
                    )
                warnings.warn(
                    f"num_inference_steps {steps} x strength {strength} < 1 would run no step; using {new_steps} steps"
                )
                steps = new_steps
            pixels = self._preprocess_image(image, height, width, len(prompts), n)
            height, width = pixels.shape[-2:]
        if latents is not None:
            if pixels is not None:
                raise ValueError("latents are text-to-image's initial noise; with image, leave them out")
            height, width = self._latents_size(latents, batch, height, width)
        height, width = self._check_size(height, width)
        time_ids = [
            *_size_pair(original_size, "original_size", (height, width)),
            *_size_pair(crops_coords_top_left, "crops_coords_top_left", (0, 0), minimum=0),
            *_size_pair(target_size, "target_size", (height, width)),
        ]
        schedule_ = sampling.make_schedule(steps, schedule)
        start = sampling.img2img_start_index(steps, strength) if pixels is not None else 0

        seeds, rng = self._random_source(seed, generator, batch, schedule, steps)
        latent_shape = (batch, self.spec.unet.in_channels, height // self._vae_scale, width // self._vae_scale)
        noise = _NoiseDrawer(rng, latent_shape, self.dtype, self.device)
        if latents is not None:  # as diffusers: no draw for the initial noise, the later steps' draws unchanged
            noise.skip()
            x = latents.to(self.device, self.dtype) * schedule_.init_sigma.to(self.device)
            seeds = [None] * batch
        elif pixels is None:
            x = noise.draw() * schedule_.init_sigma.to(self.device)
        else:
            z0 = self._encode_image(pixels, noise, batch)
            x = z0 + noise.draw() * schedule_.sigmas[start].to(self.device, z0.dtype)

        positive = prompt_embeds if prompt_embeds is not None else self._encode_prompt_cached(prompts, prompts_2)
        negative = None
        if guidance_scale > 1.0:
            negative = negative_prompt_embeds
            if negative_prompts is not None:
                negative = self._encode_prompt_cached(negative_prompts, negative_prompts_2)
        context, y = self._conditioning(positive, negative, n, guidance_scale, time_ids)

        def denoiser(x, sigma, t):
            x_in = x / sampling.input_divisor(sigma)
            if guidance_scale > 1.0:
                x_in = torch.cat([x_in, x_in])
            eps = self.unet(x_in.to(self.dtype), t.expand(x_in.shape[0]), context, y)
            if guidance_scale > 1.0:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            return sampling.eps_to_denoised(x, eps, sigma)

        on_step = None
        if callback_on_step_end is not None:

            def on_step(i, t, x, denoised):
                tensors = {"latents": x, "denoised": denoised}
                returned = callback_on_step_end(
                    self, i - start, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                )
                return _callback_latents(returned, x)

        x = sampling.euler_ancestral(denoiser, x, schedule_, lambda i: noise.draw(), start=start, on_step=on_step)

        # One generator for several images: image i comes back only from the whole batch (A1111's "Batch pos").
        shared = batch > 1 and isinstance(noise.rng, torch.Generator)
        params = [
            GenerationParameters(
                prompt=prompts[i // n],
                negative_prompt=negative_prompts[i // n] if negative_prompts and guidance_scale > 1 else None,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seeds[i],
                width=width,
                height=height,
                model=self.name,
                schedule=schedule,
                strength=strength if pixels is not None else None,
                batch_size=batch if shared else None,
                batch_pos=i if shared else None,
            )
            for i in range(batch)
        ]
        if output_type == "latent":
            images = x
        else:
            images = _to_output(self.decode_latents(x), output_type, truncate=schedule == "substep")
        return TurboPipelineOutput(images, seeds, params) if return_dict else (images,)

    # -- pieces -------------------------------------------------------------------------------------------------

    @property
    def _vae_scale(self) -> int:
        return self.spec.vae.downscale_factor

    @property
    def native_side_px(self) -> int:
        """The side the model was trained at (512 for SDXL-Turbo, 64 for sdturbo-mini): the default image size."""
        return self.spec.unet.sample_size * self._vae_scale

    @torch.no_grad()
    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """latents [B,4,h,w] -> image [B,3,H,W] in [-1, 1] (float32)."""
        z = x.to(self.vae_dtype) / self.spec.vae.scaling_factor
        return self.vae.decode(z).float()

    def preview_images(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents [B,4,h,w] (the sampler's x, or its x0 estimate) -> RGB previews at latent resolution,
        without the VAE (sdturbo.preview): microseconds, where decode_latents takes seconds on a CPU."""
        if self._preview_factors is None:
            vae, sdxl = self.spec.vae, SDXL_TURBO.vae
            if (vae.latent_channels, vae.block_out_channels, vae.scaling_factor) == (
                sdxl.latent_channels, sdxl.block_out_channels, sdxl.scaling_factor
            ):
                self._preview_factors = SDXL_LATENT_RGB
            else:
                self._preview_factors = fit_latent_rgb(self.vae, vae.scaling_factor, self._vae_scale)
        return [Image.fromarray(p) for p in preview_pixels(latents, factors=self._preview_factors).numpy()]

    def _latents_size(self, latents, batch: int, height: int | None, width: int | None) -> tuple[int, int]:
        """The image size that given latents imply, checked against their batch, channels and any height/width."""
        channels = self.spec.unet.in_channels
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[:2] != (batch, channels):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a [{batch}, {channels}, H/{self._vae_scale}, W/{self._vae_scale}] "
                             f"tensor (one per image), got {got}")
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise ValueError("latents must be a finite floating-point tensor")
        implied = (latents.shape[2] * self._vae_scale, latents.shape[3] * self._vae_scale)
        for name, given, side in (("height", height, implied[0]), ("width", width, implied[1])):
            if given is not None and given != side:
                raise ValueError(f"{name} {given} does not match the latents, which make {side} px")
        return implied

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.native_side_px
        height = default if height is None else height
        width = default if width is None else width
        height, width = self._check_side(height, "height"), self._check_side(width, "width")
        if (height, width) != (default, default):
            warnings.warn(f"{width}x{height} differs from {default}x{default}, the size this model was trained at")
        return height, width

    def _check_side(self, v, name: str) -> int:
        if not _is_integer(v) or not 0 < v <= MAX_SIDE_PX or v % self._vae_scale:
            raise ValueError(
                f"{name} must be a multiple of {self._vae_scale} between {self._vae_scale} and {MAX_SIDE_PX}, got {v!r}"
            )
        return int(v)

    def _random_source(self, seed, generator, batch: int, schedule: str, steps: int):
        """-> (seeds per image, a torch.Generator / list of them, or a list of int seeds for numpy noise)."""
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if generator is not None:
            generators = generator if isinstance(generator, (list, tuple)) else [generator]
            if not all(isinstance(g, torch.Generator) for g in generators):
                raise ValueError(f"generator must be a torch.Generator or a list of one per image, got {generator!r}")
            if schedule == "substep":
                raise ValueError("schedule 'substep' draws numpy noise from integer seeds; pass seed= instead of generator=")
            if isinstance(generator, (list, tuple)) and len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")
            return [None] * batch, list(generator) if isinstance(generator, (list, tuple)) else generator
        if seed is None:
            seeds = [random.randrange(2**32) for _ in range(batch)]
        elif isinstance(seed, (list, tuple)):
            seeds = [_check_seed(s) for s in seed]
            if len(seeds) != batch:
                raise ValueError(f"got {len(seeds)} seeds for {batch} images; pass one per image or a single int")
        else:
            seeds = [_check_seed(seed)] * batch
        if schedule == "substep":
            if max(seeds) + steps >= 2**32:
                raise ValueError("schedule 'substep' seeds numpy, which takes seeds below 2**32 - steps; pass a smaller seed")
            return seeds, _NumpySeeds(seeds)
        if seed is not None and not isinstance(seed, (list, tuple)):  # one generator for the batch, as in diffusers
            return seeds, torch.Generator("cpu").manual_seed(seeds[0])
        return seeds, [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def _preprocess_image(self, image, height, width, num_prompts: int, n: int) -> torch.Tensor:
        """PIL image(s) or a [B,3,H,W] tensor in [0,1] -> [B,3,H,W] in [-1,1] on the device, one per output image."""
        if isinstance(image, torch.Tensor):
            if image.ndim == 3:
                image = image[None]
            if image.ndim != 4 or image.shape[1] != 3 or not image.numel():
                raise ValueError(f"image tensor must be [B,3,H,W] in [0, 1], got shape {tuple(image.shape)}")
            if not image.is_floating_point():
                raise ValueError(
                    f"image tensor must be floating point in [0, 1], got {image.dtype}: pass image.float() / 255"
                )
            if not torch.isfinite(image).all():
                raise ValueError("image tensor has NaN or infinite values")
            lo, hi = image.min().item(), image.max().item()
            if lo < -1 or hi > 1:
                raise ValueError(f"image tensor values must be in [0, 1] (or [-1, 1]), got [{lo:g}, {hi:g}]: divide "
                                 "a [0, 255] tensor by 255")
            pixels = image.float() if lo < 0 else image.float() * 2 - 1  # diffusers: values below 0 mean [-1, 1]
            if height is not None or width is not None:
                size = (height or pixels.shape[2], width or pixels.shape[3])
                pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bicubic")
        else:
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            if not images or not all(isinstance(im, Image.Image) for im in images):
                raise ValueError("image must be a PIL image, a non-empty list of them, or a [B,3,H,W] tensor in [0, 1]")
            w0, h0 = images[0].size
            s = self._vae_scale
            size = (width or w0 - w0 % s, height or h0 - h0 % s)
            if min(size) < s:
                raise ValueError(f"image is {w0}x{h0}; it must be at least {s}x{s} pixels")
            arrays = [np.asarray(rgb_image(im).resize(size, Image.LANCZOS), dtype=np.float32) / 255.0 for im in images]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1
        b = pixels.shape[0]
        if b == num_prompts * n or b == 1:
            pass
        elif b == num_prompts:
            pixels = pixels.repeat_interleave(n, 0)
        else:
            raise ValueError(f"got {b} images for {num_prompts} prompts; pass 1, one per prompt, or one per output image")
        return pixels.to(self.device)

    def _encode_image(self, pixels: torch.Tensor, noise: "_NoiseDrawer", batch: int) -> torch.Tensor:
        """Sample the VAE posterior with the caller's random stream (diffusers' order: this draw comes first)."""
        pixels = pixels.to(self.vae_dtype)
        if isinstance(noise.rng, list) and pixels.shape[0] == 1:
            pixels = pixels.expand(batch, -1, -1, -1)
        mean, logvar = self._encode_pixels(pixels)
        z = sample_latent(mean, logvar, noise.draw(tuple(mean.shape)).to(mean.dtype))
        z0 = (self.spec.vae.scaling_factor * z).to(self.dtype)
        if z0.shape[0] != batch:
            z0 = z0.expand(batch, -1, -1, -1)
        return z0

    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vae.encode through self.encode_cache. Callers must not modify the returned tensors in place."""
        if self.encode_cache_size <= 0:
            return self.vae.encode(pixels)
        digest = hashlib.blake2b(pixels.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16)
        key = f"{tuple(pixels.shape)}:{pixels.dtype}:{digest.hexdigest()}"
        if key in self.encode_cache:
            self.encode_cache.move_to_end(key)
            return self.encode_cache[key]
        result = self.vae.encode(pixels)
        self.encode_cache[key] = result
        while len(self.encode_cache) > self.encode_cache_size:
            self.encode_cache.popitem(last=False)
        return result


class _NumpySeeds(list):
    """Integer seeds for generative-models-style noise: draw k of image b uses RandomState(seed_b + k)."""


class _NoiseDrawer:
    """Unit Gaussian noise drawn the way the chosen reference draws it, one call per use in its order."""

    def __init__(self, rng, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.rng, self.shape, self.dtype, self.device = rng, shape, dtype, device
        self.calls = 0

    def draw(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = shape or self.shape
        if isinstance(self.rng, _NumpySeeds):
            parts = [np.random.RandomState(s + self.calls).randn(1, *shape[1:]) for s in self.rng]
            out = torch.from_numpy(np.concatenate(parts)).float()
        elif isinstance(self.rng, list):  # diffusers randn_tensor with one generator per image
            out = torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=self.dtype) for g in self.rng]
            )
        else:
            out = torch.randn(shape, generator=self.rng, device=self.rng.device, dtype=self.dtype)
        self.calls += 1
        return out.to(self.device, self.dtype)

    def skip(self) -> None:
        """Count a draw the caller made instead (given latents): numpy draw k stays RandomState(seed + k)."""
        self.calls += 1


def rgb_image(image: Image.Image) -> Image.Image:
    """An input image as 8-bit RGB. convert("RGB") clips 16-bit images (PNG values 0..65535) to near-white, so those
    are scaled; a float image's range is anyone's guess."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        scaled = (np.asarray(image, dtype=np.float32) / 257).clip(0, 255).round().astype(np.uint8)
        image = Image.fromarray(scaled)
    elif image.mode == "F":
        raise ValueError("image is a floating-point (mode F) PIL image of unknown range: convert it to 8-bit RGB")
    return image.convert("RGB")


def _callback_latents(returned, x: torch.Tensor) -> torch.Tensor:
    """The x to go on with after a step callback: diffusers' rule, a "latents" entry in its dict replaces x."""
    if returned is None:
        return x
    if not isinstance(returned, dict):
        raise ValueError(f"callback_on_step_end must return a dict or None, got {type(returned).__name__}")
    latents = returned.get("latents", x)
    if not isinstance(latents, torch.Tensor) or (latents.shape, latents.dtype) != (x.shape, x.dtype):
        got = f"{tuple(latents.shape)} {latents.dtype}" if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"callback_on_step_end returned latents {got}; return a tensor like the step's: "
                         f"{tuple(x.shape)} {x.dtype}")
    return latents


def _to_output(image: torch.Tensor, output_type: str, truncate: bool):
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image.cpu()
    if output_type == "np":
        return image.permute(0, 2, 3, 1).cpu().numpy()
    # uint8 on the device: diffusers rounds, generative-models truncates.
    scaled = image * 255
    pixels = (scaled if truncate else scaled.round()).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def _as_prompt_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return prompts


def _prompts_for(value, num_prompts: int, name: str) -> list[str] | None:
    """A second list of texts (negative_prompt, prompt_2, ...): one for all prompts or one per prompt."""
    if value is None:
        return None
    texts = _as_prompt_list(value, name)
    if len(texts) == 1:
        return texts * num_prompts
    if len(texts) != num_prompts:
        raise ValueError(f"got {len(texts)} texts in {name} for {num_prompts} prompts; pass one, or one per prompt")
    return texts


def _size_pair(value, name: str, default: tuple[int, int], minimum: int = 1) -> tuple[int, int]:
    if value is None:
        return default
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_integer(v) for v in value):
        raise ValueError(f"{name} must be a pair of integers, got {value!r}")
    if min(value) < minimum or max(value) > 2**16:
        raise ValueError(f"{name} values must be from {minimum} to {2**16}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _is_integer(value) -> bool:
    """Python and numpy integers; not bools, which are ints to Python."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(value, name: str, lo: int, hi: int) -> int:
    if not _is_integer(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if not _is_integer(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return int(seed)
