"""POST /v1/images/generations and /v1/images/edits against a real server with the fake pipeline."""

from __future__ import annotations

import io
import os

import httpx
import pytest
from PIL import Image

from fake_pipeline import expected_image
from serve_helpers import (
    assert_error,
    decode_b64_png,
    encoded,
    png_header_only,
    same_pixels,
)

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


def post(server, path, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kw)


def test_generations_returns_each_image_with_its_seed(server):
    r = post(server, GENERATIONS, json={"prompt": "a red fox", "n": 3, "size": "64x128", "seed": 5, "steps": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int)
    assert [d["seed"] for d in body["data"]] == [5, 6, 7]
    for d in body["data"]:
        image = decode_b64_png(d["b64_json"])
        assert same_pixels(image, expected_image("a red fox", d["seed"], 64, 128, steps=2))
        assert f"Seed: {d['seed']}" in image.text["parameters"]
        assert d["revised_prompt"] == "a red fox"
    assert "inference;dur=" in r.headers["server-timing"]


def test_generations_defaults_random_seed_and_server_size(server):
    r = post(server, GENERATIONS, json={"prompt": "x", "n": 2, "model": "dall-e-2", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    seeds = [d["seed"] for d in r.json()["data"]]
    assert seeds[1] == seeds[0] + 1
    assert decode_b64_png(r.json()["data"][0]["b64_json"]).size == (512, 512)


def test_generations_guidance_uses_negative_prompt(server):
    body = {"prompt": "x", "size": "64x64", "seed": 1, "guidance_scale": 2.0, "negative_prompt": "blur"}
    image = decode_b64_png(post(server, GENERATIONS, json=body).json()["data"][0]["b64_json"])
    assert same_pixels(image, expected_image("x", 1, 64, 64, guidance_scale=2.0, negative_prompt="blur"))


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": "x", "n": 5}, "n"),  # the server's own limit (4)
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "size": "65x64"}, "size"),
        ({"prompt": "x", "size": "512"}, "size"),
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "size": "1032x512"}, "size"),  # over the server's 1024
        ({"prompt": "x", "size": 512}, "size"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 5}, "steps"),
        ({"prompt": "x", "steps": 1.5}, "steps"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**32}, "seed"),
        ({"prompt": "x", "seed": "7"}, "seed"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": "x", "response_format": "url"}, "response_format"),
        ({"prompt": "x", "quality": "hd"}, "quality"),
        ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt"),
    ],
)
def test_generations_bad_fields_are_422_naming_the_field(server, body, param):
    assert_error(post(server, GENERATIONS, json=body), 422, param)


def test_max_batch_also_bounds_n(start_server):
    small = start_server(max_batch=2)
    assert_error(post(small, GENERATIONS, json={"prompt": "x", "n": 3, "size": "64x64"}), 422, "n")
    assert post(small, GENERATIONS, json={"prompt": "x", "n": 2, "size": "64x64"}).status_code == 200


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"{bad json", "Expecting property name"),
        (b'{"prompt": "x",}', "Expecting property name"),
        (b'{"prompt": "\xff"}', "it is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "it is nested too deeply"),
    ],
)
def test_generations_malformed_json_is_400_saying_why(server, content, reason):
    r = post(server, GENERATIONS, content=content, headers={"content-type": "application/json"})
    assert assert_error(r, 400, "body")["message"].startswith("request body is not valid JSON: " + reason)


@pytest.mark.parametrize(
    "kw",
    [
        {"content": b"[1, 2]", "headers": {"content-type": "application/json"}},
        {"content": b"null", "headers": {"content-type": "application/json"}},
        {"content": b"", "headers": {"content-type": "application/json"}},
        {"data": {"prompt": "x"}},  # curl -d prompt=x
        {"content": b'{"prompt": "x"}', "headers": {"content-type": "application/x-www-form-urlencoded"}},  # curl -d
    ],
)
def test_generations_body_that_is_not_a_json_object_is_400(server, kw):
    message = assert_error(post(server, GENERATIONS, **kw), 400, "body")["message"]
    assert message.startswith("request body must be a JSON object") and "Content-Type: application/json" in message


def test_size_errors_state_this_server_s_limits(start_server):
    s = start_server(max_side_px=512)
    for size in ("7x7", "4096x64", "520x512", "100x64"):
        r = post(s, GENERATIONS, json={"prompt": "x", "size": size})
        assert "multiples of 8 from 64 to 512 px on this server" in assert_error(r, 422, "size")["message"]


def test_every_returned_seed_can_be_asked_for_again(server):
    r = post(server, GENERATIONS, json={"prompt": "x", "size": "64x64", "seed": 2**32 - 1, "n": 2})
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [2**32 - 1, 0]  # image i gets seed + i, wrapping past 2**32 - 1
    again = post(server, GENERATIONS, json={"prompt": "x", "size": "64x64", "seed": data[1]["seed"]}).json()["data"]
    assert again[0]["b64_json"] == data[1]["b64_json"]


