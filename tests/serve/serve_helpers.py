"""A real uvicorn server on a free loopback port, in a thread, around any pipeline; and image helpers."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import uvicorn
from PIL import Image

from sdturbo.serve.app import create_app
from sdturbo.serve.engine import Engine
from sdturbo.serve.settings import ServeSettings


@dataclass
class RunningServer:
    url: str
    ws_url: str
    engine: Engine
    pipeline: object
    settings: ServeSettings


@contextmanager
def running_server(pipeline, **settings):
    settings = ServeSettings(**settings)
    engine = Engine(pipeline, settings.max_batch, settings.max_queue, settings.request_timeout_s)
    app = create_app(settings, engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", ws_max_size=settings.max_body_bytes, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws", engine, pipeline, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def assert_error(response, status: int, param: str | None) -> dict:
    """A 4xx/5xx in the server's one JSON shape, with a one-line message that names the field."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == status
    assert error["message"] and "\n" not in error["message"]
    if param not in (None, "body"):
        assert param in error["message"]
    return error


def decode_b64_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size in 60 bytes: the classic decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
