"""`sdturbo serve`: command-line arguments -> ServeSettings -> pipeline -> Engine -> app -> uvicorn.

Only argparse is imported at module level, so building the CLI stays cheap; the server's dependencies load when
the command runs."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys

# flag -> ServeSettings field; a flag left out falls back to SDTURBO_<FLAG> in the environment, then the default.
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


ENVIRONMENT = """Every flag can also be set in the environment as SDTURBO_ and the flag's name (SDTURBO_PORT=9000,
SDTURBO_MAX_SIDE=768, SDTURBO_ALLOW_ORIGIN="https://a.example https://b.example", SDTURBO_FAST=false); the
command line wins. Settings without a flag: SDTURBO_DEFAULT_SIDE_PX (the size of requests that name none;
default: the model's own), SDTURBO_MAX_IMAGES_PER_REQUEST (4), SDTURBO_MAX_UPLOAD_BYTES (8 MiB),
SDTURBO_MAX_UPLOAD_PIXELS (16 megapixels)."""


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.epilog = ENVIRONMENT
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
        help="also torch.compile (GPU: every network; CPU: the UNet, 6-10%% faster): the default size compiles before "
        "the server listens, each other size and batch size on first use, for minutes (default: off)",
    )
    parser.add_argument("--host", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, help="TCP port (default: 8000)")
    parser.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every endpoint but /healthz; at least 8 characters; "
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
    """-> ServeSettings; a bad value raises ValueError naming its flag, or its environment variable."""
    from pydantic import ValidationError

    from .settings import ServeSettings

    given = {field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag, None) is not None}
    try:
        return ServeSettings(**given)
    except ValidationError as e:
        raise ValueError(_setting_error(e.errors()[0], given)) from None


def _setting_error(error: dict, given: dict) -> str:
    """pydantic's error -> "--timeout: must be greater than 0", or "SDTURBO_TIMEOUT: ..." for the environment's."""
    from .settings import ServeSettings, env_names

    if error["type"] == "value_error":
        reason = str(error["ctx"]["error"])
    else:
        reason = error["msg"].replace("Input should be", "must be")
    if not error["loc"]:  # a check across settings names them itself
        return reason
    key = error["loc"][0]  # a field, or the environment variable pydantic tried first
    field = next(f for f in ServeSettings.model_fields if key == f or key in env_names(f))
    if field in given:
        flag = next(flag for flag, f in _FLAGS.items() if f == field).replace("_", "-")
        return f"--{flag}: {reason}"
    names = env_names(field)
    return f"{next((k for k in os.environ if k.upper() in names), names[0])}: {reason}"


def warn_unknown_environment() -> None:
    """A misspelt SDTURBO_ variable would otherwise be ignored without a word."""
    from .settings import ServeSettings, env_names

    known = {name for field in ServeSettings.model_fields for name in env_names(field)}
    for name in sorted(os.environ):
        if name.upper().startswith("SDTURBO_") and name.upper() not in known:
            print(
                f"warning: {name} is not a setting of sdturbo serve and is ignored; see sdturbo serve --help",
                file=sys.stderr,
            )


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that an unknown host or a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn would bind it
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(
            f"--host {host}: unknown host ({e.strerror}); give an address of this machine, e.g. 127.0.0.1"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once over a closing connection
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(
                f"--port {port}: already in use on {host}; stop the program using it or choose another port"
            ) from None
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


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


def compile_default_size(pipeline, settings) -> None:
    """With --compile, the first image at a size compiles for minutes: do it before listening, for the size requests
    get by default, so the first user is not the one who waits (or times out). Other sizes and batch sizes still
    compile on first use."""
    side = settings.default_side_px
    print(f"sdturbo serve: compiling for {side}x{side} (minutes without a warm compile cache) ...", file=sys.stderr)
    pipeline("compile", height=side, width=side, seed=0, output_type="pil")


def serve_main(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted. Returns the process exit code."""
    import uvicorn

    from ..pipeline import TurboPipeline
    from .app import create_app
    from .engine import Engine
    from .guards import is_loopback

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warn_unknown_environment()
    try:
        settings = settings_from_args(args)
        sock = listen(settings.host, settings.port)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
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
    if settings.compile:
        compile_default_size(pipeline, settings)
    engine = Engine(pipeline, settings.max_batch, settings.max_queue, settings.request_timeout_s)
    config = uvicorn.Config(
        create_app(settings, engine),
        ws_max_size=settings.max_body_bytes,
        timeout_graceful_shutdown=5,  # open pages keep their WebSockets; Ctrl+C should not wait on them
        log_level="info",
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"sdturbo serve: open http://{host}:{sock.getsockname()[1]}/", file=sys.stderr)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """The first Ctrl+C/SIGTERM also closes the engine: open requests get a 503 at once rather than a
            plain-text 500 when the grace period ends. A second Ctrl+C quits at once, as uvicorn's message says."""
            if self.should_exit and sig == signal.SIGINT:
                _exit_interrupted()
            super().handle_exit(sig, frame)
            engine.close_soon()

    server = Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        if engine.busy:  # Python would join the model thread at exit, waiting for its batch (minutes on a CPU)
            _exit_interrupted()
        raise
    return 0 if server.started else 3  # 3: the app failed to start, uvicorn's code for it


def _exit_interrupted() -> None:
    """Leave without joining the model thread: a server has nothing left to save."""
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)

