"""What every REST route does with a Job: run it, and give up on it as soon as its client disconnects."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from .engine import Engine, Generation, Job
from .errors import ApiError

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; shows up in /metrics


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (sent when the client closes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def generate_for(request: Request, engine: Engine, job: Job) -> Generation:
    """Starlette does not cancel a handler whose client left; without this, abandoned jobs would still run."""
    work = asyncio.ensure_future(engine.generate(job))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # the engine takes a queued job off its queue
    if work not in done:
        raise ApiError(CLIENT_CLOSED_REQUEST, "the client disconnected before its images were ready")
    return work.result()


def server_timing(generation: Generation) -> dict[str, str]:
    """Server-Timing header: queue wait and the batch's inference time, shown by browser dev tools."""
    return {
        "Server-Timing": f"queue;dur={generation.queue_ms:.1f}, inference;dur={generation.inference_ms:.1f}",
        "X-Batch-Images": str(generation.batch_images),
    }
