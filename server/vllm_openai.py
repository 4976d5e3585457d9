"""The adapter to vLLM's OpenAI layer (pinned to vLLM 0.32's API): with server/vllm_responses.py
(its /v1/responses part), the only code that imports it.

t2serve parses a request with its own narrow models (server.protocol) for what it treats
itself (voting, streaming, its extension fields), and **also with vLLM's own request model**,
whose `to_sampling_params` turns every sampling field into `SamplingParams` exactly as
`vllm serve` does: the model's `generation_config` defaults for fields the request leaves
out (`--generation-config auto|vllm|FOLDER`), `repetition_penalty`, `min_tokens`,
`stop_token_ids`, `logit_bias`, `bad_words`, `allowed_token_ids`, ... So a vLLM client's
sampling fields mean here what they mean there, with no copy of vLLM's rules.

Every other field of vLLM's request model that a request sets to a non-default value is
refused with a 400 naming it (`refused_field`), so nothing that would change the output
is silently dropped; fields neither model knows are ignored with a warning, as vLLM does.
tests/server/test_vllm_openai.py pins the names and behaviour used here.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from server.errors import APIError

logger = logging.getLogger(__name__)

# vLLM request fields t2serve honours through vLLM's to_sampling_params (the chat template
# fields it honours are declared in server.protocol and rendered by server.serving).
SAMPLING_FIELDS = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "logit_bias",
        "bad_words",
        "allowed_token_ids",
        "logprobs",
        "top_logprobs",
        # Structured outputs: every sample is constrained by vLLM; the vote runs over the
        # canonical JSON (server.aggregation).
        "response_format",
        "structured_outputs",
        # Tool calls with `required` or a named function: constrained the same way
        # (constrain_to_tools); the chat template sees `tools` (server.serving).
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        # Read by the response (server.serving.chat_message) from vLLM's request model.
        "include_reasoning",
    }
)
# OpenAI's legacy function calling, which vLLM's model does not know: it would change the
# output, so it is refused rather than ignored.
LEGACY_OPENAI_FIELDS = frozenset({"functions", "function_call"})
# Fields that do not change what is generated (bookkeeping, or streaming cadence: t2serve
# streams the voted winner once the vote ends).
INERT_FIELDS = frozenset({"model", "user", "request_id", "stream", "stream_options", "stream_interval", "n"})


def vllm_request_models() -> tuple[type[BaseModel], type[BaseModel]]:
    """vLLM's chat and completion request models."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return ChatCompletionRequest, CompletionRequest


def vllm_tokenize_models() -> dict[str, type[BaseModel]]:
    """vLLM's /tokenize and /detokenize request and response models, by name (t2serve's own
    in server.protocol keep their field names and defaults; tests/server/test_tokens.py)."""
    from vllm.entrypoints.serve.tokenize import protocol

    names = (
        "TokenizeCompletionRequest",
        "TokenizeChatRequest",
        "TokenizeResponse",
        "DetokenizeRequest",
        "DetokenizeResponse",
    )
    return {name: getattr(protocol, name) for name in names}


def default_sampling_params(model_config: Any) -> dict[str, Any]:
    """The model's sampling defaults as vLLM's server reads them (`generation_config.json`
    under `--generation-config auto`, nothing under `vllm`), e.g. {"temperature": 0.6}."""
    return dict(model_config.get_diff_sampling_param())


def refused_field(body: dict[str, Any], model: type[BaseModel], own_fields: set[str]) -> str | None:
    """The first field of vLLM's request model that t2serve does not honour and `body` sets
    to something other than its default; None if there is none."""
    for name, value in body.items():
        if name in LEGACY_OPENAI_FIELDS and value:
            return name
        if name in own_fields or name in SAMPLING_FIELDS or name in INERT_FIELDS:
            continue
        field = model.model_fields.get(name)
        if field is None:
            continue
        if value is not None and value != field.get_default(call_default_factory=True):
            return name
    return None


def unknown_fields(body: dict[str, Any], model: type[BaseModel], own_fields: set[str]) -> list[str]:
    """Fields neither t2serve nor vLLM knows (vLLM ignores them with a warning too)."""
    known = own_fields | model.model_fields.keys() | LEGACY_OPENAI_FIELDS
    return sorted(name for name in body if name not in known)


