"""The FastAPI application: routes, dependencies, lifespan. Logic lives in `server.serving`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from estimator.head import load_head
from server import metrics
from server.admission import Admission
from server.auth import KeyBeforeBody, require_admin_key, require_api_key, require_metrics_key
from server.body_limit import BodyLimit
from server.config import ServerSettings
from server.engine.engine import Engine
from server.errors import APIError, engine_dead_error, error_response, install_error_handlers
from server.head_reload import HeadRefused, HeadReloader, PolicyRefused, head_path, head_version, publish
from server.parallel import ParallelThinker
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DeletedResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HeadCard,
    HeadReloadRequest,
    ModelCard,
    ModelList,
    PolicyCard,
    PolicyReloadRequest,
    ResponsesCreateRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from server.reload_watch import ReloadWatch
from server.requests import RequestContext, handle
from server.serving import OpenAIServing
from server.tokens import Tokens

logger = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 503, 504)
}
# How often the watchdog looks at the engine.
WATCHDOG_INTERVAL_S = 0.5
# After the engine died, keep answering 503 (on /health too) this long before stopping, so
# health checks and load balancers see it rather than a refused connection.
DEAD_ENGINE_LINGER_S = 5.0


def create_app(
    settings: ServerSettings,
    engine: Engine | None = None,
    on_engine_dead: Callable[[], None] | None = None,
) -> FastAPI:
    """The app. With `engine=None` the lifespan starts (and later stops) its own engine;
    tests pass a shared, already-started engine instead. `on_engine_dead` is called once if
    the engine dies (the CLI uses it to stop uvicorn and exit non-zero)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        live = await Engine.start(settings.engine) if owned else engine
        assert live is not None
        if owned and settings.engine.capture:
            try:
                logger.info("capture self-test passed: %s", await live.self_test())
            except BaseException:
                await live.shutdown()
                raise  # uvicorn reports it and the command exits 3
        install_serving(app, settings, live)
        watchdog = asyncio.ensure_future(watch_engine(app, live, on_engine_dead))
        await app.state.serving.exploration.start()  # the traffic records' writer
        if owned:  # SIGHUP is process-wide: a test process shares one engine among several apps
            app.state.head_reloader.listen()
        watch = None
        if settings.recording.reload_watch:  # the file's head and policy before the first request
            watch = ReloadWatch(
                app.state.head_reloader,
                settings.recording.reload_watch,
                settings.recording.reload_watch_interval_s,
            )
            await watch.start()
        try:
            yield
        finally:
            if watch is not None:
                await watch.stop()
            if owned:
                app.state.head_reloader.stop_listening()
            watchdog.cancel()
            await app.state.serving.exploration.stop()  # flushes the queued records
            if owned:
                await live.shutdown()

    app = FastAPI(title="t2serve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    # Run before routing, the last added first: the API key is checked before the body is
    # read, then bodies are bounded before anything parses them.
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(KeyBeforeBody)

    for router in (probes, openai_routes, vllm_routes, admin_routes):
        app.include_router(router)
    return app


def install_serving(app: FastAPI, settings: ServerSettings, live: Engine) -> None:
    """The started engine's serving objects on `app.state` (engine, head, thinker, serving,
    admission), with the engine's and the head's info metrics and start-up log lines."""
    app.state.engine = live
    app.state.engine_failed = False
    metrics.ENGINE_HEALTHY.set(1)
    metrics.ENGINE_INFO.info({"device": live.info.device, "dtype": live.info.dtype, "mode": live.mode})
    head = load_head_or_fallback(settings, live) if settings.engine.capture else None
    spec = settings.parallelism.estimator_head if head is not None else None
    thinker = ParallelThinker(
        live,
        settings.parallelism,
        estimator=head,
        samples_limit=settings.limits.max_samples_in_flight,
        head_version=head_version(head_path(spec), time.time()) if spec is not None else None,
    )
    publish(thinker.current, spec)
    app.state.head_reloader = HeadReloader(thinker, live, spec, settings.parallelism.estimator_head)
    if head is not None:
        logger.info(
            "estimator head loaded: %s (layers %s, T2 margin %g)",
            head.identity,
            head.meta.layers,
            thinker.margin,
        )
    else:
        logger.info("no estimator head: parallelism 'auto' uses N=%d", thinker.n_max)
    app.state.serving = OpenAIServing(live, thinker, settings)
    app.state.admission = Admission(settings.limits)
    app.state.tokens = Tokens(live.tokenizer, live.info.name, live.info.max_model_len)


def load_head_or_fallback(settings: ServerSettings, live: Engine) -> Any:
    """The configured head, or None (fixed default N) with a warning and a metric when it
    fails to load or was trained for another model: a bad head never stops the server."""
    spec = settings.parallelism.estimator_head
    try:
        return load_head(
            spec,
            name=live.info.name,
            num_layers=live.info.num_layers,
            hidden_size=live.info.hidden_size,
            fingerprint=live.info.fingerprint,
        )
    except Exception as exc:
        logger.warning(
            "estimator head %s not used (%s); parallelism 'auto' falls back to N=%d",
            spec,
            exc,
            settings.parallelism.default_parallelism,
        )
        metrics.ESTIMATOR_FALLBACKS.labels("load").inc()
        return None


async def watch_engine(app: FastAPI, live: Engine, on_engine_dead: Callable[[], None] | None) -> None:
    """Notice the engine dying (vLLM marks it errored when its core process exits): from
    then on /health and every request answer 503, waiting requests are turned away, and
    `on_engine_dead` stops the server (in-flight requests already failed with the engine)."""
    while live.healthy:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
    logger.error("the vLLM engine died: answering 503 and shutting down")
    metrics.ENGINE_HEALTHY.set(0)
    app.state.engine_failed = True
    app.state.admission.close(engine_dead_error())
    if on_engine_dead is not None:
        await asyncio.sleep(DEAD_ENGINE_LINGER_S)
        on_engine_dead()


def get_tokens(request: Request) -> Tokens:
    tokens = getattr(request.app.state, "tokens", None)
    if tokens is None:
        raise APIError(503, "the engine is starting", code="engine_starting")
    return tokens


def get_serving(request: Request) -> OpenAIServing:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise APIError(503, "the engine is starting", code="engine_starting")
    if not serving.engine.healthy:
        metrics.REJECTED.labels("engine_dead").inc()
        raise engine_dead_error()
    return serving


# Routes: stateless functions of the request; what they serve lives on `app.state`
# (install_serving). Liveness and metrics stay open (metrics: --metrics-auth).
probes = APIRouter()
openai_routes = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses={401: ERRORS[401]})
# vLLM's server keeps these at the root, beside /v1; here they take the same API key.
vllm_routes = APIRouter(dependencies=[Depends(require_api_key)], responses={401: ERRORS[401]})


