"""The FastAPI application: routes, dependencies, lifespan. Logic lives in `server.serving`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from estimator.head import load_head
from server import metrics
from server.config import ServerSettings
from server.engine import Engine
from server.errors import APIError, error_response, install_error_handlers
from server.parallel import ParallelThinker
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.serving import OpenAIServing

logger = logging.getLogger(__name__)
T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """The app. With `engine=None` the lifespan starts (and later stops) its own engine;
    tests pass a shared, already-started engine instead."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        live = await Engine.start(settings.engine) if owned else engine
        assert live is not None
        app.state.engine = live
        try:
            head = load_head(
                settings.parallelism.estimator_head,
                name=live.info.name,
                num_layers=live.info.num_layers,
                hidden_size=live.info.hidden_size,
                fingerprint=live.info.fingerprint,
            )
        except ValueError as exc:
            if owned:
                await live.shutdown()
            raise SystemExit(f"t2serve: refusing to start: {exc}") from exc
        thinker = ParallelThinker(live, settings.parallelism, estimator=head)
        metrics.ESTIMATOR_INFO.info(
            {
                "identity": head.identity if head is not None else "",
                "n_max": str(thinker.n_max),
                "layers": ",".join(map(str, head.meta.layers)) if head is not None else "",
            }
        )
        if head is not None:
            logger.info("estimator head loaded: %s (layers %s)", head.identity, head.meta.layers)
        else:
            logger.info("no estimator head: parallelism 'auto' uses N=%d", thinker.n_max)
        app.state.serving = OpenAIServing(live, thinker, settings)
        try:
            yield
        finally:
            if owned:
                await live.shutdown()

    app = FastAPI(title="t2serve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)

    @app.get("/health")
    async def health(serving: Annotated[OpenAIServing, Depends(get_serving)]) -> Response:
        if not serving.engine.healthy:
            return error_response(503, "engine is not running", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models(serving: Annotated[OpenAIServing, Depends(get_serving)]) -> ModelList:
        info = serving.engine.info
        return ModelList(data=[ModelCard(id=info.name, root=info.path, max_model_len=info.max_model_len)])

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, serving: Annotated[OpenAIServing, Depends(get_serving)]
    ) -> Response:
        return await respond(request, "chat", body.parallelism, serving.chat(body))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(
        body: CompletionRequest, request: Request, serving: Annotated[OpenAIServing, Depends(get_serving)]
    ) -> Response:
        return await respond(request, "completion", body.parallelism, serving.completion(body))

    return app


def get_serving(request: Request) -> OpenAIServing:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise APIError(503, "the engine is starting", code="engine_starting")
    return serving


async def respond(request: Request, endpoint: str, parallelism: Any, work: Awaitable[Any]) -> Response:
    """Run an endpoint's work, cancelling it (and so its engine requests) if the client leaves.

    Non-streaming work is raced against the client's disconnect; a streaming body is
    cancelled by the server itself when the client goes away mid-stream."""
    request_metrics = RequestMetrics(endpoint, "fixed" if isinstance(parallelism, int) else "auto")
    try:
        result = await run_until_disconnect(request, work)
    except ClientDisconnected:
        request_metrics.done("cancelled")
        return Response(status_code=499)
    except BaseException:
        request_metrics.done("error")
        raise
    if isinstance(result, AsyncIterator):
        return StreamingResponse(request_metrics.track(result), media_type="text/event-stream")
    request_metrics.done("ok")
    return JSONResponse(result.model_dump())


class RequestMetrics:
    """In-flight gauge, outcome counter and latency of one request."""

    def __init__(self, endpoint: str, mode: str):
        self.endpoint, self.mode = endpoint, mode
        self.started = time.monotonic()
        metrics.REQUESTS_IN_FLIGHT.inc()

    def done(self, outcome: str) -> None:
        metrics.REQUESTS_IN_FLIGHT.dec()
        metrics.REQUESTS.labels(self.endpoint, self.mode, outcome).inc()
        metrics.REQUEST_SECONDS.labels(self.endpoint).observe(time.monotonic() - self.started)

    async def track(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        outcome = "error"
        try:
            async for piece in stream:
                yield piece
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.done(outcome)


class ClientDisconnected(Exception):
    pass


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it as soon as the client disconnects (the body has already
    been read, so the next ASGI message can only be the disconnect)."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    listener = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()