def check_fields(body: dict[str, Any], chat: bool, own_fields: set[str], auto_tools: bool = False) -> None:
    """400 naming the first field t2serve cannot honour (`tool_choice: auto` without a
    tool-call parser among them); warn about unknown ones."""
    model = vllm_request_models()[0 if chat else 1]
    if chat and body.get("tools") and body.get("tool_choice", "auto") == "auto" and not auto_tools:
        raise _auto_needs_a_parser()
    name = refused_field(body, model, own_fields)
    if name is not None:
        raise APIError(
            400,
            f"`{name}` is not supported by t2serve (the response is a vote over samples; see the "
            "README, API)",
            param=name,
            code="unsupported_parameter",
        )
    unknown = unknown_fields(body, model, own_fields)
    if unknown:
        logger.warning("The following fields were present in the request but ignored: %s", unknown)


def to_sampling_params(
    body: dict[str, Any],
    chat: bool,
    prompt_len: int,
    context: int,
    defaults: dict[str, Any],
    default_max_tokens: int | None,
    parsers: Parsers | None = None,
) -> tuple[Any, OutputParser]:
    """`SamplingParams` for one prompt of the request `body` (its JSON fields), built by vLLM's
    own request model, and the parser of its samples' outputs. max_tokens: the request's; else
    `default_max_tokens` if the server set one; else vLLM's rule (the context left after the
    prompt, capped by the model's `max_new_tokens` default)."""
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
    from vllm.exceptions import VLLMClientError

    chat_model, completion_model = vllm_request_models()
    model = chat_model if chat else completion_model
    fields = {k: v for k, v in body.items() if k in SAMPLING_FIELDS}
    fields["messages" if chat else "prompt"] = [] if chat else [0]
    if fields.get("structured_outputs") is not None and not isinstance(fields["structured_outputs"], dict):
        # vLLM's before-validator reads it as a mapping and would fail with an AttributeError (a 500).
        raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
    try:
        request = model.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error.get("loc", ())) or None
        raise APIError(400, f"invalid value for {param}: {error.get('msg')}", param=param) from exc
    except VLLMClientError as exc:  # vLLM's model validators (e.g. top_logprobs without logprobs)
        raise invalid_sampling(exc) from exc
    requested = getattr(request, "max_completion_tokens", None) or request.max_tokens
    room = context - prompt_len
    if requested is not None and requested > room:
        raise APIError(
            400,
            f"max_tokens {requested} + prompt {prompt_len} tokens exceeds the context of {context} tokens",
            param="max_completion_tokens"
            if getattr(request, "max_completion_tokens", None)
            else "max_tokens",
            code="context_length_exceeded",
        )
    if requested is None and default_max_tokens is not None:
        requested = min(default_max_tokens, room)
    max_tokens = get_max_tokens(context, requested, prompt_len, defaults)
    try:
        reader = (parsers or NO_PARSERS).for_request(request, chat)
        params = reader.request.to_sampling_params(max_tokens, defaults)
        if reader.tools is not None and not reader.parses_tools:
            constrain_to_tools(params, reader.request)
        if reader.constraint is None or reader.request.structured_outputs is None:
            reader.constraint = params.structured_outputs  # not folded into a structural tag
        return params, reader
    except (ValueError, TypeError, VLLMClientError) as exc:  # vLLM's own checks on the combination
        raise invalid_sampling(exc) from exc


def verify(engine: Any, params: Any, request: BaseModel) -> None:
    """vLLM's checks of the built params against the engine (server.engine.engine.Engine.verify),
    as a 400; a grammar vLLM cannot compile names the field that carried it."""
    from vllm.exceptions import VLLMClientError

    try:
        # On a copy: the structured-output backend rewrites the constraint it validates (e.g. a
        # choice list into a grammar), and the vote reads the constraint as the client sent it.
        engine.verify(copy.deepcopy(params))  # (params.clone() is shallow: skip_clone is set)
    except (ValueError, VLLMClientError) as exc:
        error = invalid_sampling(exc)
        if params.structured_outputs is not None and error.param is None:
            sent = request.model_extra or {}
            error.param = "response_format" if sent.get("response_format") else "structured_outputs"
        raise error from exc


def invalid_sampling(exc: Exception) -> APIError:
    """vLLM's complaint about a sampling field as a 400 naming the field where vLLM's message starts with it."""
    param = getattr(exc, "parameter", None)
    if param is None:  # vLLM's messages start with the field they are about
        first = str(exc).split(" ", 1)[0]
        param = first if first in SAMPLING_FIELDS else None
    return APIError(400, f"invalid sampling parameters: {exc}", param=param, code="invalid_value")