@probes.get("/health")
async def health(request: Request) -> Response:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        return error_response(503, "the engine is starting", code="engine_starting")
    if not serving.engine.healthy:
        return error_response(503, "engine is not running", code="engine_dead")
    return JSONResponse({"status": "ok"})


@probes.get("/metrics", dependencies=[Depends(require_metrics_key)])
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@openai_routes.get("/models", response_model=ModelList)
async def models(request: Request, serving: Annotated[OpenAIServing, Depends(get_serving)]) -> ModelList:
    info = serving.engine.info
    return ModelList(
        data=[
            ModelCard(
                id=info.name,
                root=info.path,
                max_model_len=info.max_model_len,
                dtype=info.dtype,
                t2_head=request.app.state.head_reloader.card(),
                t2_policy=request.app.state.head_reloader.policy_card(),
            )
        ]
    )


@openai_routes.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: Annotated[OpenAIServing, Depends(get_serving)]
) -> Response:
    return await handle(request, RequestContext("chat", body), serving)


@openai_routes.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(
    body: CompletionRequest, request: Request, serving: Annotated[OpenAIServing, Depends(get_serving)]
) -> Response:
    return await handle(request, RequestContext("completion", body), serving)


# /v1/responses: a Responses request runs as the chat request it becomes (server.responses);
# stored responses live in the serving object's store (server.response_store).
@openai_routes.post("/responses", responses=ERRORS)
async def create_response(
    body: ResponsesCreateRequest, request: Request, serving: Annotated[OpenAIServing, Depends(get_serving)]
) -> Response:
    return await handle(request, RequestContext("responses", body), serving)


@openai_routes.get("/responses/{response_id}", responses=ERRORS)
async def get_response(response_id: str, serving: Annotated[OpenAIServing, Depends(get_serving)]) -> Response:
    return JSONResponse(serving.response_store.response(response_id))


@openai_routes.delete("/responses/{response_id}", response_model=DeletedResponse, responses=ERRORS)
async def delete_response(
    response_id: str, serving: Annotated[OpenAIServing, Depends(get_serving)]
) -> DeletedResponse:
    serving.response_store.delete(response_id)
    return DeletedResponse(id=response_id)


@openai_routes.post("/responses/{response_id}/cancel", responses=ERRORS)
async def cancel_response(
    response_id: str, serving: Annotated[OpenAIServing, Depends(get_serving)]
) -> Response:
    serving.response_store.response(response_id)  # 404 when it holds none
    raise APIError(
        400,
        "Cannot cancel a synchronous response: only background responses can be cancelled, and t2serve "
        "runs none",
        param="response_id",
        code="invalid_value",
    )


# /admin: operators only (an admin key; off without one). Hot reload: server.head_reload.
admin_routes = APIRouter(
    prefix="/admin",
    dependencies=[Depends(require_admin_key)],
    responses={401: ERRORS[401], 403: ERRORS[403]},
)


@admin_routes.post("/head", response_model=HeadCard, responses=ERRORS, dependencies=[Depends(get_serving)])
async def reload_head(body: HeadReloadRequest, request: Request) -> HeadCard:
    """Swap the estimator head (and its stopping table and gate) without dropping a request."""
    try:
        return await request.app.state.head_reloader.reload(body.head, body.margin, policy=body.policy)
    except PolicyRefused as exc:
        raise APIError(400, str(exc), param="policy", code="invalid_policy") from exc
    except HeadRefused as exc:
        raise APIError(400, str(exc), param="head", code="invalid_head") from exc


@admin_routes.post(
    "/policy", response_model=PolicyCard, responses=ERRORS, dependencies=[Depends(get_serving)]
)
async def reload_policy(body: PolicyReloadRequest, request: Request) -> PolicyCard:
    """Swap the policy `auto` runs (the head stays) without dropping a request."""
    reloader = request.app.state.head_reloader
    try:
        await reloader.reload(None, policy=body.policy)
    except HeadRefused as exc:
        raise APIError(400, str(exc), param="policy", code="invalid_policy") from exc
    return reloader.policy_card()


@vllm_routes.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(
    body: TokenizeChatRequest | TokenizeCompletionRequest, tokens: Annotated[Tokens, Depends(get_tokens)]
) -> TokenizeResponse:
    return tokens.tokenize(body)


@vllm_routes.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(
    body: DetokenizeRequest, tokens: Annotated[Tokens, Depends(get_tokens)]
) -> DetokenizeResponse:
    return tokens.detokenize(body)


@vllm_routes.get("/version")
async def version(request: Request) -> dict[str, str]:
    import vllm

    return {"version": vllm.__version__, "t2serve": request.app.version}
