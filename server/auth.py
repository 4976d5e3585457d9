"""Optional API-key auth: `Authorization: Bearer <key>` checked against every configured key.

Keys come from `--api-key` (repeatable) and `T2SERVE_API_KEYS` (comma-separated). Without
keys every request passes. `/health` is never checked; `/metrics` only with `--metrics-auth`.
On /v1, /tokenize and /detokenize the key is checked before the body is read
(`KeyBeforeBody`), so a client without a valid key gets 401 whatever it sent. /admin takes
an admin key (--admin-key, T2SERVE_ADMIN_KEYS) the same way, and is off (403) without one.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import Request

from server import metrics
from server.errors import APIError, error_response


def key_matches(token: str, keys: list[str]) -> bool:
    # Compare with every key, in constant time each, so timing tells nothing about which
    # key (or how much of one) matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    return matched


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def is_admin(request: Request) -> bool:
    """Whether the request carries an admin key (--admin-key): admin-only fields need one."""
    keys = request.app.state.settings.admin_keys
    token = bearer_token(request)
    return bool(keys) and token is not None and key_matches(token, keys)


def require_api_key(request: Request) -> None:
    """FastAPI dependency for the /v1 routes (an admin key is an API key too)."""
    settings = request.app.state.settings
    if not settings.api_keys:
        return
    token = bearer_token(request)
    if token is None or not key_matches(token, [*settings.api_keys, *settings.admin_keys]):
        metrics.REJECTED.labels("unauthorized").inc()
        raise APIError(
            401,
            "missing or invalid API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_admin_key(request: Request) -> None:
    """FastAPI dependency for the /admin routes: 403 when no admin key is configured, 401
    without one of them."""
    if not request.app.state.settings.admin_keys:
        raise APIError(
            403,
            "admin routes are off: start the server with --admin-key (or T2SERVE_ADMIN_KEYS)",
            code="admin_disabled",
        )
    if not is_admin(request):
        metrics.REJECTED.labels("unauthorized").inc()
        raise APIError(
            401,
            "missing or invalid admin key: send `Authorization: Bearer <admin key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_metrics_key(request: Request) -> None:
    if request.app.state.settings.metrics_auth:
        require_api_key(request)


# Paths whose requests need the API key (when keys are configured).
KEYED_PATHS = ("/v1/", "/tokenize", "/detokenize")
# Paths whose requests need an admin key (`require_admin_key`).
ADMIN_PATHS = ("/admin/",)


def key_check(scope: dict[str, Any]) -> Callable[[Request], None] | None:
    """The key check a request's path takes before its body is read, if any."""
    if scope["type"] != "http":
        return None
    if scope["path"].startswith(ADMIN_PATHS):
        return require_admin_key
    if scope["path"].startswith(KEYED_PATHS):
        return require_api_key
    return None


class KeyBeforeBody:
    """Pure ASGI middleware: `require_api_key` on KEYED_PATHS (`require_admin_key` on
    ADMIN_PATHS) before anything reads the body.

    FastAPI reads and parses a route's body before it runs the route's dependencies, and
    server.body_limit runs before routing, so otherwise a body that is too large, not UTF-8,
    not JSON or nested too deep would get 413/400 ahead of the 401. The router keeps its
    `require_api_key` dependency too (it documents the 401 and costs next to nothing)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        check = key_check(scope)
        if check is not None:
            try:
                check(Request(scope))
            except APIError as error:
                response = error_response(error.status, error.message, error.param, error.code, error.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
