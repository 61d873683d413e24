"""Safe by default: API key on everything but /healthz and the static page, loopback Host names only, no
cross-site Origin, CORS only when asked for, bounded request bodies."""

from __future__ import annotations

import base64
import json
import socket
import time

import httpx
import pytest
import websockets.sync.client as ws_client
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fake_pipeline import FakePipeline
from serve_helpers import assert_error, encoded, running_server

KEY = "correct-horse-battery"
PNG = encoded(Image.new("RGB", (64, 64)))

PROTECTED = [
    ("GET", "/metrics", {}),
    ("GET", "/openapi.json", {}),
    ("POST", "/v1/images/generations", {"json": {"prompt": "x", "size": "64x64"}}),
    (
        "POST",
        "/v1/images/edits",
        {"files": {"image": ("a.png", PNG, "image/png")}, "data": {"prompt": "x", "size": "64x64"}},
    ),
    ("POST", "/sdapi/v1/txt2img", {"json": {"prompt": "x", "width": 64, "height": 64}}),
    ("POST", "/sdapi/v1/img2img", {"json": {"init_images": [base64.b64encode(PNG).decode()], "prompt": "x"}}),
    ("GET", "/sdapi/v1/sd-models", {}),
    ("GET", "/sdapi/v1/samplers", {}),
    ("GET", "/v1/models", {}),
    ("GET", "/sdapi/v1/options", {}),
    ("POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": "fake"}}),
]


@pytest.fixture(scope="module")
def keyed_server():
    with running_server(FakePipeline(), api_key=KEY) as s:
        yield s


