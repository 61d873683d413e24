"""The linear latent -> RGB preview: the published SDXL factors applied per latent pixel, then uint8 pixels."""

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
