"""WebSocket /ws: results as JSON + binary frame, newest-request-wins, errors, downloads, disconnect cancels."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import websockets.sync.client as ws_client
from PIL import Image

from fake_pipeline import FakePipeline, expected_image
from serve_helpers import encoded, same_pixels


def connect(server):
    ws = ws_client.connect(server.ws_url, max_size=2**24)
    hello = json.loads(ws.recv(timeout=10))
    assert hello["type"] == "hello" and hello["limits"]["max_steps"] == server.settings.max_steps
    return ws


def send(ws, **message):
    ws.send(json.dumps(message))


def receive(ws) -> tuple[dict, bytes | None]:
    """The next message, and the binary frame that follows it for results."""
    meta = json.loads(ws.recv(timeout=20))
    data = ws.recv(timeout=20) if meta["type"] in ("image", "download", "preview") else None
    return meta, data


def generate(**kw) -> dict:
    return {"type": "generate", "prompt": "a boat", "width": 64, "height": 64, **kw}


def test_png_result_matches_the_request_and_carries_parameters(server):
    with connect(server) as ws:
        send(ws, **generate(id=1, seed=9, steps=3, format="png"))
        meta, data = receive(ws)
    assert meta["type"] == "image" and meta["id"] == 1 and meta["seed"] == 9 and meta["format"] == "png"
    assert meta["latency_ms"] >= meta["inference_ms"] >= 0 and meta["batch_images"] == 1
    image = Image.open(io.BytesIO(data))
    assert same_pixels(image, expected_image("a boat", 9, 64, 64, steps=3))
    assert image.text["parameters"] == meta["parameters"] and "Seed: 9" in meta["parameters"]


def test_previews_after_every_step_then_the_image(server):
    with connect(server) as ws:
        send(ws, **generate(id=7, seed=2, steps=3, preview=True))
        messages = [receive(ws) for _ in range(4)]
        send(ws, **generate(id=8, seed=2))  # without "preview": the image alone
        assert receive(ws)[0]["type"] == "image"
    expected = expected_image("a boat", 2, 64, 64, steps=3)
    for step, (meta, data) in enumerate(messages[:3]):
        assert meta == {"type": "preview", "id": 7, "step": step, "width": 8, "height": 8, "format": "jpeg",
                        "bytes": len(data)}
        preview = Image.open(io.BytesIO(data))
        assert preview.size == (8, 8)
        want = np.asarray(expected.resize((8, 8), Image.NEAREST), dtype=int)
        assert np.abs(np.asarray(preview.convert("RGB"), dtype=int) - want).mean() < 25  # JPEG of 4x4 random tiles
    assert messages[3][0]["type"] == "image" and messages[3][0]["id"] == 7


def test_jpeg_by_default_and_download_gives_the_png(server):
    with connect(server) as ws:
        send(ws, **generate(id="a", seed=4))
        meta, data = receive(ws)
        assert meta["format"] == "jpeg" and Image.open(io.BytesIO(data)).format == "JPEG"
        send(ws, type="download", id="a")
        meta, data = receive(ws)
        assert meta == {"type": "download", "id": "a", "format": "png", "seed": 4}
        assert same_pixels(Image.open(io.BytesIO(data)), expected_image("a boat", 4, 64, 64))
        send(ws, type="download", id="never")
        meta, _ = receive(ws)
        assert meta["type"] == "error" and meta["error"]["code"] == 404 and meta["error"]["param"] == "id"


def test_img2img_from_a_data_url(server):
    source = Image.new("RGB", (64, 64), (10, 120, 40))
    url = "data:image/png;base64," + base64.b64encode(encoded(source)).decode()
    with connect(server) as ws:
        send(ws, **generate(id=2, seed=1, image=url, strength=0.8, steps=2, format="png"))
        meta, data = receive(ws)
    assert meta["strength"] == 0.8
    want = expected_image("a boat", 1, 64, 64, steps=2, image=source, strength=0.8)
    assert same_pixels(Image.open(io.BytesIO(data)), want)


def test_newest_request_wins_and_stale_ones_are_dropped(start_server):
    server = start_server(FakePipeline(delay_s=0.4))
    with connect(server) as ws:
        for i in range(1, 5):  # 1 starts at once; 2 and 3 are replaced while it runs; 4 runs next
            send(ws, **generate(id=i, prompt=f"p{i}"))
            time.sleep(0.05)
        messages = [receive(ws)[0] for _ in range(4)]
    assert sorted((m["type"], m["id"]) for m in messages) == [
        ("dropped", 2),
        ("dropped", 3),
        ("image", 1),
        ("image", 4),
    ]
    assert server.pipeline.calls == [["p1"], ["p4"]]


def test_a_queued_request_is_replaced_before_it_starts(start_server):
    server = start_server(FakePipeline(delay_s=0.4), max_batch=1)
    with connect(server) as busy, connect(server) as ws:
        send(busy, **generate(id=0, prompt="other client"))  # occupies the model
        time.sleep(0.1)
        send(ws, **generate(id=1, prompt="queued"))
        time.sleep(0.05)
        send(ws, **generate(id=2, prompt="newest"))
        messages = [receive(ws)[0] for _ in range(2)]
        receive(busy)
    assert [(m["type"], m["id"]) for m in messages] == [("dropped", 1), ("image", 2)]
    assert server.pipeline.calls == [["other client"], ["newest"]]


def test_closing_the_socket_cancels_its_queued_work(start_server):
    server = start_server(FakePipeline(delay_s=0.4), max_batch=1)
    with connect(server) as busy:
        send(busy, **generate(prompt="other client"))
        time.sleep(0.1)
        with connect(server) as ws:
            send(ws, **generate(prompt="abandoned"))
            time.sleep(0.05)
            assert server.engine.queue_depth == 1
        time.sleep(0.1)
        assert server.engine.queue_depth == 0
        receive(busy)
    time.sleep(0.5)
    assert server.pipeline.calls == [["other client"]]


@pytest.mark.parametrize(
    "frame, status, param",
    [
        ("{not json", 400, "body"),
        (b"\x00\x01", 400, "body"),
        ("[1, 2]", 400, "body"),
        (json.dumps({"type": "teleport"}), 422, "type"),
        (json.dumps(generate(id=5, steps=0)), 422, "steps"),
        (json.dumps(generate(id=5, steps=8)), 422, "steps"),
        (json.dumps(generate(id=5, width=4096)), 422, "width"),
        (json.dumps(generate(id=5, width=1088)), 422, "width"),
        (json.dumps(generate(id=5, prompt="")), 422, "prompt"),
        (json.dumps(generate(id=5, seed="1")), 422, "seed"),
        (json.dumps(generate(id=5, strength=0)), 422, "strength"),
        (json.dumps(generate(id=5, format="gif")), 422, "format"),
        (json.dumps(generate(id={"a": 1})), 422, "id"),
        (json.dumps({"type": "download", "id": [1]}), 422, "id"),
        (json.dumps(generate(id=5, colour="red")), 422, "colour"),
        (json.dumps(generate(id=5, image="%%% not base64")), 422, "image"),
        (json.dumps(generate(id=5, image=base64.b64encode(b"plain text").decode())), 415, "image"),
        (json.dumps(generate(id=5, prompt="raise ValueError")), 422, None),
    ],
)
def test_bad_messages_get_an_error_and_the_connection_stays_usable(server, frame, status, param):
    with connect(server) as ws:
        ws.send(frame)
        meta, _ = receive(ws)
        assert meta["type"] == "error" and meta["error"]["code"] == status and meta["error"]["param"] == param
        if '"id": 5' in str(frame):
            assert meta["id"] == 5
        send(ws, **generate(id=6))
        assert receive(ws)[0]["type"] == "image"


@pytest.mark.parametrize(
    "message, text",
    [
        (generate(id={"a": 1}), "id: must be an integer or a string"),
        (generate(id=5, width=4096), "width: sides must be multiples of 8 from 64 to 1024 px on this server, got 4096"),
        ({"type": "teleport"}, "type: must be 'generate', 'download' or 'auth'"),
    ],
)
def test_error_messages_name_the_problem(server, message, text):
    with connect(server) as ws:
        send(ws, **message)
        assert receive(ws)[0]["error"]["message"] == text


def test_auth_on_a_server_without_a_key_is_acknowledged(server):
    with connect(server) as ws:
        send(ws, type="auth", api_key="anything")
        assert receive(ws)[0] == {"type": "auth", "ok": True}
        send(ws, **generate(id=1))
        assert receive(ws)[0]["type"] == "image"


def test_oversized_image_is_413(start_server):
    server = start_server(max_upload_bytes=10_000)
    with connect(server) as ws:
        send(ws, **generate(id=1, image=base64.b64encode(b"\x89PNG" + b"\0" * 20_000).decode()))
        meta, _ = receive(ws)
    assert meta["error"]["code"] == 413 and meta["error"]["param"] == "image"


def test_full_queue_is_reported_as_429(start_server):
    server = start_server(FakePipeline(delay_s=0.3), max_batch=1, max_queue=1)
    clients = [connect(server) for _ in range(3)]
    try:
        for i, ws in enumerate(clients):
            send(ws, **generate(id=i, prompt=str(i)))
            time.sleep(0.05)
        codes = [receive(ws)[0].get("error", {}).get("code", 200) for ws in clients]
    finally:
        for ws in clients:
            ws.close()
    assert codes == [200, 200, 429]


def test_a_request_abandoned_by_closing_the_socket_is_counted_499(start_server):
    server = start_server(FakePipeline(delay_s=0.5), max_batch=1)
    with connect(server) as ws:
        send(ws, **generate(prompt="running when the client leaves"))
        time.sleep(0.2)
    with connect(server) as busy, connect(server) as ws:
        send(busy, **generate(prompt="other client"))
        time.sleep(0.1)
        send(ws, **generate(prompt="queued when the client leaves"))
        time.sleep(0.1)
        ws.close()
        receive(busy)
    deadline = time.monotonic() + 5
    while 'endpoint="/ws",status="499"} 2.0' not in (metrics := server.engine.metrics.render().decode()):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
