"""OpenAI-shaped request and response models, plus t2serve's extension fields.

Kept free of serving logic (like vLLM's `entrypoints/openai/protocol.py`). Extension fields
arrive in the body (the official SDK's `extra_body`):
  parallelism:      int N (samples per choice) or "auto" (the estimator picks N)
  max_parallelism:  upper bound for N under "auto"
  policy:           sampling policy for "auto", e.g. "esc:window=4,max=8" (default: --policy)
  aggregate:        what free-text samples vote with: answer, consensus, usc, auto
                    (default: --aggregate)
  max_total_tokens: tokens all samples may generate together (default and ceiling:
                    --max-request-tokens)
  t2_explore:       admin-only (an --admin-key Bearer token): run at N_max and record
                    (server.exploration)
and come back in the response's `t2` object.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 128
MAX_STOP = 16


class OpenAIModel(BaseModel):
    # Fields these models do not declare are kept (`model_extra`): vLLM's own request model
    # turns its sampling fields into SamplingParams, and any other field vLLM knows but
    # t2serve does not honour is refused by name (server.vllm_openai); unknown ones are
    # ignored with a warning, as vLLM does, so newer SDKs keep working.
    model_config = ConfigDict(extra="allow")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str
    n: int = Field(default=1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)  # int32 in the engine; msgpack caps at 2**64
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # Bounded so the engine's torch generator accepts it (and seed + i for the fan-out).
    seed: int | None = Field(default=None, ge=0, le=2**62)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extension: keep sampling past the end-of-sequence token (load tests, benchmarks).
    ignore_eos: bool = False
    # t2serve extensions
    parallelism: int | Literal["auto"] | None = None
    max_parallelism: int | None = Field(default=None, ge=1)
    policy: str | None = Field(default=None, max_length=200)
    # what free-text samples vote with (default: --aggregate); constrained outputs vote on
    # their canonical JSON / calls whatever this says
    aggregate: Literal["answer", "consensus", "usc", "auto"] | None = None
    # seconds; the server's --request-timeout bounds it (docs/operating.md#timeouts)
    timeout: float | None = Field(default=None, gt=0, le=86_400)
    # tokens all of the request's samples may generate together; the server's
    # --max-request-tokens is the default and the ceiling (server/budget.py)
    max_total_tokens: int | None = Field(default=None, ge=1)
    # admin-only (a Bearer key from --admin-key): run at N_max and record (server.exploration)
    t2_explore: bool | None = None

    @field_validator("parallelism")
    @classmethod
    def _positive_parallelism(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("parallelism must be >= 1 or 'auto'")
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # The returned choice's own token log-probs (the winning sample's); every sample then
    # carries them, which costs throughput (README, API).
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Chat template inputs (vLLM's fields; server.serving renders with them).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)  # the winner's, with this many alternatives

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts one at a time: a string or one token list is a single prompt."""
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


# -- /tokenize, /detokenize (vLLM's shapes; tests/server/test_tokens.py pins them) ------


