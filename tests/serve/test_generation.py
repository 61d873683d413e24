"""REST requests whose client leaves are cancelled; requests that take too long fail with 503."""

from __future__ import annotations

import threading
import time

import httpx

from fake_pipeline import FakePipeline
from serve_helpers import assert_error


def test_a_client_that_disconnects_has_its_queued_work_cancelled(start_server):
    server = start_server(FakePipeline(delay_s=0.5), max_batch=1)
    url = server.url + "/v1/images/generations"
    busy = threading.Thread(
        target=httpx.post, args=(url,), kwargs={"json": {"prompt": "running", "size": "64x64"}, "timeout": 30}
    )
    busy.start()
    time.sleep(0.1)
    try:
        httpx.post(url, json={"prompt": "abandoned", "size": "64x64"}, timeout=0.2)  # gives up while queued
    except httpx.TimeoutException:
        pass
    deadline = time.monotonic() + 5
    while server.engine.queue_depth and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.queue_depth == 0
    busy.join()
    time.sleep(0.6)
    assert server.pipeline.calls == [["running"]]
    assert 'status="499"' in httpx.get(server.url + "/metrics").text


def test_request_timeout_is_503(start_server):
    server = start_server(FakePipeline(delay_s=0.5), request_timeout_s=0.1)
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "slow", "size": "64x64"}, timeout=30)
    assert_error(r, 503, None)
    assert "timeout" in r.json()["error"]["message"]
