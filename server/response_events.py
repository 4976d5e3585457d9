"""A streamed /v1/responses request: OpenAI's Responses event sequence around the vote.

  response.created, response.in_progress    at once, so the client sees the stream open;
                                            SSE comment keep-alives follow while the vote
                                            runs (server.requests.TrackedStream)
  each output item's events                 output_item.added, content_part.added,
                                            output_text.delta / .done (reasoning_text.*,
                                            function_call_arguments.* for the others),
                                            content_part.done, output_item.done: the voted
                                            winner replayed by vLLM's state machine
  response.completed                        the whole Response, its status `incomplete` when
                                            the winner hit max_output_tokens (as vLLM sends it;
                                            the SDK's stream helper waits for this event)

A failure after the stream opened is an `error` event, then `response.failed`: both are
events the SDK hands to the client (a chat-style `{"error": ...}` payload would make it raise
mid-stream). Each frame is `event: TYPE` + `data: JSON`, sequence numbers from 0, no [DONE].
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseInProgressEvent,
)

from server import responses
from server.errors import APIError
from server.responses import ResponsesTurn

logger = logging.getLogger(__name__)


async def stream(
    turn: ResponsesTurn, outcome: Callable[[], Awaitable[tuple[Any, list[Any]]]]
) -> AsyncIterator[str]:
    """The turn's events; `outcome` runs the vote and gives the Response and its item events
    (server.responses.finish with streamed=True)."""
    numbers = itertools.count()
    opened = responses.pending(turn)
    yield frame(ResponseCreatedEvent(type="response.created", response=opened, sequence_number=next(numbers)))
    yield frame(
        ResponseInProgressEvent(type="response.in_progress", response=opened, sequence_number=next(numbers))
    )
    try:
        response, events = await outcome()
    except Exception as exc:
        error = exc if isinstance(exc, APIError) else internal_error(exc)
        yield frame(
            ResponseErrorEvent(
                type="error",
                code=error.code or str(error.status),
                message=error.message,
                param=error.param,
                sequence_number=next(numbers),
            )
        )
        failed = responses.failed(turn, error)
        yield frame(
            ResponseFailedEvent(type="response.failed", response=failed, sequence_number=next(numbers))
        )
        return
    for event in events:
        event.sequence_number = next(numbers)
        yield frame(event)
    yield frame(
        ResponseCompletedEvent(type="response.completed", response=response, sequence_number=next(numbers))
    )


def internal_error(exc: Exception) -> APIError:
    logger.exception("error while streaming a response", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


def frame(event: Any) -> str:
    return f"event: {event.type}\ndata: {event.model_dump_json(by_alias=True)}\n\n"
