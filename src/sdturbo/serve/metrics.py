"""Prometheus metrics: one registry per server (so tests can run several), and the middleware that counts requests."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sdturbo_requests", "Requests answered, by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "sdturbo_request_latency_seconds",
            "Time to answer a request",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge("sdturbo_queue_depth", "Requests waiting for the model", registry=r)
        self.batch_images = Histogram(
            "sdturbo_batch_images", "Images generated per pipeline call", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "sdturbo_batch_latency_seconds", "Duration of one pipeline call", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.images = Counter("sdturbo_images_generated", "Images generated", registry=r)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.count_request(endpoint, status)
        self.latency.labels(endpoint).observe(seconds)

    def count_request(self, endpoint: str, status: int) -> None:
        """For requests refused before they had a meaningful latency (malformed WebSocket messages)."""
        self.requests.labels(endpoint, str(status)).inc()

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_latency.observe(seconds)
        self.images.inc(images)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by its route template (not its raw path, which would make one series per URL)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), None

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            status = status or 500
            raise
        finally:
            # Returning without a response means the client left first (499, as /ws counts it), not a server fault.
            # Routes put themselves in the scope; a mount (the page's /static files) only its root_path.
            endpoint = getattr(scope.get("route"), "path", None) or scope.get("root_path") or "unmatched"
            self.metrics.observe_request(endpoint, status or 499, time.perf_counter() - started)
