"""`sdturbo serve`: the real-time demo page and HTTP API. The CLI calls add_serve_arguments and serve_main;
tests and embedders build the app with serve.app.create_app(settings, engine)."""

from .command import add_serve_arguments, serve_main

__all__ = ["add_serve_arguments", "serve_main"]