@pytest.mark.parametrize("method, path, kw", PROTECTED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-123", f"Basic {KEY}", "Bearer"])
def test_every_endpoint_needs_the_key(keyed_server, method, path, kw, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    r = httpx.request(method, keyed_server.url + path, headers=headers, **kw)
    assert_error(r, 401, "Authorization")
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method, path, kw", PROTECTED)
def test_the_right_key_opens_every_endpoint(keyed_server, method, path, kw):
    r = httpx.request(method, keyed_server.url + path, headers={"Authorization": f"Bearer {KEY}"}, **kw)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path, kw",
    [
        ("/v1/images/generations", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("/v1/images/generations", {"content": b'{"prompt": "\xff"}', "headers": {"content-type": "application/json"}}),
        ("/v1/images/generations", {"data": {"prompt": "x"}}),
        ("/sdapi/v1/txt2img", {"content": b"[", "headers": {"content-type": "application/json"}}),
        ("/v1/images/edits", {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}),
    ],
)
def test_the_key_is_checked_before_the_body_is_parsed(keyed_server, path, kw):
    assert_error(httpx.post(keyed_server.url + path, **kw), 401, "Authorization")


def test_healthz_and_the_static_page_need_no_key(keyed_server):
    for path in ("/healthz", "/", "/static/app.js"):
        assert httpx.get(keyed_server.url + path).status_code == 200


def test_websocket_key_by_header_or_first_message(keyed_server):
    with ws_client.connect(keyed_server.ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        assert json.loads(ws.recv(timeout=10))["auth_required"] is False
    with ws_client.connect(keyed_server.ws_url) as ws:
        assert json.loads(ws.recv(timeout=10))["auth_required"] is True
        ws.send(json.dumps({"type": "auth", "api_key": KEY}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "auth", "ok": True}
        ws.send(json.dumps({"type": "generate", "id": 1, "prompt": "x", "width": 64, "height": 64}))
        assert json.loads(ws.recv(timeout=10))["type"] == "image"
    for first in ({"type": "generate", "prompt": "x"}, {"type": "auth", "api_key": "wrong-key-123"}):
        with ws_client.connect(keyed_server.ws_url) as ws:  # refused and closed: no guessing keys on one connection
            ws.recv(timeout=10)
            ws.send(json.dumps(first))
            assert json.loads(ws.recv(timeout=10))["error"]["code"] == 401
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
    with pytest.raises(InvalidStatus) as err:
        ws_client.connect(keyed_server.ws_url, additional_headers={"Authorization": "Bearer wrong-key-123"})
    assert err.value.response.status_code == 403


def test_websocket_auth_again_after_success(keyed_server):
    """The right key is acknowledged again; a wrong one closes the connection, as it does first."""
    with ws_client.connect(keyed_server.ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        ws.recv(timeout=10)
        ws.send(json.dumps({"type": "auth", "api_key": KEY}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "auth", "ok": True}
        ws.send(json.dumps({"type": "auth", "api_key": "wrong-key-123"}))
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == 401
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)


def test_foreign_host_names_are_refused_on_loopback(server):
    """DNS rebinding: a page at evil.example re-pointed to 127.0.0.1 sends Host: evil.example."""
    assert_error(httpx.get(server.url + "/healthz", headers={"Host": "evil.example"}), 421, "Host")
    for host in ("localhost", "127.0.0.1:8000", "[::1]:8000", "localhost:1"):
        assert httpx.get(server.url + "/healthz", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_extend_the_loopback_names(start_server):
    s = start_server(allowed_hosts=["images.internal"])
    assert httpx.get(s.url + "/healthz", headers={"Host": "images.internal:443"}).status_code == 200
    assert httpx.get(s.url + "/healthz", headers={"Host": "other.internal"}).status_code == 421


def test_cross_site_requests_are_refused(server):
    body = {"prompt": "x", "size": "64x64"}
    r = httpx.post(server.url + "/v1/images/generations", json=body, headers={"Origin": "http://evil.example"})
    assert_error(r, 403, "Origin")
    same_origin = {"Origin": server.url}
    assert httpx.post(server.url + "/v1/images/generations", json=body, headers=same_origin).status_code == 200
    with pytest.raises(InvalidStatus) as err:
        ws_client.connect(server.ws_url, origin="http://evil.example")
    assert err.value.response.status_code == 403
    with ws_client.connect(server.ws_url, origin=server.url) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"


def test_cors_is_off_by_default_and_on_for_named_origins(server, start_server):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/images/generations", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    s = start_server(allow_origins=["http://app.example"])
    r = httpx.options(
        s.url + "/v1/images/generations", headers=preflight | {"Access-Control-Request-Headers": "authorization"}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.post(
        s.url + "/v1/images/generations",
        json={"prompt": "x", "size": "64x64"},
        headers={"Origin": "http://app.example"},
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    with ws_client.connect(s.ws_url, origin="http://app.example") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"


def test_request_bodies_are_bounded(start_server):
    s = start_server(max_upload_bytes=10_000)
    limit = s.settings.max_body_bytes
    url = s.url + "/v1/images/generations"
    r = httpx.post(url, content=b"x" * (limit + 1), headers={"content-type": "application/json"})
    assert_error(r, 413, "body")

    def chunks():  # no Content-Length: chunked transfer encoding, counted as it arrives
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    assert_error(httpx.post(url, content=chunks(), headers={"content-type": "application/json"}), 413, "body")


def _raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    """A raw HTTP/1.1 request whose body may stop short of its Content-Length."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _status_of(sock: socket.socket) -> int:
    return int(sock.recv(65536).split(b" ", 2)[1])


def test_a_request_without_the_key_is_refused_before_its_body_arrives(keyed_server):
    """401 while the declared 5 MB body is still unsent: a client without the key cannot make the server buffer."""
    head = (
        "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        "content-length: 5000000\r\n"
    )
    started = time.monotonic()
    with _raw_request(keyed_server.url, head) as sock:
        assert _status_of(sock) == 401
    assert time.monotonic() - started < 5


def test_a_body_that_stops_arriving_gets_408_after_the_request_timeout(start_server):
    s = start_server(request_timeout_s=0.5)
    head = "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    with _raw_request(s.url, head + "content-length: 100\r\n", b'{"prompt": ') as sock:
        assert _status_of(sock) == 408
    metrics = httpx.get(s.url + "/metrics").text
    assert 'sdturbo_requests_total{endpoint="unmatched",status="408"} 1.0' in metrics


def test_a_client_that_leaves_mid_body_is_counted_499_not_500(start_server):
    s = start_server()
    head = "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    _raw_request(s.url, head + "content-length: 100\r\n", b'{"prompt": ').close()
    deadline = time.monotonic() + 5
    while 'status="499"' not in (metrics := httpx.get(s.url + "/metrics").text):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    assert 'status="500"' not in metrics


def test_a_body_still_arriving_when_the_server_stops_gets_503_at_once(start_server):
    s = start_server()
    head = "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    with _raw_request(s.url, head + "content-length: 100\r\n", b'{"prompt": ') as sock:
        time.sleep(0.2)
        started = time.monotonic()
        s.engine.close_soon()  # what the server's Ctrl+C/SIGTERM handler calls
        assert _status_of(sock) == 503
    assert time.monotonic() - started < 2
