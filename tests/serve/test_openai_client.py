"""The official openai Python client talks to the server as documented in docs/serve.md."""

from __future__ import annotations

import pytest
from PIL import Image

from fake_pipeline import FakePipeline, expected_image
from serve_helpers import decode_b64_png, encoded, running_server, same_pixels

openai = pytest.importorskip("openai")
KEY = "sk-local-test-key"


@pytest.fixture(scope="module")
def client():
    with running_server(FakePipeline(), api_key=KEY, default_side_px=64) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)


def test_generate_with_seed_and_steps_in_extra_body(client):
    r = client.images.generate(
        model="sdxl-turbo",
        prompt="a fox",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 3, "steps": 2},
    )
    assert [d.model_extra["seed"] for d in r.data] == [3, 4]
    assert same_pixels(decode_b64_png(r.data[1].b64_json), expected_image("a fox", 4, 64, 64, steps=2))


def test_models_lists_the_loaded_model(client):
    """Tools built on the client list the models first; the one served is the pipeline's name."""
    assert [m.id for m in client.models.list()] == [FakePipeline().name]


def test_edit(client):
    source = Image.new("RGB", (64, 64), "orange")
    r = client.images.edit(
        image=("in.png", encoded(source), "image/png"),
        prompt="a pumpkin",
        size="64x64",
        extra_body={"strength": 0.6, "seed": 1},
    )
    want = expected_image("a pumpkin", 1, 64, 64, steps=2, image=source, strength=0.6)
    assert same_pixels(decode_b64_png(r.data[0].b64_json), want)


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.UnprocessableEntityError, match="n: 9 exceeds"):
        client.images.generate(prompt="a", n=9)
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong-key-123", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a")
