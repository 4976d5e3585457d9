"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on 429/503, WWW-Authenticate on 401

    def body(self) -> ErrorResponse:
        return error_body(self.status, self.message, self.param, self.code)


def check_model(requested: str | None, served: str) -> None:
    """404 when a request names a model this server does not serve (None: it names none)."""
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"The model `{requested}` does not exist. Available: `{served}`.",
            param="model",
            code="model_not_found",
        )


def engine_dead_error() -> APIError:
    return APIError(503, "the inference engine has stopped; the server is shutting down", code="engine_dead")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorInfo(
            message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code
        )
    )


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, param, code).model_dump(), status_code=status, headers=headers
    )


def error_event(error: APIError) -> str:
    """An error inside an SSE stream (the status line has already been sent)."""
    return f"data: {json.dumps(error.body().model_dump())}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", None, "invalid_json")
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = (
            HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else ""
        )
        code = "invalid_body" if exc.status_code == 400 else None
        return error_response(exc.status_code, str(exc.detail or phrase), None, code, exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal server error", None, "internal_error")