class Parsers:
    """`--reasoning-parser` and `--tool-call-parser`: vLLM's parsers, composed into one class
    by vLLM's ParserManager at start-up exactly as `vllm serve` composes them (a tool-call
    parser enables `tool_choice: auto`, like vLLM's `--enable-auto-tool-choice`)."""

    def __init__(
        self,
        tokenizer: Any,
        reasoning: str | None = None,
        tool_call: str | None = None,
        tool_strict_level: str = "auto",
    ):
        self.tokenizer = tokenizer
        self.reasoning = reasoning
        self.tool_call = tool_call
        self.cls = None
        if not reasoning and not tool_call:
            return
        from vllm.parser.parser_manager import ParserManager
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        for kind, name, manager in (
            ("reasoning", reasoning, ReasoningParserManager),
            ("tool-call", tool_call, ToolParserManager),
        ):
            if name and name not in manager.list_registered():
                raise ValueError(
                    f"unknown {kind} parser {name!r}; vLLM has: {', '.join(manager.list_registered())}"
                )
        if tool_call:
            # Its parser logs a traceback for every sample whose call envelope holds no
            # readable call; t2serve counts those (t2serve_tool_call_samples) instead.
            module = ToolParserManager.get_tool_parser(tool_call).__module__
            logging.getLogger(module).setLevel(logging.CRITICAL)
        self.cls = ParserManager.get_parser(
            tool_parser_name=tool_call,
            reasoning_parser_name=reasoning,
            enable_auto_tools=tool_call is not None,
            tool_strict_level=tool_strict_level,
            tokenizer=tokenizer,
        )

    def for_request(self, request: BaseModel, chat: bool) -> OutputParser:
        """The parser of one request's samples, after adjusting `request` (vLLM's request
        model) as vLLM's renderer does before it builds sampling params: a tool-call parser
        may constrain the calls' format and keep special tokens in the text."""
        parser = None
        # The client's own constraint, before a tool-call parser may fold it into a structural
        # tag (tool_choice auto with response_format: "a call, or this JSON"): the vote reads it.
        constraint = request.extract_structured_outputs() if chat else None
        if self.cls is not None and (chat or self.reasoning):
            parser = self.cls(self.tokenizer, getattr(request, "tools", None))
            adjust = chat and (self.reasoning or getattr(request, "tool_choice", "none") != "none")
            if adjust:
                request = parser.adjust_request(request)
        tools = tool_calls_mode(request, auto_tools=self.tool_call is not None) if chat else None
        reader = OutputParser(parser, request, tools, reasoning=self.reasoning is not None)
        reader.constraint = constraint
        return reader


NO_PARSERS = Parsers(tokenizer=None)


@dataclass
class ParsedOutput:
    """A sample's text as the response carries it."""

    reasoning: str | None
    content: str | None
    tool_calls: list[dict[str, Any]] | None  # OpenAI shape, None when it makes no call
    # With a tool-call parser and tools: "call", "text", or "malformed" (a call envelope the
    # parser could read no call from; the sample then votes with its text).
    tool_outcome: str | None = None


class OutputParser:
    """One request's samples read as vLLM's server reads its outputs: the reasoning split off
    by the reasoning parser, tool calls found by the tool-call parser (vLLM's `Parser.parse`);
    with no tool-call parser, named/required calls are the JSON t2serve constrained them to
    (constrain_to_tools)."""

    def __init__(self, parser: Any, request: BaseModel, tools: ToolCalls | None, reasoning: bool):
        self.parser = parser
        self.request = request
        self.tools = tools
        self.has_reasoning = reasoning
        # The structured-outputs constraint the client asked for (vLLM's
        # StructuredOutputsParams; None: free text), which the vote's aggregator follows.
        self.constraint: Any = None
        # vLLM's tool-call parsers find calls themselves, constrained or not.
        self.parses_tools = parser is not None and getattr(parser, "tool_parser", None) is not None

    def parse(self, text: str) -> ParsedOutput:
        if self.parser is None:
            reasoning, content = None, text
        elif self.parses_tools and self.tools is not None:
            reasoning, content, calls = self.parser.parse(text, self.request, enable_auto_tools=True)
            shaped = [_openai_call(c.name, c.arguments, c.id) for c in calls or []]
            start = getattr(self.parser.tool_parser, "tool_call_start_token", None)
            outcome = "call" if shaped else "malformed" if start and start in (content or "") else "text"
            return ParsedOutput(reasoning, content, shaped or None, outcome)
        else:
            reasoning, content = self.parser.extract_reasoning(text, self.request)
        calls = tool_calls_of(content, self.tools) if self.tools is not None and content else None
        return ParsedOutput(reasoning, None if calls else content, calls)

    def reasoning_tokens(self, token_ids: Any) -> int | None:
        if not self.has_reasoning:
            return None
        return int(self.parser.count_reasoning_tokens(list(token_ids)))


