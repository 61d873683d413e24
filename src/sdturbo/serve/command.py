"""`sdturbo serve`: command-line arguments -> ServeSettings -> pipeline -> Engine -> app -> uvicorn.

Only argparse is imported at module level, so building the CLI stays cheap; the server's dependencies load when
the command runs."""

from __future__ import annotations

import argparse
import logging
import sys

# flag -> ServeSettings field; a flag left out falls back to SDTURBO_<FIELD> in the environment, then the default.
_FLAGS = {
    "model": "model",
    "device": "device",
    "dtype": "dtype",
    "vae_dtype": "vae_dtype",
    "fast": "fast",
    "compile": "compile",
    "host": "host",
    "port": "port",
    "api_key": "api_key",
    "max_batch": "max_batch",
    "max_queue": "max_queue",
    "timeout": "request_timeout_s",
    "allow_origin": "allow_origins",
    "allow_host": "allowed_hosts",
    "max_side": "max_side_px",
    "max_steps": "max_steps",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--model", help="hub id, diffusers folder or .safetensors file (default: stabilityai/sdxl-turbo)"
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", help="fp32, fp16 or bf16 (default: fp16 on CUDA, else fp32 or bf16)")
    parser.add_argument(
        "--vae-dtype", help="auto, fp32 or bf16 (default: auto, bf16 for an fp16 model; fp32 decodes as diffusers does)"
    )
    parser.add_argument(
        "--fast", action=argparse.BooleanOptionalAction, default=None,
        help="the fast path: same images within rounding, no start-up cost (default: on; --no-fast for the plain path)",
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="also torch.compile (GPU): each new batch size compiles for minutes first (default: off)",
    )
    parser.add_argument("--host", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, help="TCP port (default: 8000)")
    parser.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every endpoint but /healthz; "
        "prefer the SDTURBO_API_KEY environment variable, which `ps` does not show",
    )
    parser.add_argument("--max-batch", type=int, help="most images in one pipeline call (default: 8)")
    parser.add_argument("--max-queue", type=int, help="most waiting requests before answering 429 (default: 64)")
    parser.add_argument("--timeout", type=float, help="seconds before a request fails with 503 (default: 120)")
    parser.add_argument(
        "--allow-origin", nargs="+", action="extend", metavar="ORIGIN", help="enable CORS for these origins"
    )
    parser.add_argument(
        "--allow-host", nargs="+", action="extend", metavar="NAME", help="host names to answer besides loopback ones"
    )
    parser.add_argument("--max-side", type=int, help="largest width or height in pixels (default: 1024)")
    parser.add_argument("--max-steps", type=int, help="most denoising steps a request may ask for (default: 4)")
    return parser


def settings_from_args(args: argparse.Namespace):
    from .settings import ServeSettings

    given = {field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag, None) is not None}
    return ServeSettings(**given)


def with_model_default_size(settings, native_side_px: int):
    """Requests that name no size get the model's own (64 px for sdturbo-mini, 512 for SDXL-Turbo) unless the
    operator chose default_side_px; images at other sizes come out poor."""
    if "default_side_px" in settings.model_fields_set:
        return settings
    if native_side_px > settings.max_side_px:
        raise ValueError(
            f"--max-side {settings.max_side_px} is below this model's size {native_side_px}: raise --max-side, or set "
            "SDTURBO_DEFAULT_SIDE_PX to the size requests get by default"
        )
    return settings.model_copy(update={"default_side_px": native_side_px})


def serve_main(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted. Returns the process exit code."""
    import uvicorn
    from pydantic import ValidationError

    from ..pipeline import TurboPipeline
    from .app import create_app
    from .engine import Engine
    from .guards import is_loopback

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        first = e.errors()[0]
        print(f"sdturbo serve: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    if not is_loopback(settings.host) and settings.api_key is None:
        print(
            f"warning: serving on {settings.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    pipeline = TurboPipeline.from_pretrained(
        settings.model, device=settings.device, dtype=settings.dtype, vae_dtype=settings.vae_dtype
    )
    if settings.fast or settings.compile:
        from ..speed import optimize

        optimize(pipeline, compile=settings.compile)
    settings = with_model_default_size(settings, pipeline.native_side_px)
    engine = Engine(pipeline, settings.max_batch, settings.max_queue, settings.request_timeout_s)
    app = create_app(settings, engine)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"sdturbo serve: open http://{host}:{settings.port}/", file=sys.stderr)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_body_bytes,
        timeout_graceful_shutdown=5,  # open pages keep their WebSockets; Ctrl+C should not wait on them
        log_level="info",
    )
    return 0
