"""GET /healthz (liveness, no key needed) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import ApiKey, EngineDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", dependencies=[ApiKey], response_class=Response)
async def metrics(engine: EngineDep) -> Response:
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)
