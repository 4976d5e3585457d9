"""The part of the vLLM adapter that serves /v1/responses (server.responses), pinned to vLLM
0.32's API as server/vllm_openai.py is: vLLM's ResponsesRequest checks the request and its
input items; vLLM's pure conversions (responses/utils.py, responses/streaming_events.py)
turn the items into chat messages and tools, and a winner's text back into output items and
stream events. tests/server/test_vllm_responses.py pins what is used here.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from pydantic import BaseModel, ValidationError

from server import vllm_openai
from server.errors import APIError
from server.vllm_openai import ParsedOutput

logger = logging.getLogger(__name__)

# Responses fields server.responses converts to chat fields or handles itself.
RESPONSES_OWN_FIELDS = frozenset(
    {
        "input",
        "instructions",
        "max_output_tokens",
        "text",
        "reasoning",
        "tools",
        "tool_choice",
        "chat_template_kwargs",
        "store",
        "previous_response_id",
        "metadata",
    }
)
# Responses fields that change nothing t2serve generates.
RESPONSES_INERT_FIELDS = frozenset(
    {"model", "user", "stream", "service_tier", "prompt_cache_key", "request_id", "session_id"}
)


def responses_request_model() -> type[BaseModel]:
    """vLLM's Responses request model."""
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return ResponsesRequest


@functools.cache
def responses_sampling_fields() -> frozenset[str]:
    """Responses fields that mean what they mean in vLLM's chat request, passed to it as sent:
    the sampling fields both models have, but the tool fields (a Responses tool is flat) and
    `top_logprobs` (an `include` entry goes with it)."""
    shared = vllm_openai.SAMPLING_FIELDS & responses_request_model().model_fields.keys()
    return shared - {"tools", "tool_choice", "top_logprobs"}


def responses_request(body: dict[str, Any]) -> Any:
    """`body` read by vLLM's ResponsesRequest (its item coercions and tool checks); a 400
    naming the field (`input.3`, `text.format`, ...) in one line, never pydantic's dump of
    every union member. Fields t2serve cannot honour set to non-defaults: 400 naming them;
    fields vLLM does not know: a warning (t2serve's extension fields are taken out before)."""
    from vllm.exceptions import VLLMClientError

    model = responses_request_model()
    honoured = responses_sampling_fields() | RESPONSES_OWN_FIELDS | RESPONSES_INERT_FIELDS
    for name, value in body.items():
        field = model.model_fields.get(name)
        if name in honoured or field is None or value in (None, []):
            continue
        if value != field.get_default(call_default_factory=True):
            raise APIError(
                400,
                f"`{name}` is not supported by t2serve's /v1/responses (the response is a vote over "
                "samples; see docs/api.md, Responses API)",
                param=name,
                code="unsupported_parameter",
            )
    unknown = sorted(name for name in body if name not in model.model_fields)
    if unknown:
        logger.warning("The following fields were present in the request but ignored: %s", unknown)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _responses_invalid(exc) from exc
    except VLLMClientError as exc:  # vLLM's validators (tool_choice without tools, prompt, ...)
        error = vllm_openai.invalid_sampling(exc)
        error.message = str(exc)
        raise error from exc


def _responses_invalid(exc: ValidationError) -> APIError:
    """The first problem, named by its field and item index (union members' names left out);
    for a list, the first problem inside an item rather than the not-a-string branch."""
    errors = exc.errors()
    first = next((e for e in errors if any(isinstance(p, int) for p in e["loc"])), errors[0])
    named = [str(p) for p in first["loc"] if isinstance(p, int) or (p.isidentifier() and p.islower())]
    param = ".".join(named[:2]) or None
    message = f"{param}: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, message, param=param, code="invalid_value")


def responses_messages(request: Any, previous: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """vLLM's chat messages for a Responses request: its instructions as the system message,
    the `previous` transcript without its system messages, then the input items (function
    calls merged into assistant messages, outputs as tool messages). A converter failure on
    an input it does not expect is a 400 naming `input`."""
    from vllm.entrypoints.openai.responses.utils import construct_input_messages
    from vllm.exceptions import VLLMClientError

    try:
        return construct_input_messages(
            request_instructions=request.instructions, request_input=request.input, prev_msg=previous
        )
    except (VLLMClientError, AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise APIError(400, f"input: unsupported item ({exc})", param="input", code="invalid_value") from exc


def responses_tools(request: Any) -> list[dict[str, Any]] | None:
    """The request's function tools in chat's shape ({"type": "function", "function": {...}})."""
    from vllm.entrypoints.openai.responses.utils import construct_tool_dicts

    return construct_tool_dicts(request.tools, request.tool_choice)


def responses_template_kwargs(request: Any) -> dict[str, Any]:
    """The chat template's inputs as vLLM's build_chat_params sets them: add_generation_prompt
    and continue_final_message (a partial assistant message last), `reasoning_effort` and
    `enable_thinking` from `reasoning.effort`, and the request's chat_template_kwargs."""
    return dict(request.build_chat_params(None, "auto").chat_template_kwargs)


def _function_calls(parsed: ParsedOutput) -> list[Any]:
    from vllm.entrypoints.generate.base.protocol import FunctionCall

    return [
        FunctionCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
        for c in parsed.tool_calls or []
    ]


def responses_output(parsed: ParsedOutput, tools: list[Any]) -> list[Any]:
    """A parsed winner as Responses output items (openai types): a reasoning item, the
    message, one function_call per call (its call_id the call's id)."""
    from vllm.entrypoints.openai.responses.utils import build_response_output_items

    return build_response_output_items(parsed.reasoning, parsed.content, _function_calls(parsed), tools=tools)


def responses_events(parsed: ParsedOutput, tools: list[Any]) -> tuple[list[Any], list[Any]]:
    """A parsed winner replayed through vLLM's streaming state machine: the events from each
    item's output_item.added to its output_item.done (sequence numbers still unset), and the
    output items they announced."""
    from vllm.entrypoints.generate.base.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall
    from vllm.entrypoints.openai.responses.streaming_events import SimpleStreamingEventProcessor

    deltas = [DeltaMessage(reasoning=parsed.reasoning)] if parsed.reasoning else []
    deltas += [DeltaMessage(content=parsed.content)] if parsed.content else []
    deltas += [
        DeltaMessage(
            tool_calls=[
                DeltaToolCall(
                    index=i,
                    id=c.id,
                    type="function",
                    function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
                )
            ]
        )
        for i, c in enumerate(_function_calls(parsed))
    ]
    processor = SimpleStreamingEventProcessor(tools=tools)
    events: list[Any] = []
    for delta in deltas:
        state, call = processor.resolve_target_state(delta)
        if processor.needs_transition(state, call):
            events += processor.close_current() + processor.open(state, call)
        events += processor.emit_delta(delta, None)
    events += processor.close_current()
    return events, processor.output_items
