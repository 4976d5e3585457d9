"""One request's life, the same for every endpoint (SGLang's serving template):

  prepare   every check, before the request waits for anything (server.serving): 404/400
  admit     a slot and the plan's minimum samples (server.admission): 429/503
  run       parallel thinking and the reply (server.serving), cancelled if the client leaves
  respond   JSON, or an SSE stream with keep-alives while the vote runs

One `RequestContext` carries the request from its route to its response: what it asked,
what was prepared, its admission ticket, and its metrics (in-flight gauge, outcome,
latency), settled exactly once however the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from server import metrics
from server.admission import Admission, Ticket
from server.auth import is_admin
from server.errors import APIError
from server.parallel import Plan
from server.protocol import ResponsesCreateRequest, SamplingFields

if TYPE_CHECKING:
    from server.responses import ResponsesTurn
    from server.serving import OpenAIServing, PromptSampling

T = TypeVar("T")

# A client may name its request (vLLM's OpenAI server takes the same header): the id then
# is the traffic record's `request_id` (server.recording), the response's X-Request-Id and
# the completion's id, so a client can join what it knows (gold answers) to the records.
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def client_request_id(request: Request) -> str | None:
    """The request's X-Request-Id, None without one; 400 unless it is 1-128 letters, digits,
    '.', '_', ':' or '-' (it goes into record ids, logs and engine request ids)."""
    value = request.headers.get(REQUEST_ID_HEADER)
    if value is None:
        return None
    if not REQUEST_ID_PATTERN.fullmatch(value):
        raise APIError(
            400,
            f"{REQUEST_ID_HEADER} must be 1 to 128 letters, digits, '.', '_', ':' or '-'",
            param=REQUEST_ID_HEADER,
            code="invalid_request_id",
        )
    return value


@dataclass
class RequestContext:
    """One request, from its route to its response."""

    endpoint: Literal["chat", "completion", "responses"]
    request: SamplingFields | ResponsesCreateRequest  # prepare turns a Responses request into chat's
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # or the client's X-Request-Id
    # Prefix of its engine request ids and capture tags: unique even when clients repeat an id.
    engine_id: str = ""
    started: float = field(default_factory=time.monotonic)
    # Prepared before admission (server.serving.OpenAIServing.prepare).
    plan: Plan | None = None
    prompts: list[list[int]] = field(default_factory=list)
    sampling: list[PromptSampling] = field(default_factory=list)  # per prompt
    timeout_s: float | None = None
    token_budget: int | None = None  # tokens all samples may generate together (server.budget)
    admin: bool = False  # the Bearer token is an admin key (admin-only fields, server.exploration)
    responses: ResponsesTurn | None = None  # /v1/responses: the turn its chat request came from
    on_done: list[Callable[[], None]] = field(default_factory=list)  # run once it settles
    # Admission, then the outcome.
    ticket: Ticket | None = None
    admitted: float | None = None
    finished: bool = False

    def __post_init__(self) -> None:
        self.engine_id = self.engine_id or self.request_id
        metrics.REQUESTS_IN_FLIGHT.inc()

    def named_by(self, request: Request) -> None:
        """Take the client's X-Request-Id as this request's id (400 if it is malformed)."""
        named = client_request_id(request)
        if named is not None:
            self.request_id, self.engine_id = named, f"{named}-{uuid.uuid4().hex[:8]}"

    @property
    def mode(self) -> str:
        return self.plan.mode if self.plan is not None else "invalid"

    def done(self, outcome: str) -> None:
        """Release the admission and record the outcome; later calls do nothing."""
        if self.finished:
            return
        self.finished = True
        if self.ticket is not None:
            self.ticket.release()
        for settle in self.on_done:
            settle()
        metrics.REQUESTS_IN_FLIGHT.dec()
        metrics.REQUESTS.labels(self.endpoint, self.mode, outcome).inc()
        metrics.REQUEST_SECONDS.labels(self.endpoint).observe(time.monotonic() - self.started)

    async def track(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """The stream, settling this request when it ends."""
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


async def handle(request: Request, ctx: RequestContext, serving: OpenAIServing) -> Response:
    """Prepare, admit and run one request; cancel it (and so its engine requests) if the
    client leaves, while queued or running. Non-streaming work is raced against the
    client's disconnect; a streaming body is cancelled by the server itself when the client
    goes away mid-stream."""
    admission: Admission = request.app.state.admission
    ctx.admin = is_admin(request)

    async def admitted_work() -> Any:
        ctx.named_by(request)
        serving.prepare(ctx)
        assert ctx.plan is not None
        ctx.ticket = await admission.acquire(ctx.plan.minimum_samples)
        ctx.admitted = time.monotonic()
        return await serving.run(ctx)

    try:
        result = await run_until_disconnect(request, admitted_work())
    except ClientDisconnected:
        ctx.done("cancelled")
        return Response(status_code=499)
    except BaseException:
        ctx.done("error")
        raise
    if isinstance(result, AsyncIterator):
        return TrackedStream(result, ctx, serving.settings.limits.sse_keepalive_s)
    ctx.done("ok")
    # by_alias: openai's Response types
    return JSONResponse(result.model_dump(by_alias=True), headers={REQUEST_ID_HEADER: ctx.request_id})


class TrackedStream(EventSourceResponse):
    """An SSE response (sse-starlette) that sends comment keep-alives every `keepalive_s`
    while the vote runs, and settles its request even when the client leaves before the body
    starts (then the body generator never runs its `finally`). The stream's events arrive
    already framed (server.serving.sse) and pass through as bytes."""

    def __init__(self, stream: AsyncIterator[str], ctx: RequestContext, keepalive_s: float):
        async def framed() -> AsyncIterator[bytes]:
            async for event in ctx.track(stream):
                yield event.encode()

        # sse-starlette pings at a default interval when given none; "off" is a ping too
        # rare to matter, not a second code path.
        super().__init__(
            framed(), ping=keepalive_s or 86_400, sep="\n", headers={REQUEST_ID_HEADER: ctx.request_id}
        )
        self.ctx = ctx

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ctx.done("cancelled")  # no-op when the stream already settled


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
