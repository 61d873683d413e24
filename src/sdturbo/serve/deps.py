"""What routes declare they need: the engine, the settings, and (with --api-key) a valid bearer token."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from .engine import Engine
from .errors import ApiError
from .settings import ServeSettings

# Dependencies are `async def` because they never block: FastAPI would run plain `def` ones in a thread pool.


async def get_engine(conn: HTTPConnection) -> Engine:
    return conn.app.state.engine


async def get_settings(conn: HTTPConnection) -> ServeSettings:
    return conn.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[ServeSettings, Depends(get_settings)]

# auto_error=False: a missing header is our 401 in our JSON shape, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="the key given to `sdturbo serve --api-key`")


def key_matches(settings: ServeSettings, presented: str | None) -> bool:
    """True without a configured key; otherwise a constant-time comparison."""
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value().encode()
    return presented is not None and secrets.compare_digest(presented.encode(), expected)


def bearer_token(authorization: str | None) -> str | None:
    """'Bearer KEY' -> KEY (the scheme is case-insensitive, RFC 7235)."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


WRONG_KEY = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
WRONG_KEY_HEADERS = {"WWW-Authenticate": "Bearer"}


def check_key(settings: ServeSettings, presented: str | None) -> None:
    if not key_matches(settings, presented):
        raise ApiError(401, WRONG_KEY, "Authorization", WRONG_KEY_HEADERS)


async def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    check_key(settings, credentials.credentials if credentials else None)


ApiKey = Depends(require_api_key)
