"""POST /sdapi/v1/txt2img, the A1111 subset."""

from __future__ import annotations

import json

import httpx
import pytest

from fake_pipeline import expected_image
from serve_helpers import assert_error, decode_b64_png, same_pixels

TXT2IMG = "/sdapi/v1/txt2img"


def test_txt2img_returns_images_parameters_and_info(server):
    body = {"prompt": "a lighthouse", "seed": 100, "steps": 2, "width": 128, "height": 64, "batch_size": 2}
    r = httpx.post(server.url + TXT2IMG, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    for image_b64, seed in zip(out["images"], (100, 101), strict=True):
        image = decode_b64_png(image_b64)
        assert same_pixels(image, expected_image("a lighthouse", seed, 128, 64, steps=2))
        assert "Size: 128x64" in image.text["parameters"]
    info = json.loads(out["info"])
    assert info["all_seeds"] == [100, 101] and info["seed"] == 100
    assert len(info["infotexts"]) == 2 and info["infotexts"][0].startswith("a lighthouse")
    assert out["parameters"]["seed"] == 100 and out["parameters"]["width"] == 128


def test_txt2img_seed_minus_one_is_random_and_cfg_uses_negative(server):
    body = {"prompt": "p", "seed": -1, "width": 64, "height": 64, "cfg_scale": 3.0, "negative_prompt": "n"}
    out = httpx.post(server.url + TXT2IMG, json=body).json()
    seed = json.loads(out["info"])["seed"]
    assert 0 <= seed < 2**32 and out["parameters"]["seed"] == seed
    want = expected_image("p", seed, 64, 64, guidance_scale=3.0, negative_prompt="n")
    assert same_pixels(decode_b64_png(out["images"][0]), want)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"width": 2048}, "width"),  # over this server's 1024
        ({"height": 63}, "height"),
        ({"height": "512"}, "height"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 5}, "batch_size"),
        ({"steps": 20}, "steps"),
        ({"cfg_scale": "7"}, "cfg_scale"),
        ({"cfg_scale": 31}, "cfg_scale"),
        ({"seed": -2}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"prompt": None}, "prompt"),
        ({"sampler_name": "DPM++ 2M"}, "sampler_name"),
    ],
)
def test_txt2img_bad_fields_are_422_naming_the_field(server, body, param):
    assert_error(httpx.post(server.url + TXT2IMG, json={"prompt": "x", **body}), 422, param)


def test_every_unknown_field_is_named(server):
    r = httpx.post(server.url + TXT2IMG, json={"prompt": "x", "sampler_name": "Euler a", "n_iter": 2})
    assert assert_error(r, 422, "sampler_name")["message"] == "sampler_name: unknown field; n_iter: unknown field"


def test_sides_over_the_limit_state_this_server_s_limit(server):
    r = httpx.post(server.url + TXT2IMG, json={"prompt": "x", "width": 4096})
    assert assert_error(r, 422, "width")["message"] == (
        "width: sides must be multiples of 8 from 64 to 1024 px on this server, got 4096"
    )


def test_batch_seeds_wrap_so_each_can_be_asked_for_again(server):
    body = {"prompt": "x", "seed": 2**32 - 1, "batch_size": 2, "width": 64, "height": 64}
    info = json.loads(httpx.post(server.url + TXT2IMG, json=body).json()["info"])
    assert info["all_seeds"] == [2**32 - 1, 0]
