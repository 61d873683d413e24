"""The linear latent -> RGB preview: the published SDXL factors, factors fitted for another VAE, uint8 pixels."""

import numpy as np
import torch

from sdturbo.preview import (
    SDXL_LATENT_RGB_BIAS,
    SDXL_LATENT_RGB_FACTORS,
    latents_to_rgb,
    preview_pixels,
)


def test_each_latent_channel_adds_its_row_of_factors():
    x = torch.zeros(1, 4, 2, 3)
    x[0, 2, 1, 0] = 0.5  # channel 2 at pixel (1, 0)
    rgb = latents_to_rgb(x)
    assert rgb.shape == (1, 3, 2, 3) and rgb.dtype == torch.float32
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS)
    assert torch.allclose(rgb[0, :, 0, 0], bias)
    assert torch.allclose(rgb[0, :, 1, 0], bias + 0.5 * torch.tensor(SDXL_LATENT_RGB_FACTORS[2]))


def test_matches_a_plain_matrix_product_and_clamps():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.bfloat16) * 3
    expected = torch.einsum("bchw,cr->brhw", x.float(), torch.tensor(SDXL_LATENT_RGB_FACTORS))
    expected = (expected + torch.tensor(SDXL_LATENT_RGB_BIAS)[:, None, None]).clamp(-1, 1)
    assert torch.allclose(latents_to_rgb(x), expected, atol=1e-6)


def test_preview_pixels_are_uint8_hwc_at_the_asked_scale():
    x = torch.randn(2, 4, 8, 8)
    pixels = preview_pixels(x, scale=8)
    assert pixels.shape == (2, 64, 64, 3) and pixels.dtype == torch.uint8
    small = preview_pixels(x)
    assert torch.equal(pixels[:, ::8, ::8], small)  # nearest enlargement keeps every latent pixel's colour
    expected = ((latents_to_rgb(x) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(small, expected)


def test_fitted_factors_preview_the_mini_model_where_sdxl_factors_cannot():
    """sdturbo-mini's VAE has its own latent space: the pipeline fits its factors through the encoder."""
    import torch.nn.functional as F

    from sdturbo.pipeline import TurboPipeline

    pipe = TurboPipeline.from_pretrained("mini", device="cpu", dtype=torch.float32)
    colours = ("red", "green", "blue", "white")
    prompts = [f"a {a} circle on a {b} background" for a in colours for b in ("yellow", "black", "purple", "orange")]
    x = pipe(prompts, num_inference_steps=4, seed=1, output_type="latent").images
    pooled = F.avg_pool2d(pipe.decode_latents(x).clamp(-1, 1), pipe._vae_scale)
    previews = torch.stack([torch.from_numpy(np.array(p)) for p in pipe.preview_images(x)]).permute(0, 3, 1, 2)
    fitted_err = (previews.float() / 127.5 - 1 - pooled).abs().mean().item()
    sdxl_err = (latents_to_rgb(x) - pooled).abs().mean().item()
    constant_err = (pooled - pooled.mean((0, 2, 3), keepdim=True)).abs().mean().item()
    assert fitted_err < 0.35 and fitted_err < 0.7 * constant_err and sdxl_err > 2 * fitted_err, (
        fitted_err, sdxl_err, constant_err)


def test_pipelines_with_the_sdxl_vae_use_the_published_factors():
    from sdturbo.models.configs import SDXL_TURBO
    from sdturbo.pipeline import TurboPipeline

    pipe = TurboPipeline.__new__(TurboPipeline)  # no weights needed: the SDXL factors are chosen by config
    pipe.spec, pipe._preview_factors, pipe.vae = SDXL_TURBO, None, None
    x = torch.randn(1, 4, 3, 5)
    image = pipe.preview_images(x)[0]
    expected = preview_pixels(x)[0].numpy()
    assert np.array_equal(np.asarray(image), expected)
