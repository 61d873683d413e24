"""/healthz, /metrics, /openapi.json, the page and its static files, and errors for unknown routes."""

from __future__ import annotations

import httpx

from serve_helpers import assert_error


def test_healthz(server):
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_metrics_count_requests_images_queue_and_batches(server):
    httpx.post(server.url + "/v1/images/generations", json={"prompt": "m", "n": 2, "size": "64x64"})
    httpx.post(server.url + "/v1/images/generations", json={"prompt": "m", "n": 0})
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'sdturbo_requests_total{endpoint="/v1/images/generations",status="200"}' in text
    assert 'sdturbo_requests_total{endpoint="/v1/images/generations",status="422"}' in text
    assert 'sdturbo_request_latency_seconds_bucket{endpoint="/v1/images/generations",le="0.5"}' in text
    assert "sdturbo_queue_depth 0.0" in text
    assert "sdturbo_batch_images_bucket" in text
    generated = next(line for line in text.splitlines() if line.startswith("sdturbo_images_generated_total"))
    assert float(generated.split()[-1]) >= 2


def test_openapi_lists_every_endpoint(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/models",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/sd-models",
        "/sdapi/v1/samplers",
        "/sdapi/v1/options",
        "/healthz",
        "/metrics",
    } <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_no_swagger_ui_which_would_load_a_cdn(server):
    assert httpx.get(server.url + "/docs").status_code == 404


def test_page_and_static_files_are_local(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # no external URL at all
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "https://" not in r.text and "http://" not in r.text


def test_unknown_route_and_method_are_json_errors(server):
    assert_error(httpx.get(server.url + "/nope"), 404, None)
    assert_error(httpx.get(server.url + "/v1/images/generations"), 405, None)
    assert httpx.get(server.url + "/static/../settings.py").status_code == 404


def test_metrics_name_the_static_files_by_their_mount(server):
    assert httpx.get(server.url + "/static/app.js").status_code == 200
    assert 'sdturbo_requests_total{endpoint="/static",status="200"}' in httpx.get(server.url + "/metrics").text
