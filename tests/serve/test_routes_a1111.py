"""The A1111 subset: txt2img, img2img, sd-models, samplers and options."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest
from PIL import Image

from sdturbo.serve.images import fit_image

from fake_pipeline import expected_image
from serve_helpers import assert_error, decode_b64_png, encoded, png_header_only, same_pixels

TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"


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
    r = httpx.post(server.url + TXT2IMG, json={"prompt": "x", "scheduler": "Karras", "hr_scale": 2})
    assert assert_error(r, 422, "scheduler")["message"] == "scheduler: unknown field; hr_scale: unknown field"


def test_clients_may_name_our_sampler_and_ask_for_batches(server):
    """A1111 clients send sampler_name with every request and n_iter for batches: ours is accepted, others not."""
    r = httpx.post(server.url + TXT2IMG, json={"prompt": "x", "seed": 3, "sampler_name": "k_euler_a",
                                                "batch_size": 2, "n_iter": 2})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [3, 4, 5, 6] and len(r.json()["images"]) == 4
    assert (info["batch_size"], info["n_iter"]) == (2, 2) and r.json()["parameters"]["sampler_name"] == "Euler a"
    r = httpx.post(server.url + TXT2IMG, json={"prompt": "x", "sampler_name": "DPM++ 2M Karras"})
    assert "only 'Euler a'" in assert_error(r, 422, "sampler_name")["message"]
    r = httpx.post(server.url + TXT2IMG, json={"prompt": "x", "batch_size": 4, "n_iter": 4})
    assert "batch_size * n_iter: 16 exceeds" in assert_error(r, 422, "batch_size * n_iter")["message"]


def test_sides_over_the_limit_state_this_server_s_limit(server):
    r = httpx.post(server.url + TXT2IMG, json={"prompt": "x", "width": 4096})
    assert assert_error(r, 422, "width")["message"] == (
        "width: sides must be multiples of 8 from 64 to 1024 px on this server, got 4096"
    )


def test_batch_seeds_wrap_so_each_can_be_asked_for_again(server):
    body = {"prompt": "x", "seed": 2**32 - 1, "batch_size": 2, "width": 64, "height": 64}
    info = json.loads(httpx.post(server.url + TXT2IMG, json=body).json()["info"])
    assert info["all_seeds"] == [2**32 - 1, 0]


# -- img2img ----------------------------------------------------------------------------------------------------


def source_image(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    image.paste((30, 30, 200), (8, 8, 40, 40))
    return image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post(server, path, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
def test_img2img_makes_what_the_engine_makes_for_the_same_job(server, prefix):
    source = source_image()
    body = {
        "init_images": [prefix + b64(encoded(source))],
        "denoising_strength": 0.6,
        "prompt": "a watercolor",
        "seed": 3,
        "steps": 2,
        "width": 64,
        "height": 64,
        "batch_size": 2,
    }
    r = post(server, IMG2IMG, body)
    assert r.status_code == 200, r.text
    out = r.json()
    for image_b64, seed in zip(out["images"], (3, 4), strict=True):
        want = expected_image("a watercolor", seed, 64, 64, steps=2, image=source, strength=0.6)
        assert same_pixels(decode_b64_png(image_b64), want)
    info = json.loads(out["info"])
    assert info["all_seeds"] == [3, 4] and info["denoising_strength"] == 0.6
    assert "Denoising strength: 0.6" in info["infotexts"][0]
    assert "init_images" not in out["parameters"] and out["parameters"]["denoising_strength"] == 0.6


def test_img2img_defaults_to_a1111_s_strength_and_a_random_seed(server):
    source = source_image()
    out = post(server, IMG2IMG, {"init_images": [b64(encoded(source))], "prompt": "p"}).json()
    seed = json.loads(out["info"])["seed"]
    want = expected_image("p", seed, 64, 64, image=source, strength=0.75)
    assert same_pixels(decode_b64_png(out["images"][0]), want)


@pytest.mark.parametrize(
    "source_size, sides, size",
    [
        ((128, 64), {}, (128, 64)),  # the source's own size
        ((512, 300), {}, (256, 152)),  # scaled down to this server's 256 px, rounded to multiples of 8
        ((128, 64), {"width": 256}, (256, 128)),  # the other side keeps the source's aspect
        ((128, 64), {"height": 128}, (256, 128)),
        ((30, 500), {"width": 64}, (64, 256)),  # ... within this server's limits
        ((128, 64), {"width": 64, "height": 64}, (64, 64)),  # both given: scaled and centre-cropped, as edits does
    ],
)
def test_img2img_sides_left_out_follow_the_source_image(start_server, source_size, sides, size):
    s = start_server(max_side_px=256)
    source = source_image(source_size)
    r = post(s, IMG2IMG, {"init_images": [b64(encoded(source))], "prompt": "p", "seed": 1, **sides})
    assert r.status_code == 200, r.text
    want = expected_image("p", 1, *size, image=fit_image(source, *size), strength=0.75)
    assert same_pixels(decode_b64_png(r.json()["images"][0]), want)


def gif_b64() -> str:
    return b64(encoded(Image.new("P", (8, 8)), "GIF"))


PNG_B64 = b64(encoded(source_image()))


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({}, 422, "init_images"),
        ({"init_images": []}, 422, "init_images"),
        ({"init_images": [PNG_B64, PNG_B64]}, 422, "init_images"),
        ({"init_images": PNG_B64}, 422, "init_images"),  # a string, not a list of one
        ({"init_images": [5]}, 422, "init_images.0"),
        ({"init_images": ["not base64!"]}, 422, "init_images"),
        ({"init_images": [b64(b"hello, not an image")]}, 415, "init_images"),
        ({"init_images": [gif_b64()]}, 415, "init_images"),
        ({"init_images": [b64(png_header_only(30000, 30000))]}, 413, "init_images"),
        ({"init_images": [b64(encoded(source_image())[:-40])]}, 422, "init_images"),
        ({"init_images": [PNG_B64], "denoising_strength": 0}, 422, "denoising_strength"),
        ({"init_images": [PNG_B64], "denoising_strength": 1.5}, 422, "denoising_strength"),
        ({"init_images": [PNG_B64], "denoising_strength": "0.5"}, 422, "denoising_strength"),
        ({"init_images": [PNG_B64], "width": 2048}, 422, "width"),
        ({"init_images": [PNG_B64], "height": "64"}, 422, "height"),
        ({"init_images": [PNG_B64], "steps": 20}, 422, "steps"),
        ({"init_images": [PNG_B64], "batch_size": 5}, 422, "batch_size"),
        ({"init_images": [PNG_B64], "seed": -2}, 422, "seed"),
        ({"init_images": [PNG_B64], "sampler_name": "DDIM"}, 422, "sampler_name"),  # as txt2img refuses it
        ({"init_images": [PNG_B64], "mask": PNG_B64}, 422, "mask"),
    ],
)
def test_img2img_bad_input_is_4xx_naming_the_field(server, body, status, param):
    assert_error(post(server, IMG2IMG, {"prompt": "x", **body}), status, param)


@pytest.mark.parametrize("images, count", [([], 0), ([PNG_B64, PNG_B64], 2)])
def test_img2img_wants_exactly_one_image(server, images, count):
    r = post(server, IMG2IMG, {"init_images": images})
    assert assert_error(r, 422, "init_images")["message"] == f"init_images: must hold exactly one image, got {count}"


@pytest.mark.parametrize("side, param", [(100, "init_images"), (400, "body")])
def test_img2img_upload_over_the_byte_limit_is_413(start_server, side, param):
    """As for /v1/images/edits: just over the upload limit the decoder refuses it; far over, the body limit does."""
    small = start_server(max_upload_bytes=20_000)
    data = encoded(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))
    assert 20_000 < len(data)
    assert_error(post(small, IMG2IMG, {"init_images": [b64(data)]}), 413, param)


def test_img2img_upload_over_the_pixel_limit_is_413(start_server):
    small = start_server(max_upload_pixels=64 * 64)
    r = post(small, IMG2IMG, {"init_images": [b64(encoded(source_image((65, 64))))]})
    assert "over the limit of 4096" in assert_error(r, 413, "init_images")["message"]


# -- sd-models, samplers, options -------------------------------------------------------------------------------


def test_sd_models_lists_the_loaded_model(server):
    r = httpx.get(server.url + "/sdapi/v1/sd-models")
    assert r.status_code == 200, r.text
    assert r.json() == [
        {
            "title": "fake",
            "model_name": "fake",
            "hash": None,
            "sha256": None,
            "filename": "stabilityai/sdxl-turbo",
            "config": None,
        }
    ]


def test_samplers_lists_euler_a(server):
    assert httpx.get(server.url + "/sdapi/v1/samplers").json() == [
        {"name": "Euler a", "aliases": ["k_euler_a"], "options": {}}
    ]


def test_options_name_the_loaded_model_and_selecting_it_succeeds(server):
    assert httpx.get(server.url + "/sdapi/v1/options").json() == {"sd_model_checkpoint": "fake"}
    r = post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "fake"})
    assert r.status_code == 200 and r.json() is None
    r = post(server, "/sdapi/v1/options", {})  # A1111 accepts an empty update
    assert r.status_code == 200 and r.json() is None


def test_options_cannot_switch_the_model(server):
    r = post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"})
    message = assert_error(r, 422, "sd_model_checkpoint")["message"]
    assert "serves only 'fake'" in message and "only the operator chooses the model (sdturbo serve --model)" in message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"sd_model_checkpoint": 5}, "sd_model_checkpoint"),
        ({"CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last_layers"),
    ],
)
def test_options_bad_bodies_are_422_naming_the_field(server, body, param):
    assert_error(post(server, "/sdapi/v1/options", body), 422, param)


def test_options_unknown_keys_are_refused_by_name(server):
    r = post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "fake", "sd_vae": "auto"})
    assert assert_error(r, 422, "sd_vae")["message"] == "sd_vae: unknown field"
