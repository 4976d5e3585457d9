"""Optional API-key auth: `Authorization: Bearer <key>` checked against every configured key.

Keys come from `--api-key` (repeatable) and `T2SERVE_API_KEYS` (comma-separated). Without
keys every request passes. `/health` is never checked; `/metrics` only with `--metrics-auth`.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server import metrics
from server.errors import APIError


def key_matches(token: str, keys: list[str]) -> bool:
    # Compare with every key, in constant time each, so timing tells nothing about which
    # key (or how much of one) matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    return matched


def require_api_key(request: Request) -> None:
    """FastAPI dependency for the /v1 routes."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key_matches(token.strip(), keys):
        metrics.REJECTED.labels("unauthorized").inc()
        raise APIError(
            401,
            "missing or invalid API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_metrics_key(request: Request) -> None:
    if request.app.state.settings.metrics_auth:
        require_api_key(request)
