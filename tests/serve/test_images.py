"""Upload decoding: only PNG/JPEG/WEBP, bounded in bytes and pixels before decoding, corrupt data is the client's."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from sdturbo.serve.errors import ApiError
from sdturbo.serve.images import (
    decode_base64_image,
    decode_image,
    encode_image,
    fit_image,
)

from serve_helpers import encoded, png_header_only

MB = 2**20


def status_of(fn, *args) -> int:
    with pytest.raises(ApiError) as err:
        fn(*args)
    assert err.value.param == "image"
    return err.value.status_code


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    image = decode_image(encoded(Image.new("L", (32, 16), 128), fmt), MB, 10**6, "image")
    assert image.mode == "RGB" and image.size == (32, 16)


def test_transparency_becomes_white():
    image = decode_image(encoded(Image.new("RGBA", (8, 8), (0, 0, 0, 0))), MB, 10**6, "image")
    assert image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "data, max_bytes, max_pixels, status",
    [
        (encoded(Image.new("RGB", (8, 8)), "GIF"), MB, 10**6, 415),
        (encoded(Image.new("RGB", (8, 8)), "BMP"), MB, 10**6, 415),
        (b"%PDF-1.4 not an image", MB, 10**6, 415),
        (b"", MB, 10**6, 415),
        (png_header_only(100_000, 100_000), MB, 10**6, 413),  # bomb: refused from its header
        (encoded(Image.new("RGB", (100, 100))), MB, 9_999, 413),
        (encoded(Image.new("RGB", (100, 100))), 100, 10**6, 413),
        (encoded(Image.new("RGB", (64, 64)))[:60], MB, 10**6, 422),
        (png_header_only(64, 64), MB, 10**6, 422),  # a valid header over nonsense pixel data
    ],
)
def test_refused_uploads(data, max_bytes, max_pixels, status):
    assert status_of(decode_image, data, max_bytes, max_pixels, "image") == status


def test_base64_and_data_urls():
    raw = base64.b64encode(encoded(Image.new("RGB", (8, 8), "red"))).decode()
    for text in (raw, "data:image/png;base64," + raw):
        assert decode_base64_image(text, MB, 10**6, "image").getpixel((0, 0)) == (255, 0, 0)
    assert status_of(decode_base64_image, "not base64!", MB, 10**6, "image") == 422
    assert status_of(decode_base64_image, "A" * 2000, 1000, 10**6, "image") == 413


def test_fit_crops_to_the_aspect_instead_of_stretching():
    image = Image.new("RGB", (200, 100), "blue")
    image.paste((255, 0, 0), (0, 0, 40, 100))  # a red band that a centre crop to a square removes
    fitted = fit_image(image, 64, 64)
    assert fitted.size == (64, 64) and fitted.getpixel((0, 32)) == (0, 0, 255)


def test_png_output_carries_parameters_and_jpeg_is_small():
    from sdturbo.output import GenerationParameters

    params = GenerationParameters("p", None, 1, 0.0, 5, 64, 64, "m")
    png = encode_image(Image.new("RGB", (64, 64)), "png", params)
    assert b"parameters" in png and b"Seed: 5" in png
    assert encode_image(Image.new("RGB", (64, 64)), "jpeg", params)[:2] == b"\xff\xd8"
