"""The pipeline's answer to inputs it cannot use as given: a one-line error naming the argument, or the right image;
never a torch/PIL traceback nor a silently wrong image. Runs the shipped mini model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdturbo.pipeline import TurboPipeline, rgb_image

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from.*the size this model was trained at")

IMG2IMG = dict(strength=0.5, num_inference_steps=2, seed=3, output_type="latent")  # runs one step, no warning


@pytest.fixture(scope="module")
def pipe() -> TurboPipeline:
    return TurboPipeline.from_pretrained("mini", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def one_line_error(pipe, match: str, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as e:
        pipe("a fox", **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("image, match", [
    (torch.full((1, 3, 64, 64), 200.0), r"values must be in \[0, 1\] \(or \[-1, 1\]\), got \[200, 200\]: divide a "
                                        r"\[0, 255\] tensor by 255"),
    (torch.full((1, 3, 64, 64), -2.0), r"got \[-2, -2\]"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"must be floating point in \[0, 1\], got torch.uint8: pass "
                                                   r"image.float\(\) / 255"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.bool), "got torch.bool"),
    (torch.full((1, 3, 64, 64), float("nan")), "image tensor has NaN or infinite values"),
    (torch.zeros(0, 3, 64, 64), r"must be \[B,3,H,W\] in \[0, 1\], got shape \(0, 3, 64, 64\)"),
    ([], "image must be a PIL image, a non-empty list of them"),
    (Image.fromarray(np.zeros((64, 64), np.float32)), r"mode F\) PIL image of unknown range: convert it to 8-bit RGB"),
])
def test_image_that_would_give_a_wrong_picture_is_refused(pipe, image, match):
    one_line_error(pipe, match, image=image, **IMG2IMG)


def test_tensor_with_values_below_0_is_taken_as_minus_one_to_one_like_diffusers(pipe, rgb):
    unit = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    from_pil = pipe("a fox", image=Image.fromarray(rgb), **IMG2IMG).images
    assert torch.allclose(pipe("a fox", image=unit, **IMG2IMG).images, from_pil, atol=1e-5)
    assert torch.allclose(pipe("a fox", image=unit * 2 - 1, **IMG2IMG).images, from_pil, atol=1e-5)


def test_tensor_resized_to_one_given_side(pipe):
    out = pipe("a fox", image=torch.rand(1, 3, 64, 64), height=72, **IMG2IMG)
    assert out.images.shape == (1, 4, 9, 8) and (out.parameters[0].width, out.parameters[0].height) == (64, 72)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped(mode):
    values = np.random.default_rng(1).integers(0, 65536, (16, 16))
    if mode == "I;16B":
        image = Image.frombytes(mode, (16, 16), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    expected = np.repeat((values / 257).round()[..., None], 3, axis=2)
    assert np.array_equal(np.asarray(rgb_image(image)), expected)


def test_16_bit_png_gives_the_image_of_its_8_bit_copy(pipe, tmp_path):
    values = np.random.default_rng(2).integers(0, 65536, (64, 64)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    eight_bit = Image.fromarray((values / 257).round().astype(np.uint8))
    with Image.open(tmp_path / "g16.png") as sixteen_bit:
        assert torch.equal(pipe("a fox", image=sixteen_bit, **IMG2IMG).images,
                           pipe("a fox", image=eight_bit, **IMG2IMG).images)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image=torch.rand(1, 3, 64, 64), height=72.0), "height must be a multiple of 8 between 8 and 2048, got 72.0"),
    (dict(image=Image.new("RGB", (64, 64)), width=72.0), "width must be a multiple of 8 between 8 and 2048, got 72.0"),
    (dict(generator=5), "generator must be a torch.Generator or a list of one per image, got 5"),
    (dict(generator=[None]), r"generator must be a torch.Generator or a list of one per image, got \[None\]"),
    (dict(callback_on_step_end=lambda *a: []), "callback_on_step_end must return a dict or None, got list"),
    (dict(callback_on_step_end=lambda *a: {"latents": "x"}), "callback_on_step_end returned latents str; return a "
                                                              r"tensor like the step's: \(1, 4, 8, 8\) torch.float32"),
    (dict(callback_on_step_end=lambda *a: {"latents": torch.zeros(1, 4, 4, 4)}),
     r"returned latents \(1, 4, 4, 4\) torch.float32; return a tensor like the step's: \(1, 4, 8, 8\)"),
    (dict(callback_on_step_end=lambda *a: {"latents": torch.zeros(1, 4, 8, 8, dtype=torch.float64)}),
     r"returned latents \(1, 4, 8, 8\) torch.float64"),
    (dict(image=Image.new("RGB", (64, 64)), strength=0.01),
     "^strength 0.01 needs at least 100 steps to run one; the most is 50: use strength >= 0.02$"),
    (dict(strength=0), r"strength must be in \(0, 1\], got 0"),  # checked without an image too
    (dict(strength=1.5), r"strength must be in \(0, 1\], got 1.5"),
    (dict(strength="0.5"), r"strength must be in \(0, 1\], got '0.5'"),
    (dict(guidance_scale=True), "guidance_scale must be a number from 0 to 100, got True"),
    (dict(guidance_scale=1e38), "guidance_scale must be a number from 0 to 100, got 1e[+]38"),
    (dict(num_inference_steps=True), "num_inference_steps must be an integer from 1 to 50, got True"),
])
def test_bad_arguments_get_one_line_errors_naming_them(pipe, kwargs, match):
    one_line_error(pipe, match, **kwargs)


def test_callback_may_return_none_or_other_keys(pipe):
    plain = pipe("a fox", seed=1, output_type="latent").images
    for returned in (None, {}, {"denoised": 0}):
        callback = lambda *a, returned=returned: returned
        assert torch.equal(pipe("a fox", seed=1, output_type="latent", callback_on_step_end=callback).images, plain)


def test_numpy_integers_and_floats_are_taken_as_numbers(pipe):
    plain = pipe("a fox", num_inference_steps=2, seed=[4, 5], num_images_per_prompt=2, height=64, guidance_scale=2.0,
                 output_type="latent")
    numpy = pipe("a fox", num_inference_steps=np.int64(2), seed=[np.int64(4), np.uint32(5)],
                 num_images_per_prompt=np.int32(2), height=np.int64(64), guidance_scale=np.float32(2.0),
                 output_type="latent")
    assert torch.equal(plain.images, numpy.images)
    assert numpy.parameters == plain.parameters and type(numpy.parameters[0].height) is int
    assert torch.equal(pipe("a fox", seed=np.int64(4), output_type="latent").images,
                       pipe("a fox", seed=4, output_type="latent").images)


def test_largest_guidance_scale_still_gives_a_finite_image(pipe):
    assert torch.isfinite(pipe("a fox", guidance_scale=100, seed=0, output_type="pt").images).all()


def test_negative_prompt_without_guidance_warns_once(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe("a fox", negative_prompt=["blurry"], guidance_scale=1.0, seed=0, output_type="latent")
        pipe("a fox", negative_prompt="blurry", guidance_scale=1.5, seed=0, output_type="latent")
    assert [str(w.message) for w in caught] == [
        "negative_prompt is used only with guidance_scale > 1, not 1.0; it is ignored"
    ]


def test_images_sharing_one_generator_carry_their_batch_position(pipe):
    out = pipe("a fox", num_images_per_prompt=3, seed=5, output_type="latent")
    assert [(p.seed, p.batch_size, p.batch_pos) for p in out.parameters] == [(5, 3, 0), (5, 3, 1), (5, 3, 2)]
    assert "Seed: 5, Size: 64x64, Model: sdturbo-mini, Batch size: 3, Batch pos: 1" in out.parameters[1].to_a1111()
    alone = pipe("a fox", seed=5, output_type="latent").images
    assert torch.allclose(alone[0], out.images[0], atol=1e-4) and not torch.allclose(alone[0], out.images[1], atol=0.1)

    one_generator = pipe(["a fox", "a cat"], generator=torch.Generator().manual_seed(5), output_type="latent")
    assert [(p.batch_size, p.batch_pos) for p in one_generator.parameters] == [(2, 0), (2, 1)]


@pytest.mark.parametrize("kwargs", [
    dict(num_images_per_prompt=2, seed=[5, 6]),  # each image has its own seed
    dict(num_images_per_prompt=2, seed=5, schedule="substep"),  # numpy noise from the seed alone, per image
    dict(seed=5),
    dict(generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], num_images_per_prompt=2),
])
def test_images_with_their_own_random_stream_have_no_batch_position(pipe, kwargs):
    out = pipe("a fox", output_type="latent", **kwargs)
    assert all(p.batch_size is None and p.batch_pos is None for p in out.parameters)
    assert "Batch" not in out.parameters[0].to_a1111()
