"""Load and overload on a real server: 32 concurrent clients x 8 requests lose nothing and never receive another
request's images; a small queue answers 429 with Retry-After and then recovers."""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import AsyncExitStack

import httpx
import numpy as np
import pytest

from fake_pipeline import FakePipeline, expected_image
from serve_helpers import decode_b64_png, same_pixels

CLIENTS, REQUESTS_EACH = 32, 8
pytestmark = pytest.mark.slow


def make_request(rng: random.Random, client: int, i: int) -> tuple[str, dict]:
    """A mix of endpoints and of the arguments that decide batching (size, steps)."""
    prompt, seed = f"client {client} request {i}", rng.randrange(2**32 - 8)
    n, steps, (w, h) = rng.choice([1, 1, 2]), rng.choice([1, 2]), rng.choice([(64, 64), (128, 64)])
    if rng.random() < 0.5:
        return "/v1/images/generations", {"prompt": prompt, "seed": seed, "n": n, "steps": steps, "size": f"{w}x{h}"}
    return "/sdapi/v1/txt2img", {
        "prompt": prompt,
        "seed": seed,
        "batch_size": n,
        "steps": steps,
        "width": w,
        "height": h,
    }


def images_of(path: str, body: dict) -> list:
    if path.startswith("/v1"):
        return [decode_b64_png(d["b64_json"]) for d in body["data"]]
    return [decode_b64_png(b) for b in body["images"]]


def expected_images(path: str, body: dict) -> list:
    n = body.get("n", body.get("batch_size"))
    w, h = (map(int, body["size"].split("x"))) if "size" in body else (body["width"], body["height"])
    return [expected_image(body["prompt"], body["seed"] + i, w, h, steps=body["steps"]) for i in range(n)]


async def run_clients(url: str, requests: list[list[tuple[str, dict]]]) -> tuple[list[tuple], float]:
    """-> ((path, body, status, answer, latency_s) per request, wall seconds). One connection pool per client."""

    async def client(http, mine):
        out = []
        for path, body in mine:
            t0 = time.perf_counter()
            r = await http.post(path, json=body)
            out.append((path, body, r.status_code, r.json(), time.perf_counter() - t0))
        return out

    async with AsyncExitStack() as stack:
        # Made before the clock starts: each client builds an SSL context, ~50 ms of CPU that is no server latency.
        https = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60)) for _ in requests]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client(http, mine) for http, mine in zip(https, requests, strict=True)))
        wall_s = time.perf_counter() - t0
    return [r for mine in results for r in mine], wall_s


def test_concurrent_clients_get_exactly_their_own_images(start_server, capsys):
    server = start_server(FakePipeline(delay_s=0.01, per_image_s=0.002), max_batch=8, max_queue=64)
    rng = random.Random(0)
    requests = [[make_request(rng, c, i) for i in range(REQUESTS_EACH)] for c in range(CLIENTS)]
    results, wall_s = asyncio.run(run_clients(server.url, requests))

    assert len(results) == CLIENTS * REQUESTS_EACH
    for path, body, status, answer, _ in results:
        assert status == 200, answer
        got = images_of(path, answer)
        assert len(got) == len(expected_images(path, body))
        assert all(same_pixels(a, b) for a, b in zip(got, expected_images(path, body), strict=True)), body["prompt"]
    sizes = server.pipeline.batch_sizes
    assert max(sizes) > 1, "no request was batched"
    assert sum(sizes) == sum(len(expected_images(p, b)) for p, b, *_ in results)

    # The same requests, each alone on an idle server, give the same images.
    for path, body, _, answer, _ in results[::16]:
        alone = httpx.post(server.url + path, json=body, timeout=30)
        assert all(
            same_pixels(a, b) for a, b in zip(images_of(path, alone.json()), images_of(path, answer), strict=True)
        )

    latencies_ms = np.array([r[-1] for r in results]) * 1000
    with capsys.disabled():
        print(
            f"\n[serve load] {CLIENTS} clients x {REQUESTS_EACH} requests in {wall_s:.2f} s: "
            f"p50 {np.percentile(latencies_ms, 50):.1f} ms, p99 {np.percentile(latencies_ms, 99):.1f} ms, "
            f"{len(sizes)} pipeline calls, mean batch {np.mean(sizes):.2f} images, max {max(sizes)}"
        )


def test_overload_answers_429_with_retry_after_then_recovers(start_server):
    server = start_server(FakePipeline(delay_s=0.2), max_batch=1, max_queue=2)
    body = {"prompt": "busy", "size": "64x64"}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            return await asyncio.gather(*(http.post("/v1/images/generations", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) == {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
    assert httpx.post(server.url + "/v1/images/generations", json=body, timeout=30).status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'sdturbo_requests_total{endpoint="/v1/images/generations",status="429"}' in metrics
