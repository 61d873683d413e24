"""create_app(settings, engine) -> FastAPI. A factory, not a module-level app, so tests can inject a fake engine."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from .deps import ApiKey
from .engine import Engine
from .errors import install_error_handlers
from .guards import BodyLimit, HostGuard, KeyGuard, OriginGuard, is_loopback
from .metrics import MetricsMiddleware
from .routes import a1111, health, openai, page, ws
from .settings import ServeSettings


def _middleware(settings: ServeSettings, engine: Engine) -> list[Middleware]:
    """Outermost first: count everything, answer CORS preflights, then refuse foreign hosts, origins, requests
    without the key (before their body is read), huge or stalled bodies."""
    stack = [Middleware(MetricsMiddleware, metrics=engine.metrics)]
    if settings.allow_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.allow_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=["Retry-After", "Server-Timing"],
            )
        )
    if is_loopback(settings.host) or settings.allowed_hosts:
        stack.append(Middleware(HostGuard, allowed_hosts=settings.allowed_hosts))
    stack.append(Middleware(OriginGuard, allow_origins=settings.allow_origins))
    stack.append(Middleware(KeyGuard, settings=settings))
    stack.append(Middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.request_timeout_s,
                            stopping=engine.stopping))
    return stack


def create_app(settings: ServeSettings, engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(
        title="sdturbo",
        summary="SDXL-Turbo image generation: OpenAI images API, an A1111 API subset, and a live WebSocket.",
        # Swagger UI and ReDoc load their assets from a CDN: off. The schema itself is served below, behind the key.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        middleware=_middleware(settings, engine),
    )
    app.state.settings, app.state.engine = settings, engine
    install_error_handlers(app)
    for router in (openai.router, openai.models_router, a1111.router, ws.router, health.router, page.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR), name="static")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[ApiKey])
    async def openapi() -> dict:
        return app.openapi()

    return app
