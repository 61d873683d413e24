"""WebSocket /ws: the live page's channel, usable by programs too.

Client -> server, JSON text frames: {"type": "generate", ...} (schemas.WsGenerate), {"type": "download", "id"},
{"type": "auth", "api_key"}. Server -> client: {"type": "hello"} once, then per result {"type": "image", ...}
followed by one binary frame with the image; with "preview": true, before it, {"type": "preview", "id", "step", ...}
and a small JPEG after every step (a linear decode of the step's x0 estimate, see sdturbo.preview);
{"type": "dropped", "id"} for a request replaced by a newer one before it ran; {"type": "error", "id", "error": {...}}.

Only the newest request of a connection is generated: one that arrives while an earlier one is still queued
replaces it, so typing never builds a backlog. Closing the connection takes its queued work off the engine."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from ..deps import EngineDep, SettingsDep, bearer_token, key_matches
from ..engine import Dropped, Engine, Generation, Job, Ticket
from ..errors import ApiError, engine_error, error_body, validation_error
from ..images import decode_base64_image, encode_image, fit_image
from ..limits import check_side, check_steps, image_seeds
from ..schemas import WsAuth, WsDownload, WsGenerate
from ..settings import ServeSettings

router = APIRouter()
log = logging.getLogger("sdturbo.serve")

RECENT_RESULTS = 4  # results kept per connection for {"type": "download"}
AUTH_TIMEOUT_S = 30.0
POLICY_VIOLATION = 1008  # WebSocket close code


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket, engine: EngineDep, settings: SettingsDep) -> None:
    header_key = bearer_token(websocket.headers.get("authorization"))
    if header_key is not None and not key_matches(settings, header_key):
        await websocket.close(POLICY_VIOLATION, "wrong API key")  # refused at the handshake: HTTP 403
        return
    await websocket.accept()
    authed = settings.api_key is None or header_key is not None
    await _Session(websocket, engine, settings, authed).run()


@dataclass
class _Request:
    message: WsGenerate
    job: Job
    received_at: float


class _Session:
    def __init__(self, websocket: WebSocket, engine: Engine, settings: ServeSettings, authed: bool):
        self.ws, self.engine, self.settings, self.authed = websocket, engine, settings, authed
        self.pending: _Request | None = None  # the newest request, not yet submitted
        self.inflight: tuple[_Request, Ticket] | None = None
        self.wake = asyncio.Event()
        self.recent: OrderedDict = OrderedDict()  # id -> (image, parameters)
        self.send_lock = asyncio.Lock()  # a result's JSON and its binary frame must stay adjacent
        self._preview_tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        await self.send_json({"type": "hello", "auth_required": not self.authed, "limits": self._limits()})
        worker = asyncio.create_task(self._generate_loop())
        try:
            if self.authed or await self._authenticate():
                await self._read_loop()
        except WebSocketDisconnect:
            pass
        finally:
            worker.cancel()  # a queued job leaves the engine's queue (Engine.wait cleans up)
            await asyncio.gather(worker, return_exceptions=True)
            if self.pending is not None:  # received, never submitted: the client left
                self._count_left(self.pending)

    def _limits(self) -> dict:
        s = self.settings
        return {
            "default_side_px": s.default_side_px,
            "max_side_px": s.max_side_px,
            "max_steps": s.max_steps,
            "max_upload_bytes": s.max_upload_bytes,
        }

    # -- receiving ----------------------------------------------------------------------------------------------

    async def _authenticate(self) -> bool:
        """On a server with a key, a connection that did not send it in the handshake must send it first."""
        try:
            message = WsAuth.model_validate(await asyncio.wait_for(self._receive_object(), AUTH_TIMEOUT_S))
        except (asyncio.TimeoutError, ApiError, ValidationError):
            return await self._refuse('send {"type": "auth", "api_key": ...} first')
        return await self._check_key(message)

    async def _check_key(self, message: WsAuth) -> bool:
        """The right key (any key on a server without one) is acknowledged; a wrong one closes the connection."""
        if not key_matches(self.settings, message.api_key):
            return await self._refuse("wrong API key")
        self.authed = True
        await self.send_json({"type": "auth", "ok": True})
        return True

    async def _refuse(self, reason: str) -> bool:
        await self.send_error(None, ApiError(401, reason, "api_key"))
        await self.ws.close(POLICY_VIOLATION, "authentication failed")
        return False

    async def _receive_object(self) -> dict:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("text") is None:
            raise ApiError(400, "send JSON objects in text frames, not binary frames", "body")
        try:
            data = json.loads(message["text"])
        except ValueError as e:
            raise ApiError(400, f"malformed JSON: {e}", "body") from None
        if not isinstance(data, dict):
            raise ApiError(400, "a message must be a JSON object", "body")
        return data

    async def _read_loop(self) -> None:
        while True:
            data: dict | None = None
            try:
                data = await self._receive_object()
                received_at = time.perf_counter()
                kind = data.get("type", "generate")
                if kind == "generate":
                    await self._replace_pending(await self._parse_generate(data, received_at))
                elif kind == "download":
                    await self._send_download(_validated(WsDownload, data).id)
                elif kind == "auth":
                    if not await self._check_key(_validated(WsAuth, data)):
                        return
                else:
                    raise ApiError(422, "type: must be 'generate', 'download' or 'auth'", "type")
            except ApiError as e:
                self.engine.metrics.count_request("/ws", e.status_code)
                message_id = data.get("id") if isinstance(data, dict) else None
                await self.send_error(message_id if isinstance(message_id, (int, str)) else None, e)

    async def _parse_generate(self, data: dict, received_at: float) -> _Request:
        message = _validated(WsGenerate, data)
        s = self.settings
        width, height = check_side(s, message.width, "width"), check_side(s, message.height, "height")
        image = None
        if message.image is not None:
            source = await asyncio.to_thread(
                decode_base64_image, message.image, s.max_upload_bytes, s.max_upload_pixels, "image"
            )
            image = await asyncio.to_thread(fit_image, source, width, height)
        job = Job(
            prompt=message.prompt,
            seeds=image_seeds(message.seed, 1),
            steps=check_steps(s, message.steps, "steps"),
            width=width,
            height=height,
            guidance_scale=message.guidance_scale,
            negative_prompt=message.negative_prompt,
            image=image,
            strength=message.strength,
        )
        return _Request(message, job, received_at)

    async def _replace_pending(self, request: _Request) -> None:
        """Newest wins: a queued-but-not-started job and an unsubmitted one are both superseded."""
        if self.inflight is not None:
            self.engine.cancel(self.inflight[1])  # its waiter reports it as dropped
        dropped, self.pending = self.pending, request
        self.wake.set()
        if dropped is not None:
            await self._report_dropped(dropped)

    async def _report_dropped(self, request: _Request) -> None:
        self._count_left(request)
        await self.send_json({"type": "dropped", "id": request.message.id})

    def _count_left(self, request: _Request) -> None:
        """499: replaced by a newer request, or the connection closed before its image was sent."""
        self.engine.metrics.observe_request("/ws", 499, time.perf_counter() - request.received_at)

    # -- generating ---------------------------------------------------------------------------------------------

    async def _generate_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            request, self.pending = self.pending, None
            if request is None:
                continue
            try:
                on_preview = functools.partial(self._preview, request) if request.message.preview else None
                ticket = self.engine.submit(request.job, on_preview)
                self.inflight = (request, ticket)
                generation = await self.engine.wait(ticket)
            except Dropped:
                await self._report_dropped(request)
                continue
            except asyncio.CancelledError:  # the connection closed while the request was queued or running
                self._count_left(request)
                raise
            except Exception as e:
                error = engine_error(e)
                self.engine.metrics.observe_request("/ws", error.status_code, time.perf_counter() - request.received_at)
                await self.send_error(request.message.id, error)
                continue
            finally:
                self.inflight = None
            await self._send_result(request, generation)

    def _preview(self, request: _Request, image, step: int) -> None:
        """On the event loop, from the model thread: send while the request is still the one being generated."""
        if self.inflight is None or self.inflight[0] is not request:
            return
        data = encode_image(image, "jpeg", None)  # latent-sized (64x64 for 512 px): microseconds, no thread needed
        meta = {"type": "preview", "id": request.message.id, "step": step, "width": image.width,
                "height": image.height, "format": "jpeg", "bytes": len(data)}
        task = asyncio.create_task(self._send_preview(meta, data))
        self._preview_tasks.add(task)  # keep a reference until sent (asyncio holds tasks weakly)
        task.add_done_callback(self._preview_tasks.discard)

    async def _send_preview(self, meta: dict, data: bytes) -> None:
        try:
            await self.send_pair(meta, data)
        except Exception as e:  # the connection closed mid-send: the read loop ends the session
            log.debug("ws: preview not sent: %s", e)

    async def _send_result(self, request: _Request, generation: Generation) -> None:
        message, job = request.message, request.job
        image, parameters = generation.images[0], generation.parameters[0]
        data = await asyncio.to_thread(encode_image, image, message.format, parameters)
        self._remember(message.id, image, parameters)
        latency_s = time.perf_counter() - request.received_at
        self.engine.metrics.observe_request("/ws", 200, latency_s)
        meta = {
            "type": "image",
            "id": message.id,
            "format": message.format,
            "prompt": job.prompt,
            "seed": job.seeds[0],
            "steps": job.steps,
            "width": job.width,
            "height": job.height,
            "guidance_scale": job.guidance_scale,
            "strength": job.strength if job.image is not None else None,
            "parameters": parameters.to_a1111(),
            "latency_ms": round(latency_s * 1000, 1),
            "queue_ms": round(generation.queue_ms, 1),
            "inference_ms": round(generation.inference_ms, 1),
            "batch_images": generation.batch_images,
            "bytes": len(data),
        }
        await self.send_pair(meta, data)

    def _remember(self, message_id, image, parameters) -> None:
        if message_id is None:
            return
        self.recent[message_id] = (image, parameters)
        self.recent.move_to_end(message_id)
        while len(self.recent) > RECENT_RESULTS:
            self.recent.popitem(last=False)

    async def _send_download(self, message_id) -> None:
        if message_id not in self.recent:
            raise ApiError(404, f"id: no recent result {message_id!r} on this connection", "id")
        image, parameters = self.recent[message_id]
        data = await asyncio.to_thread(encode_image, image, "png", parameters)
        meta = {"type": "download", "id": message_id, "format": "png", "seed": parameters.seed}
        await self.send_pair(meta, data)

    # -- sending ------------------------------------------------------------------------------------------------

    async def send_json(self, data: dict) -> None:
        async with self.send_lock:
            await self.ws.send_json(data)

    async def send_pair(self, meta: dict, data: bytes) -> None:
        """A result's JSON and its binary frame, adjacent."""
        async with self.send_lock:
            await self.ws.send_json(meta)
            await self.ws.send_bytes(data)

    async def send_error(self, message_id, error: ApiError) -> None:
        await self.send_json(
            {"type": "error", "id": message_id, **error_body(error.status_code, error.message, error.param)}
        )


def _validated(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
