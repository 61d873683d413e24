"""Every failure leaves the server as one JSON shape, OpenAI's: {"error": {"message", "type", "param", "code"}}.

Bad requests are 4xx with a one-line message that names the field; only a fault of the server itself is a 5xx."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import GenerationFailed, GenerationTimeout, InvalidJob, QueueFull, ShuttingDown

_LOCATIONS = ("body", "query", "path", "header", "cookie")


class ApiError(Exception):
    """A request the server refuses; `param` names the offending field so clients can point at it."""

    def __init__(self, status_code: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.message, self.param, self.headers = status_code, message, param, headers


def error_type(status_code: int) -> str:
    if status_code == 401:
        return "authentication_error"
    if status_code == 429:
        return "rate_limit_error"
    return "server_error" if status_code >= 500 else "invalid_request_error"


def error_body(status_code: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status_code), "param": param, "code": status_code}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.status_code, err.message, err.param), err.status_code, headers=err.headers)


def field_name(loc: tuple) -> str:
    """("body", "size") -> "size"; ("body", "data", 0) -> "data.0"; the request body itself -> "body"."""
    parts = [str(p) for p in loc if p not in _LOCATIONS] if loc and loc[0] in _LOCATIONS else [str(p) for p in loc]
    return ".".join(parts) or "body"


_NOT_AN_OBJECT = (
    'request body must be a JSON object such as {"prompt": "a fox"}, sent with Content-Type: application/json'
)
_NAMED = 3  # errors one message names; more are only counted


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's error list -> one line naming the first few errors; `param` is the first one's field."""
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        return ApiError(400, f"request body is not valid JSON: {reason}", "body")
    if tuple(first["loc"]) == ("body",):  # empty, a form, or JSON but not an object
        return ApiError(400, _NOT_AN_OBJECT, "body")
    more = f"; and {len(errors) - _NAMED} more errors" if len(errors) > _NAMED else ""
    return ApiError(422, "; ".join(map(_describe, errors[:_NAMED])) + more, field_name(tuple(first["loc"])))


def _describe(error: dict) -> str:
    name = field_name(tuple(error["loc"]))
    if error["type"] == "missing":
        return f"{name}: field required"
    if error["type"] == "extra_forbidden":
        return f"{name}: unknown field"
    if error["type"] == "value_error":  # our own validators' messages, without pydantic's "Value error, "
        return f"{name}: {error.get('ctx', {}).get('error', error['msg'])}"
    return f"{name}: {error['msg']}"


def _unparsable_body(cause: BaseException | None) -> str | None:
    """What FastAPI's bare "There was an error parsing the body" was about, from the exception it wraps."""
    if isinstance(cause, UnicodeDecodeError):
        return "request body is not valid JSON: it is not UTF-8 text"
    if isinstance(cause, RecursionError):
        return "request body is not valid JSON: it is nested too deeply"
    return None


def engine_error(exc: Exception) -> ApiError:
    """The engine's refusals as HTTP: full queue 429, timeout or shutdown 503, arguments the pipeline rejects 422."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), None, {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, GenerationTimeout):
        return ApiError(503, str(exc), None, {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), None)
    if isinstance(exc, InvalidJob):
        return ApiError(422, str(exc), None)
    if isinstance(exc, GenerationFailed):
        return ApiError(500, str(exc), None)
    return ApiError(500, "internal server error", None)  # uvicorn logs the traceback


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI raises 400 "There was an error parsing the body" for malformed multipart and unreadable bodies.
        param = "body" if exc.status_code == 400 else None
        message = _unparsable_body(exc.__cause__) or str(exc.detail)
        return error_response(ApiError(exc.status_code, message, param, getattr(exc, "headers", None)))

    async def on_engine(request: Request, exc: Exception) -> JSONResponse:
        return error_response(engine_error(exc))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (QueueFull, GenerationTimeout, ShuttingDown, InvalidJob, GenerationFailed, Exception):
        app.add_exception_handler(cls, on_engine)