def test_generations_wrong_content_type_is_refused(server):
    r = post(server, GENERATIONS, content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code in (400, 415, 422) and "error" in r.json()


# -- edits ------------------------------------------------------------------------------------------------------


def source_image(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    image.paste((200, 30, 30), (8, 8, 40, 40))
    return image


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_edits_runs_img2img_on_the_upload(server, fmt):
    data = encoded(source_image(), fmt) if fmt != "WEBP" else _lossless_webp(source_image())
    files = {"image": (f"in.{fmt.lower()}", data, f"image/{fmt.lower()}")}
    fields = {"prompt": "oil painting", "size": "64x64", "seed": "3", "strength": "0.75", "steps": "2", "n": "2"}
    r = post(server, EDITS, files=files, data=fields)
    assert r.status_code == 200, r.text
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    for d, seed in zip(r.json()["data"], (3, 4), strict=True):
        want = expected_image("oil painting", seed, 64, 64, steps=2, image=decoded, strength=0.75)
        assert d["seed"] == seed and same_pixels(decode_b64_png(d["b64_json"]), want)


def _lossless_webp(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_edits_crops_to_the_requested_aspect(server):
    files = {"image": ("in.png", encoded(source_image((128, 64))), "image/png")}
    r = post(server, EDITS, files=files, data={"prompt": "x", "size": "64x64", "seed": "1"})
    assert r.status_code == 200, r.text
    assert decode_b64_png(r.json()["data"][0]["b64_json"]).size == (64, 64)


def gif_bytes() -> bytes:
    return encoded(Image.new("P", (8, 8)), "GIF")


@pytest.mark.parametrize(
    "files, fields, status, param",
    [
        ({"image": ("a.txt", b"hello, not an image", "text/plain")}, {"prompt": "x"}, 415, "image"),
        ({"image": ("a.gif", gif_bytes(), "image/gif")}, {"prompt": "x"}, 415, "image"),
        ({"image": ("bomb.png", png_header_only(30000, 30000), "image/png")}, {"prompt": "x"}, 413, "image"),
        ({"image": ("cut.png", encoded(source_image())[:-40], "image/png")}, {"prompt": "x"}, 422, "image"),
        ({}, {"prompt": "x"}, 422, "image"),
        ({"image": ("a.png", encoded(source_image()), "image/png")}, {}, 422, "prompt"),
        ({"image": ("a.png", encoded(source_image()), "image/png")}, {"prompt": "x", "strength": "0"}, 422, "strength"),
        (
            {"image": ("a.png", encoded(source_image()), "image/png")},
            {"prompt": "x", "strength": "1.5"},
            422,
            "strength",
        ),
        (
            {"image": ("a.png", encoded(source_image()), "image/png")},
            {"prompt": "x", "strength": "lots"},
            422,
            "strength",
        ),
        ({"image": ("a.png", encoded(source_image()), "image/png")}, {"prompt": "x", "n": "0"}, 422, "n"),
        ({"image": ("a.png", encoded(source_image()), "image/png")}, {"prompt": "x", "steps": "9"}, 422, "steps"),
        ({"image": ("a.png", encoded(source_image()), "image/png")}, {"prompt": "x", "size": "9x9"}, 422, "size"),
        ({"image": ("a.png", encoded(source_image()), "image/png")}, {"prompt": "x", "mask": "m"}, 422, "mask"),
    ],
)
def test_edits_bad_input_is_4xx_naming_the_field(server, files, fields, status, param):
    assert_error(post(server, EDITS, files=files, data=fields), status, param)


def test_edits_image_as_a_text_field_is_422(server):
    error = assert_error(post(server, EDITS, data={"prompt": "x", "image": "not a file"}), 422, "image")
    assert error["message"].startswith("image: must be an uploaded file (multipart")
    assert "got a text field" in error["message"]


@pytest.mark.parametrize(
    "content, content_type",
    [
        (b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx', "multipart/form-data; boundary=xyz"),
        (b"garbage", "multipart/form-data"),
        (b'{"prompt": "x"}', "application/json"),
    ],
)
def test_edits_malformed_multipart_is_4xx(server, content, content_type):
    r = post(server, EDITS, content=content, headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("side, param", [(100, "image"), (400, "body")])
def test_edits_upload_over_the_byte_limit_is_413(start_server, side, param):
    """Just over the upload limit: the decoder refuses it; far over: the body limit does, before parsing."""
    small = start_server(max_upload_bytes=20_000)
    data = encoded(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))
    assert 20_000 < len(data)
    r = post(small, EDITS, files={"image": ("big.png", data, "image/png")}, data={"prompt": "x"})
    assert_error(r, 413, param)
