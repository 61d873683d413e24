"""ASGI middlewares that refuse a request before any route sees it.

- KeyGuard: with --api-key, a request with a body and without the key is refused before its body is read, so a
  client without the key cannot make the server buffer uploads.
- BodyLimit: request bodies are bounded in bytes and in time (uvicorn sets no limit of its own).
- HostGuard: a server bound to loopback answers only to loopback host names, so a web page whose DNS name is
  re-pointed at 127.0.0.1 (DNS rebinding) cannot reach it as if it were its own origin.
- OriginGuard: browsers attach Origin to cross-site POSTs and WebSockets, which CORS alone does not stop (a
  "simple" multipart POST is sent without a preflight, and WebSockets ignore CORS): only same-origin pages and
  --allow-origin sites may drive the model."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .deps import WRONG_KEY, WRONG_KEY_HEADERS, bearer_token, key_matches
from .engine import SHUTTING_DOWN
from .errors import error_body
from .settings import ServeSettings

LOOPBACK_NAMES = ("localhost",)


async def _refuse(
    scope, receive, send, status: int, message: str, param: str | None, headers: dict[str, str] | None = None
) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})  # the client sees a 403
        return
    await JSONResponse(error_body(status, message, param), status, headers=headers)(scope, receive, send)


class KeyGuard:
    """Requests without a body (GET) check the key as a route dependency; the WebSocket checks it itself."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            if not key_matches(self.settings, bearer_token(Headers(scope=scope).get("authorization"))):
                return await _refuse(scope, receive, send, 401, WRONG_KEY, "Authorization", WRONG_KEY_HEADERS)
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout_s: float, stopping: asyncio.Event):
        """stopping: set when the server shuts down; a body still arriving then gets a 503 at once."""
        self.app, self.max_bytes, self.timeout_s, self.stopping = app, max_bytes, timeout_s, stopping

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body exceeds the limit of {self.max_bytes} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:  # refuse before reading a byte of it
            return await _refuse(scope, receive, send, 413, too_big, "body")
        # Read the body here, counting, so a chunked upload without Content-Length is bounded too; then replay it.
        # The whole body must arrive within the request timeout: a client that stops sending would hold its
        # connection and buffer forever.
        chunks, size, deadline = [], 0, time.monotonic() + self.timeout_s
        while True:
            message = await self._receive_until(receive, deadline)
            if message is None:
                if self.stopping.is_set():
                    return await _refuse(scope, receive, send, 503, SHUTTING_DOWN, None, {"Connection": "close"})
                slow = f"request body not received within the server's {self.timeout_s:g} s request timeout"
                return await _refuse(scope, receive, send, 408, slow, "body", {"Connection": "close"})
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

    async def _receive_until(self, receive, deadline: float) -> dict | None:
        """The next body message; None once the deadline passes or the server starts stopping."""
        message = asyncio.ensure_future(receive())
        stopping = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({message, stopping}, timeout=max(deadline - time.monotonic(), 0),
                           return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if message.done():
            return message.result()
        message.cancel()
        return None


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
            allow = f"start it with --allow-host {name} to allow it" if name else "send the header Host: localhost"
            message = f"Host {name!r} is not a name of this server; {allow}"
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
