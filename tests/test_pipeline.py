"""End-to-end parity with diffusers' SDXL pipelines on identical random weights (fp32, CPU), and the pipeline's
own behaviour: seeds, output types, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdturbo.pipeline import TurboPipeline

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from.*the size this model was trained at")

LATENT_TOL = 1e-4
IMAGE_TOL = 1e-3


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> TurboPipeline:
    return TurboPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def max_diff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    b = torch.as_tensor(np.asarray(b)) if not isinstance(b, torch.Tensor) else b
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_txt2img_latents_and_images_match_diffusers(pipe, reference_pipeline, steps):
    prompt = "a red circle left of a blue square"
    ref = reference_pipeline(prompt, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
                             generator=gen(7), output_type="latent").images
    ours = pipe(prompt, num_inference_steps=steps, height=64, width=64, seed=7, output_type="latent").images
    assert ours.shape == ref.shape
    assert max_diff(ours, ref) <= LATENT_TOL
    ref_np = reference_pipeline(prompt, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
                                generator=gen(7), output_type="np").images
    ours_np = pipe(prompt, num_inference_steps=steps, height=64, width=64, seed=7, output_type="np").images
    assert max_diff(ours_np, ref_np) <= IMAGE_TOL


@pytest.mark.parity
def test_non_square_size_matches_diffusers(pipe, reference_pipeline):
    ref = reference_pipeline("a green triangle", num_inference_steps=2, guidance_scale=0.0, height=64, width=96,
                             generator=gen(3), output_type="np").images
    ours = pipe("a green triangle", num_inference_steps=2, height=64, width=96, seed=3, output_type="np").images
    assert ours.shape == ref.shape == (1, 64, 96, 3)
    assert max_diff(ours, ref) <= IMAGE_TOL


@pytest.mark.parity
def test_batch_with_per_image_seeds_matches_diffusers(pipe, reference_pipeline):
    prompts = ["a red circle", "a large blue square"]
    seeds = [11, 12, 13, 14]
    ref = reference_pipeline(prompts, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=0.0,
                             height=64, width=64, generator=[gen(s) for s in seeds], output_type="latent").images
    ours = pipe(prompts, num_images_per_prompt=2, num_inference_steps=2, height=64, width=64, seed=seeds,
                output_type="latent").images
    assert max_diff(ours, ref) <= LATENT_TOL
    # Each image depends only on its own prompt and seed: image 3 alone equals image 3 of the batch.
    alone = pipe(prompts[1], num_inference_steps=2, height=64, width=64, seed=[seeds[3]], output_type="latent").images
    assert max_diff(alone[0], ours[3]) <= LATENT_TOL


@pytest.mark.parity
def test_single_seed_for_a_batch_matches_one_diffusers_generator(pipe, reference_pipeline):
    ref = reference_pipeline("a circle", num_images_per_prompt=3, num_inference_steps=2, guidance_scale=0.0,
                             height=64, width=64, generator=gen(5), output_type="latent").images
    ours = pipe("a circle", num_images_per_prompt=3, num_inference_steps=2, height=64, width=64, seed=5,
                output_type="latent").images
    assert max_diff(ours, ref) <= LATENT_TOL


@pytest.mark.parity
@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_guidance_with_negative_prompt_matches_diffusers(pipe, reference_pipeline, negative):
    kw = dict(num_inference_steps=2, guidance_scale=3.0, height=64, width=64, negative_prompt=negative)
    ref = reference_pipeline("a purple square", generator=gen(21), output_type="latent", **kw).images
    ours = pipe("a purple square", seed=21, output_type="latent", **kw).images
    assert max_diff(ours, ref) <= LATENT_TOL
    plain = pipe("a purple square", seed=21, output_type="latent", num_inference_steps=2, height=64, width=64).images
    assert max_diff(ours, plain) > 1e-3  # guidance really changed the result


@pytest.fixture(scope="module")
def input_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parity
@pytest.mark.parametrize("steps,strength", [(2, 0.5), (4, 0.75), (1, 1.0)])
def test_img2img_matches_diffusers(pipe, reference_pipeline, input_image, steps, strength):
    import diffusers

    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**reference_pipeline.components)
    img2img.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=steps, strength=strength, guidance_scale=0.0)
    ref = img2img("a yellow circle", image=input_image, generator=gen(9), output_type="latent", **kw).images
    ours = pipe("a yellow circle", image=input_image, seed=9, output_type="latent", **kw).images
    assert max_diff(ours, ref) <= LATENT_TOL
    ref_np = img2img("a yellow circle", image=input_image, generator=gen(9), output_type="np", **kw).images
    ours_np = pipe("a yellow circle", image=input_image, seed=9, output_type="np", **kw).images
    assert max_diff(ours_np, ref_np) <= IMAGE_TOL


@pytest.mark.parity
def test_img2img_batch_with_per_image_seeds_matches_diffusers(pipe, reference_pipeline, input_image):
    import diffusers

    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**reference_pipeline.components)
    img2img.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, strength=0.5, guidance_scale=0.0, num_images_per_prompt=2)
    ref = img2img("a white square", image=input_image, generator=[gen(1), gen(2)], output_type="latent", **kw).images
    ours = pipe("a white square", image=input_image, seed=[1, 2], output_type="latent", **kw).images
    assert max_diff(ours, ref) <= LATENT_TOL


def test_same_seed_same_image_and_output_types(pipe):
    a = pipe("a black triangle", seed=1, output_type="pil")
    b = pipe("a black triangle", seed=1, output_type="pil")
    assert isinstance(a.images[0], Image.Image) and a.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert a.seeds == [1]
    pt = pipe("a black triangle", seed=1, output_type="pt").images
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    np_img = pipe("a black triangle", seed=1, output_type="np").images
    assert np.array_equal(np.asarray(a.images[0]), (np_img[0] * 255).round().astype(np.uint8))
    c = pipe("a black triangle", seed=2, output_type="np").images
    assert max_diff(c, np_img) > 1e-3


def test_random_seeds_are_reported_and_reproduce(pipe):
    out = pipe("a circle", num_images_per_prompt=2, output_type="latent")
    assert len(out.seeds) == 2 and all(isinstance(s, int) for s in out.seeds)
    again = pipe("a circle", seed=[out.seeds[1]], output_type="latent")
    assert max_diff(again.images[0], out.images[1]) <= LATENT_TOL
    assert out.parameters[1].seed == out.seeds[1]


def test_substep_schedule_uses_numpy_noise(pipe):
    """generative-models' turbo demo: x_T = RandomState(seed) noise x sqrt(1 + sigma_max^2); 1 step = x_T - sigma eps."""
    from sdturbo import sampling
    from sdturbo.models.unet import make_y

    seed = 42
    out = pipe("a red circle", seed=seed, schedule="substep", output_type="latent").images
    s = sampling.make_schedule(1, "substep")
    n = torch.from_numpy(np.random.RandomState(seed).randn(1, 4, 8, 8)).float()
    x = n * torch.sqrt(1 + s.sigmas[0] ** 2)
    context, pooled = pipe.encode_prompt(["a red circle"])
    y = make_y(pooled, torch.tensor([[64.0, 64, 0, 0, 64, 64]]), pipe.spec.unet)
    eps = pipe.unet(x / torch.sqrt(s.sigmas[0] ** 2 + 1), torch.tensor([999.0]), context, y)
    assert max_diff(out, x - s.sigmas[0] * eps) <= LATENT_TOL


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=60), "height must be a multiple of 8"),
        (dict(width=0), "width must be a multiple of 8"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer from 1 to 50"),
        (dict(num_inference_steps=51), "num_inference_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(schedule="karras"), "schedule"),
        (dict(seed=[1, 2]), "seeds for 1 images"),
        (dict(seed=-3), "seed must be"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    ],
)
def test_bad_arguments_raise_one_line_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        pipe("a circle", **kwargs)
    assert "\n" not in str(e.value)


def test_img2img_strength_validation_and_step_raise(pipe, input_image):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe("a circle", image=input_image, strength=0.0)
    with pytest.raises(ValueError, match="strength"):
        pipe("a circle", image=input_image, strength=1.5)
    with pytest.warns(UserWarning, match="using 4 steps"):
        out = pipe("a circle", image=input_image, strength=0.25, num_inference_steps=1, seed=0)
    assert out.parameters[0].steps == 4


def test_non_512_size_warns(pipe):
    with pytest.warns(UserWarning, match="differs from 64x64"):
        pipe("a circle", height=64, width=96, seed=0, output_type="latent")


@pytest.mark.parity
def test_fp16_with_fp32_vae_matches_diffusers_fp16_pipeline(tiny_model_dir):
    """diffusers upcasts the fp16 pipeline's VAE to fp32 (force_upcast): vae_dtype="fp32" reproduces its images,
    and is closer to them than the default bf16 VAE."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float16)
    ref.set_progress_bar_config(disable=True)
    expected = ref("a red circle", num_inference_steps=2, guidance_scale=0.0, height=64, width=64,
                   generator=gen(3), output_type="pt").images
    faithful = TurboPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp16", vae_dtype="fp32")
    default = TurboPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp16")
    assert faithful.vae_dtype == torch.float32 and faithful.dtype == torch.float16
    assert default.vae_dtype == torch.bfloat16
    ours = faithful("a red circle", num_inference_steps=2, height=64, width=64, generator=gen(3), output_type="pt")
    bf16 = default("a red circle", num_inference_steps=2, height=64, width=64, generator=gen(3), output_type="pt")
    assert max_diff(ours.images, expected) < IMAGE_TOL
    assert max_diff(ours.images, expected) < max_diff(bf16.images, expected)


def test_vae_dtype_choice_and_bad_values(tiny_model_dir, input_image):
    pipe = TurboPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bf16", vae_dtype="fp32")
    assert (pipe.dtype, pipe.vae_dtype) == (torch.bfloat16, torch.float32)
    out = pipe("a red circle", image=input_image, strength=0.5, num_inference_steps=2, seed=1, output_type="pt")
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="vae_dtype: unknown dtype 'fp8'"):
        TurboPipeline.from_pretrained(tiny_model_dir, device="cpu", vae_dtype="fp8")
    with pytest.raises(ValueError, match="vae_dtype fp16 overflows"):
        TurboPipeline.from_pretrained(tiny_model_dir, device="cpu", vae_dtype="fp16")


def test_step_callback_sees_every_step_and_can_replace_the_latents(pipe, input_image):
    calls = []

    def record(p, step, timestep, tensors):
        calls.append((step, int(timestep), sorted(tensors), tensors["denoised"].dtype))
        return {}

    plain = pipe("a red circle", num_inference_steps=4, seed=5, output_type="latent").images
    watched = pipe("a red circle", num_inference_steps=4, seed=5, output_type="latent", callback_on_step_end=record,
                   callback_on_step_end_tensor_inputs=["latents", "denoised"]).images
    assert torch.equal(plain, watched)
    assert [c[:2] for c in calls] == [(0, 999), (1, 749), (2, 499), (3, 249)]
    assert calls[0][2] == ["denoised", "latents"] and calls[0][3] == torch.float32

    calls.clear()
    pipe("a red circle", image=input_image, strength=0.5, num_inference_steps=4, seed=5, callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["denoised"])
    assert [c[:2] for c in calls] == [(0, 499), (1, 249)]  # img2img runs the last two steps, counted from 0

    zeroed = pipe("a red circle", num_inference_steps=2, seed=5, output_type="latent",
                  callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros_like(k["latents"])}).images
    assert not zeroed.any()
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a red circle", callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_preview_images_are_latent_sized(pipe):
    x = pipe("a red circle", num_inference_steps=1, seed=5, output_type="latent").images
    previews = pipe.preview_images(x)
    assert len(previews) == 1 and previews[0].size == (x.shape[-1], x.shape[-2]) and previews[0].mode == "RGB"


# -- diffusers' other StableDiffusionXLPipeline arguments ----------------------------------------------------


@pytest.mark.parity
def test_given_latents_match_diffusers(pipe, reference_pipeline):
    """Initial noise from the caller (seed walks, interpolation); the generator still drives the later steps."""
    noise = torch.randn(2, 4, 8, 8, generator=gen(99))
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
    ref = reference_pipeline("a circle", guidance_scale=0.0, latents=noise, generator=[gen(1), gen(2)],
                             num_images_per_prompt=2, **kw).images
    out = pipe("a circle", latents=noise, seed=[1, 2], num_images_per_prompt=2, **kw)
    assert max_diff(out.images, ref) <= LATENT_TOL
    assert out.seeds == [None, None] and out.parameters[0].seed is None  # the seed alone does not reproduce it
    # size from the latents when none is given
    assert pipe("a circle", latents=noise[:1], seed=1, output_type="np").images.shape == (1, 64, 64, 3)


@pytest.mark.parity
def test_prompt_2_and_negative_prompt_2_match_diffusers(pipe, reference_pipeline):
    kw = dict(num_inference_steps=2, guidance_scale=2.0, height=64, width=64, output_type="latent")
    ref = reference_pipeline("a red circle", prompt_2="a blue square", negative_prompt="dark",
                             negative_prompt_2="blurry", generator=gen(4), **kw).images
    ours = pipe("a red circle", prompt_2="a blue square", negative_prompt="dark", negative_prompt_2="blurry",
                seed=4, **kw).images
    assert max_diff(ours, ref) <= LATENT_TOL
    plain = pipe("a red circle", negative_prompt="dark", seed=4, **kw).images
    assert max_diff(ours, plain) > 1e-3  # the second encoder really got the other text


@pytest.mark.parity
def test_prompt_embeds_match_diffusers_and_the_prompt(pipe, reference_pipeline):
    context, pooled = pipe.encode_prompt("a green triangle")
    neg_context, neg_pooled = pipe.encode_prompt("grey")
    kw = dict(num_inference_steps=2, guidance_scale=2.0, height=64, width=64, output_type="latent")
    embeds = dict(prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_context,
                  negative_pooled_prompt_embeds=neg_pooled)
    ref = reference_pipeline(generator=gen(6), **embeds, **kw).images
    out = pipe(seed=6, **embeds, **kw)
    assert max_diff(out.images, ref) <= LATENT_TOL
    assert max_diff(out.images, pipe("a green triangle", negative_prompt="grey", seed=6, **kw).images) <= LATENT_TOL
    assert out.parameters[0].prompt == ""
    # a blend of two prompts, the usual reason to pass embeddings
    other, other_pooled = pipe.encode_prompt("a red circle")
    blend = pipe(prompt_embeds=torch.lerp(context, other, 0.5), pooled_prompt_embeds=torch.lerp(pooled, other_pooled,
                 0.5), seed=6, num_inference_steps=1, height=64, width=64, output_type="latent").images
    assert blend.shape == (1, 4, 8, 8)


@pytest.mark.parity
def test_size_conditions_match_diffusers(pipe, reference_pipeline):
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="latent",
              original_size=(1024, 768), crops_coords_top_left=(16, 32), target_size=(512, 512))
    ref = reference_pipeline("a square", guidance_scale=0.0, generator=gen(8), **kw).images
    ours = pipe("a square", seed=8, **kw).images
    assert max_diff(ours, ref) <= LATENT_TOL
    default = pipe("a square", seed=8, num_inference_steps=2, height=64, width=64, output_type="latent").images
    assert max_diff(ours, default) > 1e-4


def test_return_dict_false_returns_a_tuple_as_diffusers(pipe):
    images = pipe("a circle", seed=1, output_type="np", return_dict=False)
    assert isinstance(images, tuple) and len(images) == 1 and images[0].shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "pass prompt, or prompt_embeds with pooled_prompt_embeds"),
        ({"prompt": "x", "prompt_embeds": torch.zeros(1, 77, 96)}, "pass either prompt .* or prompt_embeds"),
        ({"prompt_embeds": torch.zeros(1, 77, 96)}, "prompt_embeds needs pooled_prompt_embeds"),
        ({"prompt_embeds": torch.zeros(1, 77, 5), "pooled_prompt_embeds": torch.zeros(1, 64)}, r"must be \[B, T, "),
        ({"prompt": "x", "prompt_2": ["a", "b"]}, "got 2 texts in prompt_2 for 1 prompts"),
        ({"prompt": "x", "negative_prompt_2": "y", "guidance_scale": 2.0}, "negative_prompt_2 needs negative_prompt"),
        ({"prompt": "x", "latents": torch.zeros(2, 4, 8, 8)}, r"latents must be a \[1, 4, H/8, W/8\] tensor"),
        ({"prompt": "x", "latents": torch.zeros(1, 4, 8, 8), "height": 128}, "height 128 does not match the latents"),
        ({"prompt": "x", "latents": torch.full((1, 4, 8, 8), float("nan"))}, "latents must be a finite"),
        ({"prompt": "x", "original_size": (64,)}, "original_size must be a pair of integers"),
        ({"prompt": "x", "guidance_scale": 2.0, "negative_prompt_embeds": torch.zeros(1, 5, 192),
          "negative_pooled_prompt_embeds": torch.zeros(1, 128)}, r"must have the prompt.s embedding shape \(1, 77, 192\)"),
        ({"prompt": "x", "crops_coords_top_left": (-1, 0)}, "crops_coords_top_left values must be from 0"),
    ],
)
def test_diffusers_arguments_are_checked(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(num_inference_steps=1, **kwargs)


def test_latents_with_an_image_are_refused(pipe, input_image):
    with pytest.raises(ValueError, match="latents are text-to-image's initial noise; with image, leave them out"):
        pipe("x", image=input_image, strength=1.0, latents=torch.zeros(1, 4, 8, 8))


def test_prompt_2_has_its_own_cache_entry(pipe):
    """("a", "b") as two prompts and "a" with prompt_2 "b" must not share a cached encoding."""
    pipe.prompt_cache.clear()
    two = pipe.encode_prompt(["a", "b"])
    one = pipe.encode_prompt(["a"], ["b"])
    assert two[0].shape[0] == 2 and one[0].shape[0] == 1


def test_encode_prompt_returns_tensors_the_caller_may_change(pipe):
    """Prompt weighting edits the embeddings in place: that must not reach the prompt cache."""
    before = pipe("a red circle", seed=1, num_inference_steps=1, output_type="latent").images
    context, pooled = pipe.encode_prompt("a red circle")
    context[:, 1:4] *= 1.5
    pooled.zero_()
    after = pipe("a red circle", seed=1, num_inference_steps=1, output_type="latent").images
    assert torch.equal(before, after)


def test_large_size_conditions_stay_finite_in_fp16(tiny_model_dir):
    half = TurboPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.float16, vae_dtype="fp32")
    out = half("x", seed=1, num_inference_steps=1, original_size=(65520, 64), crops_coords_top_left=(65536, 0),
               output_type="latent").images
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_embeds": np.zeros((1, 77, 192)), "pooled_prompt_embeds": torch.zeros(1, 128)},
         "prompt_embeds must be a torch tensor"),
        ({"prompt": "x", "pooled_prompt_embeds": torch.zeros(1, 128)},
         "pooled_prompt_embeds goes with prompt_embeds, which was not passed"),
        ({"prompt": "x", "negative_pooled_prompt_embeds": torch.zeros(1, 128)},
         "negative_pooled_prompt_embeds goes with negative_prompt_embeds"),
        ({"prompt_embeds": torch.zeros(1, 0, 192), "pooled_prompt_embeds": torch.zeros(1, 128)}, "no token"),
    ],
)
def test_embedding_arguments_are_named_when_wrong(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(num_inference_steps=1, **kwargs)
