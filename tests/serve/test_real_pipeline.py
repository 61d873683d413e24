"""End to end with the real TurboPipeline: the bundled sdturbo-mini model, and the tiny random-weights model
(tests/conftest.py: tiny_model_dir)."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pytest
import websockets.sync.client as ws_client
from PIL import Image

from serve_helpers import decode_b64_png, encoded, pixels, running_server

SIDE = 64
MAX_LEVEL_DIFF = 2  # batched vs alone: the same math in a different batch shape, after uint8 rounding
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["mini", "tiny"])
def tiny_pipeline(request, tiny_model_dir):
    import torch

    from sdturbo.pipeline import TurboPipeline

    model = "mini" if request.param == "mini" else tiny_model_dir
    return TurboPipeline.from_pretrained(model, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def real_server(tiny_pipeline):
    with running_server(tiny_pipeline, default_side_px=SIDE) as s:
        yield s


def generate(server, prompt: str, seed: int, n: int = 1) -> list[Image.Image]:
    body = {"prompt": prompt, "seed": seed, "n": n, "size": f"{SIDE}x{SIDE}"}
    r = httpx.post(server.url + "/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [decode_b64_png(d["b64_json"]) for d in r.json()["data"]]


def test_generations_with_the_real_pipeline(real_server):
    first, second = generate(real_server, "a tiny test", seed=7, n=2)
    assert first.size == (SIDE, SIDE)
    assert "Seed: 7" in first.text["parameters"] and "Seed: 8" in second.text["parameters"]
    assert not np.array_equal(pixels(first), pixels(second))  # different seeds, different images


def batches_and_images(server) -> tuple[float, float]:
    samples = {s.name: s.value for s in server.engine.metrics.batch_images.collect()[0].samples}
    return samples["sdturbo_batch_images_count"], samples["sdturbo_batch_images_sum"]


def test_a_request_gives_the_same_images_alone_and_batched(real_server):
    prompts = [f"prompt number {i}" for i in range(3)]

    async def concurrently():
        async with httpx.AsyncClient(base_url=real_server.url, timeout=120) as http:
            bodies = [{"prompt": p, "seed": 100 + i, "size": f"{SIDE}x{SIDE}"} for i, p in enumerate(prompts)]
            return await asyncio.gather(*(http.post("/v1/images/generations", json=b) for b in bodies))

    calls_before, images_before = batches_and_images(real_server)
    batched = [decode_b64_png(r.json()["data"][0]["b64_json"]) for r in asyncio.run(concurrently())]
    calls, images = batches_and_images(real_server)
    assert images - images_before == 3 and calls - calls_before < 3, "no two requests shared a pipeline call"
    for i, p in enumerate(prompts):
        alone = generate(real_server, p, seed=100 + i)[0]
        diff = np.abs(pixels(alone).astype(int) - pixels(batched[i]).astype(int)).max()
        assert diff <= MAX_LEVEL_DIFF, f"{p}: differs by {diff} levels alone vs batched"
    assert not np.array_equal(pixels(batched[0]), pixels(batched[1]))


def test_img2img_edit_with_the_real_pipeline(real_server):
    source = Image.new("RGB", (SIDE * 2, SIDE), (30, 90, 200))
    files = {"image": ("s.png", encoded(source), "image/png")}
    data = {"prompt": "blue", "seed": "3", "strength": "0.5", "steps": "2", "size": f"{SIDE}x{SIDE}"}
    r = httpx.post(real_server.url + "/v1/images/edits", files=files, data=data, timeout=120)
    assert r.status_code == 200, r.text
    image = decode_b64_png(r.json()["data"][0]["b64_json"])
    assert image.size == (SIDE, SIDE) and "Denoising strength: 0.5" in image.text["parameters"]


def test_websocket_with_the_real_pipeline(real_server):
    with ws_client.connect(real_server.ws_url) as ws:
        json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"id": 1, "prompt": "socket", "seed": 5, "width": SIDE, "height": SIDE, "format": "png"}))
        meta = json.loads(ws.recv(timeout=120))
        image = Image.open(io.BytesIO(ws.recv(timeout=10)))
    assert meta["type"] == "image" and image.size == (SIDE, SIDE)
    assert image.text["parameters"] == meta["parameters"]
