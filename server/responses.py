"""/v1/responses on top of chat completions: a Responses request becomes the chat request the
server already serves (the same voting, policies, limits and `t2`), and the voted winner
becomes an OpenAI Response (openai.types.responses).

  begin     the routed request (and the transcript `previous_response_id` names) -> a
            ResponsesTurn holding its chat request; every malformed input a 400 naming the
            Responses field (`input.3`, `tools.0`, `text.format`, ...)
  rename    a chat 400 under the Responses name of its field
  finish    the winner's message -> the Response (output items, status, usage, `t2`) and, for a
            stream, its item events; stored when the turn holds room in the store
  pending   the Response as the stream opens it (in progress, no output yet)

vLLM's conversions do the item work (server.vllm_responses); the stream
is framed in server.response_events and the store is server.response_store.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from openai.types.responses import Response, ResponseError, ResponseUsage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import ValidationError

from server import vllm_openai, vllm_responses
from server.errors import APIError
from server.protocol import ChatCompletionRequest, ChatMessageOut, ResponsesCreateRequest, T2Info, Usage
from server.response_store import ResponseStore

# Content parts read as text; any other part (images, files, refusals) is a 400.
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
# Input item types the conversion reads (besides messages).
ITEM_TYPES = frozenset({"message", "function_call", "function_call_output", "reasoning"})
# What a chat message keeps of a converted one (vLLM leaves `type`, ids and statuses in).
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning")
# Chat field -> the Responses field a client set it with (for 400s raised by the chat path).
RESPONSES_NAMES = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "messages": "input",
}


@dataclass
class ResponsesTurn:
    """One /v1/responses request: what it asked (vLLM's ResponsesRequest), the chat request
    it runs as, and the messages it renders (the transcript so far)."""

    request: Any  # vLLM's ResponsesRequest
    chat: ChatCompletionRequest
    messages: list[dict[str, Any]]
    asked_store: bool | None  # the request's `store` (None: left out)
    stream: bool
    id: str
    created_at: int
    stored: bool = False  # room is held in the store (server.response_store.ResponseStore.reserve)


@functools.cache
def extension_fields() -> frozenset[str]:
    """t2serve's own chat fields (parallelism, policy, aggregate, ...): a Responses request
    takes them as chat does."""
    vllm_chat, _ = vllm_openai.vllm_request_models()
    return frozenset(ChatCompletionRequest.model_fields) - frozenset(vllm_chat.model_fields)


def begin(body: ResponsesCreateRequest, store: ResponseStore, served_model: str) -> ResponsesTurn:
    """The chat request a Responses request runs as; 400 naming the field for anything that
    cannot run (the store's room is held later, once the chat request is prepared)."""
    sent = body.model_dump(exclude_unset=True, mode="json")
    extension = {name: sent.pop(name) for name in extension_fields() if name in sent}
    request = vllm_responses.responses_request(sent)
    if not isinstance(request.input, str):
        for i, item in enumerate(request.input):
            check_item(i, item if isinstance(item, dict) else item.model_dump())
    previous = store.transcript(request.previous_response_id) if request.previous_response_id else None
    messages = [chat_message(m) for m in vllm_responses.responses_messages(request, previous)]
    chat: dict[str, Any] = {
        "model": request.model or served_model,
        "messages": messages,
        **{name: sent[name] for name in vllm_responses.responses_sampling_fields() if name in sent},
        **extension,
        **chat_tools(request),
        **template_fields(request),
    }
    if request.max_output_tokens is not None:
        chat["max_completion_tokens"] = request.max_output_tokens
    if request.text is not None and request.text.format is not None:
        response_format = chat_response_format(request.text.format)
        if response_format is not None:
            chat["response_format"] = response_format
    if request.user is not None:
        chat["user"] = request.user
    try:
        chat_request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = RESPONSES_NAMES.get(str(error["loc"][0]), ".".join(str(p) for p in error["loc"]))
        raise APIError(400, f"{param}: {error['msg']}", param=param, code="invalid_value") from exc
    return ResponsesTurn(
        request=request,
        chat=chat_request,
        messages=messages,
        asked_store=body.store,
        stream=body.stream,
        id=f"resp_{uuid.uuid4().hex}",
        created_at=int(time.time()),
    )


def check_item(index: int, item: dict[str, Any]) -> None:
    """400 naming `input.{index}` for an item the conversion cannot read as text and calls."""
    param = f"input.{index}"
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind not in ITEM_TYPES:
        raise APIError(
            400, f"{param}: item type {kind!r} is not supported", param=param, code="invalid_value"
        )
    content = item.get("content") if kind == "message" else item.get("output")
    if kind in ("message", "function_call_output") and not isinstance(content, str):
        if not content:
            raise APIError(400, f"{param}: content is empty", param=param, code="invalid_value")
        for part in content:
            if part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"{param}: content part {part.get('type')!r} is not supported (text parts only)",
                    param=param,
                    code="invalid_value",
                )


def chat_message(message: dict[str, Any]) -> dict[str, Any]:
    """A converted message as chat takes it: text content, no item bookkeeping."""
    shaped = {key: message[key] for key in MESSAGE_KEYS if message.get(key) is not None}
    content = message.get("content")
    if isinstance(content, list):
        shaped["content"] = "".join(part["text"] for part in content)
    if "tool_calls" in shaped:
        shaped["tool_calls"] = [dict(call) for call in shaped["tool_calls"]]
    return shaped


def chat_tools(request: Any) -> dict[str, Any]:
    """`tools` and `tool_choice` in chat's shape; only function tools and choices."""
    for i, tool in enumerate(request.tools):
        if tool.type != "function":
            raise APIError(
                400,
                f"tools.{i}: tool type {tool.type!r} is not supported (function tools only)",
                param=f"tools.{i}",
                code="unsupported_parameter",
            )
    tools = vllm_responses.responses_tools(request)
    if not tools:
        return {}
    choice = request.tool_choice
    if not isinstance(choice, str):
        if getattr(choice, "type", None) != "function":
            raise APIError(
                400,
                f"tool_choice: {getattr(choice, 'type', choice)!r} is not supported (none, auto, "
                "required or a function)",
                param="tool_choice",
                code="unsupported_parameter",
            )
        choice = {"type": "function", "function": {"name": choice.name}}
    return {"tools": tools, "tool_choice": choice}


def template_fields(request: Any) -> dict[str, Any]:
    """Chat's template fields from vLLM's reading of the request (reasoning.effort and
    chat_template_kwargs into the template's kwargs)."""
    kwargs = vllm_responses.responses_template_kwargs(request)
    fields: dict[str, Any] = {
        "add_generation_prompt": kwargs.pop("add_generation_prompt"),
        "continue_final_message": kwargs.pop("continue_final_message"),
    }
    if kwargs:
        fields["chat_template_kwargs"] = kwargs
    return fields


def chat_response_format(text_format: Any) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    if text_format.type == "json_object":
        return {"type": "json_object"}
    if text_format.type == "json_schema":
        spec = {"name": text_format.name, "schema": text_format.schema_}
        if text_format.strict is not None:
            spec["strict"] = text_format.strict
        return {"type": "json_schema", "json_schema": spec}
    return None


def rename(error: APIError) -> None:
    """Put a chat 400 under the Responses name of its field (in `param` and the message)."""
    head = (error.param or "").split(".")[0]
    if head in RESPONSES_NAMES:
        error.param = RESPONSES_NAMES[head]
        for chat_name, name in RESPONSES_NAMES.items():
            error.message = re.sub(rf"\b{chat_name}\b", name, error.message)


def finish(
    turn: ResponsesTurn,
    message: ChatMessageOut,
    finish_reason: str | None,
    usage: Usage,
    t2: T2Info,
    store: ResponseStore,
    streamed: bool,
) -> tuple[Response, list[Any]]:
    """The Response of the voted `message` and, when `streamed`, the item events announcing
    its output (the same items, ids included); stored if the turn holds room."""
    parsed = vllm_openai.ParsedOutput(message.reasoning, message.content, message.tool_calls)
    tools = turn.request.tools
    if streamed:
        events, output = vllm_responses.responses_events(parsed, tools)
    else:
        events, output = [], vllm_responses.responses_output(parsed, tools)
    incomplete = finish_reason == "length"
    response = pending(
        turn,
        status="incomplete" if incomplete else "completed",
        output=output,
        incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
        usage=response_usage(usage),
        t2=t2.model_dump(),
    )
    if turn.stored:
        reply = {"role": "assistant", **message.model_dump(include={"content", "reasoning", "tool_calls"})}
        transcript = [*turn.messages, {k: v for k, v in reply.items() if v is not None}]
        store.put(turn.id, response.model_dump(mode="json", by_alias=True), transcript)
    return response, events


def pending(turn: ResponsesTurn, status: str = "in_progress", **fields: Any) -> Response:
    """The turn's Response with what the request asked echoed; `fields` fill in the rest."""
    request = turn.request
    return Response(
        id=turn.id,
        object="response",
        created_at=turn.created_at,
        model=turn.chat.model,
        status=status,
        output=fields.pop("output", []),
        instructions=request.instructions,
        metadata=request.metadata,
        parallel_tool_calls=request.parallel_tool_calls is not False,
        tool_choice=_dumped(request.tool_choice),
        tools=[_dumped(tool) for tool in request.tools],
        text=_dumped(request.text),
        reasoning=_dumped(request.reasoning),
        temperature=request.temperature,
        top_p=request.top_p,
        max_output_tokens=request.max_output_tokens,
        previous_response_id=request.previous_response_id,
        user=request.user,
        store=turn.stored,
        **fields,
    )


def failed(turn: ResponsesTurn, error: APIError) -> Response:
    """The turn's Response after `error` (a stream's response.failed)."""
    code = "rate_limit_exceeded" if error.status == 429 else "server_error"
    return pending(turn, status="failed", error=ResponseError(code=code, message=error.message))


def response_usage(usage: Usage) -> ResponseUsage:
    """Chat's usage (every sample's tokens) under the Responses names."""
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    reasoning = (usage.completion_tokens_details or {}).get("reasoning_tokens", 0)
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=0),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning),
        total_tokens=usage.total_tokens,
    )


def _dumped(value: Any) -> Any:
    """vLLM's copies of openai types as plain values (Response reads them as its own)."""
    return value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value