class _LogprobFormatter:
    """vLLM's own OpenAI logprob builders, bound to a minimal object: they are methods of
    vLLM's serving classes that read no serving state beyond the two attributes set here."""

    def __init__(self) -> None:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

        self.return_tokens_as_token_ids = False
        self._get_decoded_token = OpenAIServingChat._get_decoded_token
        self._get_top_logprobs = OpenAIServingChat._get_top_logprobs.__get__(self)
        self.chat = OpenAIServingChat._create_chat_logprobs.__get__(self)
        self.completion = OpenAIServingCompletion._create_completion_logprobs.__get__(self)


_FORMATTER: _LogprobFormatter | None = None


def _formatter() -> _LogprobFormatter:
    global _FORMATTER
    if _FORMATTER is None:
        _FORMATTER = _LogprobFormatter()
    return _FORMATTER


def chat_logprobs(token_ids: Any, logprobs: Any, top_logprobs: int, tokenizer: Any) -> dict[str, Any]:
    """A chat choice's `logprobs` object ({"content": [...]}) for one sample's tokens, as
    vLLM's chat server builds it."""
    built = _formatter().chat(token_ids, logprobs, tokenizer, num_output_top_logprobs=top_logprobs)
    return built.model_dump(exclude_none=False)


def completion_logprobs(token_ids: Any, logprobs: Any, top_logprobs: int, tokenizer: Any) -> dict[str, Any]:
    """A completion choice's `logprobs` object (tokens, token_logprobs, top_logprobs,
    text_offset), as vLLM's completions server builds it."""
    built = _formatter().completion(token_ids, logprobs, top_logprobs, tokenizer)
    return built.model_dump(exclude_none=False)


@dataclass(frozen=True)
class ToolCalls:
    """How a request's samples call tools: `named` (one call of `function`, constrained to its
    arguments object), `required` (constrained to a list of {"name", "parameters"}) or `auto`
    (free text, in which the tool-call parser finds calls)."""

    mode: Literal["named", "required", "auto"]
    function: str | None = None


def tool_calls_mode(request: BaseModel, auto_tools: bool) -> ToolCalls | None:
    """What the request's (vLLM's request model) `tools` / `tool_choice` ask of each sample
    (None: no tool calls). `auto` needs a tool-call parser (--tool-call-parser) to find calls
    in free text; without one it is a 400 naming `tool_choice`, as in vLLM."""
    tools, choice = getattr(request, "tools", None), getattr(request, "tool_choice", None)
    if not tools or choice in (None, "none"):
        return None
    if choice == "required":
        return ToolCalls("required")
    if not isinstance(choice, str):
        return ToolCalls("named", choice.function.name)
    if auto_tools:
        return ToolCalls("auto")
    raise _auto_needs_a_parser()


def _auto_needs_a_parser() -> APIError:
    return APIError(
        400,
        "tool_choice 'auto' needs a tool-call parser: start t2serve with --tool-call-parser NAME "
        "(vLLM's parsers, e.g. hermes), or use 'required' or a named function (both constrained by "
        "vLLM's structured outputs), or 'none'",
        param="tool_choice",
        code="unsupported_parameter",
    )


def constrain_to_tools(params: Any, request: BaseModel) -> None:
    """Constrain every sample to the tool call(s) `request` (vLLM's request model) asks for,
    with vLLM's own schema (what its tool parsers use for `required` / a named function)."""
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    schema = get_json_schema_from_tools(request.tool_choice, request.tools, request.parallel_tool_calls)
    if schema is None:
        return
    if params.structured_outputs is not None:
        raise APIError(400, "tool calls cannot be combined with response_format", param="response_format")
    params.structured_outputs = StructuredOutputsParams(json=schema)


def tool_calls_of(text: str, tools: ToolCalls) -> list[dict[str, Any]] | None:
    """The OpenAI `tool_calls` of a sample constrained to JSON calls; None if it is not one."""
    if tools.mode == "auto":
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if tools.mode == "named":
        calls = [(tools.function, value)]
    elif isinstance(value, list):
        calls = [(c.get("name"), c.get("parameters", {})) for c in value if isinstance(c, dict)]
    else:
        return None
    return [_openai_call(name, json.dumps(arguments, ensure_ascii=False)) for name, arguments in calls]


def _openai_call(name: str | None, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {
        "id": call_id or f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