class TokenizeCompletionRequest(OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- /v1/responses (server.responses) ---------------------------------------------------


class ResponsesCreateRequest(OpenAIModel):
    """POST /v1/responses as routed: OpenAI's Responses fields, typed loosely here. vLLM's own
    ResponsesRequest then reads the items, tools and formats (server.vllm_openai), and the
    chat request they become checks the rest: t2serve's extension fields (parallelism,
    policy, aggregate, max_total_tokens, timeout, ...) and vLLM's sampling extras arrive as
    extra fields and mean what they mean in chat."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None  # None: stored when the store has room (the response says which)
    previous_response_id: str | None = None
    stream: bool = False


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: Literal[True] = True


# -- responses -------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # every sampled token of every sample, not just the winner's
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: dict[str, int] | None = None  # {"reasoning_tokens": n} with a reasoning parser


class VoteInfo(BaseModel):
    answer: str | None
    votes: dict[str, int]
    agreement: float
    tie: bool


class T2Info(BaseModel):
    """t2serve's extension object: how much parallel thinking this request got."""

    mode: Literal["auto", "fixed"]
    n_used: int  # samples per choice
    n_max: int  # N_max: what a fixed-N deployment uses (the head's N_max, else the default N)
    max_parallelism: int  # the per-choice cap this request ran under
    prediction: float | None = None  # estimator output, N*/N_max in [0, 1], when one ran
    samples: int  # samples dispatched for the whole request (n_used * n choices * prompts)
    estimator: str  # which estimator chose N ("default" until a head is loaded)
    # the head's version (content hash @ load time, server.head_reload): which head a reload
    # had swapped in when this request was planned; None without a head
    head: str | None = None
    capture_ms: float | None = None  # prefill hidden-state capture latency
    load_cap: int | None = None  # auto: per-choice cap on N after the load curve
    timed_out: bool = False  # the deadline hit: the vote is over the samples finished by then
    # the token budget ran out: the vote is over the samples finished by then (or, for a
    # choice with none, its partial samples)
    budget_exhausted: bool = False
    max_total_tokens: int | None = None  # the token budget this request ran under
    policy: str  # the sampling policy that ran, as its spec (e.g. "t2:margin=1.5", "esc:window=4,max=8")
    # what the samples voted with (server.aggregation): answer, consensus, usc, json, exact,
    # auto:answer / auto:consensus (which kind of key won under `auto`), or consensus:mbr /
    # usc:mbr / auto:mbr (no group won: the medoid of all samples was returned)
    aggregate: str = "answer"
    usc: dict[str, int] | None = None  # the self-consistency pass: passes, prompt/completion tokens
    gate: str | None = None  # answerable / open_ended / unfamiliar: where the head's gate sent it
    # answerable: the multiple of T2's margin the gate applied (1 near the head's training
    # questions, rising toward the unfamiliarity radius; estimator.gate)
    margin_scale: float | None = None
    # why `auto` used the default N instead of the head's prediction: "temperature" (the
    # request samples unlike the head's labels, --estimator-temperature-tolerance)
    estimator_fallback: str | None = None
    open_ended: bool | None = None  # `aggregate: auto` found free text and stopped early
    # ran at N_max samples, none stopped early, for the live gauge and the traffic records
    # (--explore-share, or `t2_explore` with an admin key); the answer is the N_max vote
    explored: bool | None = None
    launched: int  # samples sent to the engine (all prompts and choices)
    finished: int  # of those, samples that finished and voted
    aborted: int  # of those, samples aborted (early stop or deadline); their tokens count in usage
    answer: str | None
    votes: dict[str, int]
    agreement: float
    choices: list[VoteInfo] | None = None  # per-choice votes when n > 1


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # With --reasoning-parser, the winner's reasoning: vLLM 0.32's `reasoning`, and the
    # `reasoning_content` name earlier vLLM versions (and their clients) use.
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI shape: id, type, function{name, arguments}


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None  # the winning sample's own, when asked for


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _completion_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    t2: T2Info


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None  # the winning sample's own, when asked for


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _completion_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    t2: T2Info


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None  # the winning sample's own, when asked for


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    t2: T2Info | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    t2: T2Info | None = None


class HeadCard(BaseModel):
    """The estimator head a server runs (server.head_reload): `/v1/models`' `t2_head` and
    what `POST /admin/head` answers."""

    version: str  # content hash of the head's files @ load time (UTC)
    spec: str  # what was loaded: a path, or "default" (the shipped head)
    identity: str  # the model state space it reads (T2Head.identity)
    n_max: int
    margin: float  # T2's margin in use
    stopping: bool  # it carries a learned stopping table (t2+learned)
    gate: bool  # it carries a gate (answerable / open-ended / unfamiliar)


class HeadReloadRequest(BaseModel):
    """`POST /admin/head`: the head to swap in."""

    model_config = ConfigDict(extra="forbid")
    head: str = Field(
        description="a head's path (<head>.json / .safetensors) or 'default' (the shipped head)"
    )
    margin: float | None = Field(
        default=None, gt=0, description="T2's margin with it (default: --estimator-margin, else the head's)"
    )
    policy: str | None = Field(
        default=None,
        max_length=4096,
        description="the policy `auto` runs, swapped with the head in one step (a spec, or @PATH: the policy "
        "of `t2serve tune`'s JSON; default: the one in use)",
    )


class PolicyCard(BaseModel):
    """The policy `auto` runs when a request names none (server.head_reload): `/v1/models`'
    `t2_policy` and what `POST /admin/policy` answers."""

    policy: str  # as a response's t2.policy names it (every knob)
    spec: str  # what was asked for: a spec, or @PATH (`t2serve tune`'s JSON)
    version: str  # content hash of the spec @ load time (UTC)


class PolicyReloadRequest(BaseModel):
    """`POST /admin/policy`: the policy to swap in (the head stays)."""

    model_config = ConfigDict(extra="forbid")
    policy: str = Field(
        max_length=4096, description="a policy spec, or @PATH: the policy of `t2serve tune`'s JSON"
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "t2serve"
    root: str | None = None
    max_model_len: int | None = None
    dtype: str | None = None  # t2serve: the engine's dtype (`--dtype auto` resolved for this machine)
    t2_head: HeadCard | None = None  # t2serve: the estimator head in use (None: no head)
    t2_policy: PolicyCard | None = None  # t2serve: the policy `auto` runs


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
