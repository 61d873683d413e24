"""ASGI middlewares that refuse a request before any route sees it.

- BodyLimit: request bodies are bounded in bytes (uvicorn sets no limit of its own).
- HostGuard: a server bound to loopback answers only to loopback host names, so a web page whose DNS name is
  re-pointed at 127.0.0.1 (DNS rebinding) cannot reach it as if it were its own origin.
- OriginGuard: browsers attach Origin to cross-site POSTs and WebSockets, which CORS alone does not stop (a
  "simple" multipart POST is sent without a preflight, and WebSockets ignore CORS): only same-origin pages and
  --allow-origin sites may drive the model."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .errors import error_body

LOOPBACK_NAMES = ("localhost",)


async def _refuse(scope, receive, send, status: int, message: str, param: str | None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})  # the client sees a 403
        return
    await JSONResponse(error_body(status, message, param), status)(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body exceeds the limit of {self.max_bytes} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:  # refuse before reading a byte of it
            return await _refuse(scope, receive, send, 413, too_big, "body")
        # Read the body here, counting, so a chunked upload without Content-Length is bounded too; then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _refuse(scope, receive, send, 413, too_big, "body")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for the disconnect, which routes listen for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class HostGuard:
    def __init__(self, app, allowed_hosts: list[str]):
        self.app, self.allowed = app, set(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or "*" in self.allowed:
            return await self.app(scope, receive, send)
        name = host_name(Headers(scope=scope).get("host", ""))
        if not (is_loopback(name) or name in self.allowed):
            message = f"Host {name!r} is not a name of this server; start it with --allow-host {name} to allow it"
            return await _refuse(scope, receive, send, 421, message, "Host")
        await self.app(scope, receive, send)


class OriginGuard:
    def __init__(self, app, allow_origins: list[str]):
        self.app, self.allowed = app, set(allow_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or "*" in self.allowed:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None or origin in self.allowed or urlsplit(origin).netloc == headers.get("host"):
            return await self.app(scope, receive, send)
        message = f"Origin {origin[:100]!r} is not allowed; start the server with --allow-origin {origin[:100]}"
        await _refuse(scope, receive, send, 403, message, "Origin")
