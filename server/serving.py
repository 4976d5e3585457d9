"""The OpenAI endpoints' logic, one template for every endpoint (server.requests):

  prepare   every check a request can fail, before it takes an admission slot: the model
            (404), the fields t2serve cannot honour, the plan (server.parallel.Plan), the
            prompts (chat template, context length), vLLM's own checks of the sampling
            params, the aggregate (400)
  run       parallel thinking for each prompt (server.parallel), then the OpenAI-shaped
            response or SSE stream

Engine errors surface here and become HTTP errors (503 for a dead engine). Routes in
`server.app` stay thin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from server import aggregation, metrics, prompts, response_events, responses, result, sampling, vllm_openai
from server.budget import TokenBudget
from server.config import ServerSettings
from server.engine.engine import Engine, EngineDead, EngineRejected
from server.engine.model_store import tool_call_parser_of
from server.errors import APIError, check_model, engine_dead_error, error_event
from server.exploration import Exploration
from server.parallel import Deadline, ParallelThinker, Plan
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ResponsesCreateRequest,
    SamplingFields,
)
from server.requests import RequestContext
from server.response_store import ResponseStore
from server.result import ThinkingResult
from server.samples import Sample

logger = logging.getLogger(__name__)

# One prompt's validated SamplingParams and the parser of its samples' outputs.
PromptSampling = tuple[Any, vllm_openai.OutputParser]


def tool_call_parser(settings: ServerSettings) -> str | None:
    """--tool-call-parser, with `auto` resolved to what the model folder's template writes."""
    name = settings.parallelism.tool_call_parser
    return tool_call_parser_of(settings.engine.model) if name == "auto" else name


class OpenAIServing:
    def __init__(self, engine: Engine, thinker: ParallelThinker, settings: ServerSettings):
        self.engine = engine
        self.thinker = thinker
        self.settings = settings
        # --reasoning-parser / --tool-call-parser (vLLM's), checked at start-up.
        self.parsers = vllm_openai.Parsers(
            engine.tokenizer,
            reasoning=settings.parallelism.reasoning_parser,
            tool_call=tool_call_parser(settings),
            tool_strict_level=settings.parallelism.tool_strict_level,
        )
        # --explore-share, t2_explore: requests run at N_max, replayed and recorded.
        self.exploration = Exploration(settings, thinker, engine)
        # /v1/responses: stored responses (GET, DELETE, previous_response_id).
        self.response_store = ResponseStore(settings.responses)

    # -- prepare: every check, before admission -------------------------------------------

    def prepare(self, ctx: RequestContext) -> None:
        """Fill `ctx` with the plan, prompts and sampling params; 404 for another model,
        400 naming the field for anything that cannot run."""
        if isinstance(ctx.request, ResponsesCreateRequest):
            self.prepare_responses(ctx, ctx.request)
            return
        request = ctx.request
        ctx.plan = self.exploration.plan(self.plan(request), request, ctx.admin)
        if isinstance(request, ChatCompletionRequest):
            ctx.prompts = [
                prompts.chat_prompt(
                    self.engine.tokenizer,
                    request.messages,
                    tools=(request.model_extra or {}).get("tools"),
                    add_generation_prompt=request.add_generation_prompt,
                    continue_final_message=request.continue_final_message,
                    chat_template_kwargs=request.chat_template_kwargs,
                )
            ]
        else:
            ctx.prompts = prompts.completion_prompts(self.engine.tokenizer, request)
        ctx.token_budget = self.token_budget(request)
        ctx.sampling = [self.sampling_params(request, len(p), ctx.token_budget) for p in ctx.prompts]
        ctx.timeout_s = self.timeout_s(request)

    def prepare_responses(self, ctx: RequestContext, body: ResponsesCreateRequest) -> None:
        """/v1/responses: the chat request it becomes, prepared as chat (400s under the
        Responses names), then room in the store if it is to be stored."""
        turn = responses.begin(body, self.response_store, self.engine.info.name)
        ctx.responses, ctx.request = turn, turn.chat
        try:
            self.prepare(ctx)
        except APIError as exc:
            responses.rename(exc)
            raise
        turn.stored = self.response_store.reserve(turn.id, turn.asked_store)
        ctx.on_done.append(lambda: self.response_store.release(turn.id))

    def plan(self, request: SamplingFields) -> Plan:
        """How the request samples (server.parallel.Plan), resolved once; 404 for another
        model, 400 for fields t2serve cannot honour or a plan that cannot run."""
        check_model(request.model, self.engine.info.name)
        body = sampling.request_body(request)
        chat = isinstance(request, ChatCompletionRequest)
        vllm_openai.check_fields(
            body,
            chat=chat,
            own_fields=set(type(request).model_fields),
            auto_tools=bool(self.parsers.tool_call),
        )
        temperature = request.temperature
        if temperature is None:  # the model's generation_config default, as the samples get it
            temperature = self.engine.default_sampling.get("temperature")
        return self.thinker.plan(
            request.parallelism,
            max_parallelism=request.max_parallelism,
            policy=request.policy,
            n_choices=request.n,
            prompts=len(request.prompts()) if isinstance(request, CompletionRequest) else 1,
            temperature=temperature,
            aggregate=request.aggregate,
        )

    def sampling_params(
        self, request: SamplingFields, prompt_len: int, token_budget: int | None = None
    ) -> PromptSampling:
        """One prompt's validated SamplingParams and the parser of its samples' outputs."""
        params, reader = sampling.from_request(
            request,
            prompt_len,
            context=self.engine.info.max_model_len,
            defaults=self.engine.default_sampling,
            default_max_tokens=self.settings.default_max_tokens,
            parsers=self.parsers,
            token_budget=token_budget,
        )
        vllm_openai.verify(self.engine, params, request)
        if request.aggregate not in (None, "auto") and (
            aggregation.constrained(reader.constraint)
            or (reader.tools is not None and reader.tools.mode != "auto")
        ):
            raise APIError(
                400,
                f"aggregate '{request.aggregate}' cannot apply: the output is constrained (JSON, a choice "
                "or tool calls), and such samples vote on its canonical form; leave `aggregate` out",
                param="aggregate",
                code="invalid_value",
            )
        return params, reader

    def token_budget(self, request: SamplingFields) -> int | None:
        """The tokens the request's samples may generate together: its `max_total_tokens`,
        else --max-request-tokens; asking for more than that ceiling is a 400."""
        ceiling = self.settings.limits.max_request_tokens
        asked = request.max_total_tokens
        if asked is not None and ceiling is not None and asked > ceiling:
            raise APIError(
                400,
                f"max_total_tokens {asked} exceeds this server's limit of {ceiling} tokens per request",
                param="max_total_tokens",
                code="invalid_value",
            )
        return asked if asked is not None else ceiling

    def timeout_s(self, request: SamplingFields) -> float | None:
        """The request's deadline: its own `timeout`, bounded by --request-timeout."""
        limits = [t for t in (request.timeout, self.settings.limits.request_timeout_s) if t is not None]
        return min(limits) if limits else None

    # -- run: think, then shape the reply --------------------------------------------------

    async def run(self, ctx: RequestContext) -> Any:
        """The endpoint's response model, or its SSE stream (an async iterator of events)."""
        if ctx.responses is not None:
            turn = ctx.responses
            if turn.stream:
                return response_events.stream(turn, lambda: self._responses_outcome(ctx, turn, streamed=True))
            response, _ = await self._responses_outcome(ctx, turn, streamed=False)
            return response
        if isinstance(ctx.request, ChatCompletionRequest):
            if ctx.request.stream:
                return self._chat_stream(ctx, ctx.request)
            return self._chat_response(ctx, ctx.request, await self.think(ctx))
        assert isinstance(ctx.request, CompletionRequest)
        if ctx.request.stream:
            return self._completion_stream(ctx, ctx.request)
        results = await self.think(ctx)
        return CompletionResponse(
            id=f"cmpl-{ctx.request_id}",
            model=ctx.request.model,
            choices=self.completion_choices(ctx.request, results),
            usage=result.usage(results),
            t2=result.t2_info(results, ctx.token_budget),
        )

    async def think(self, ctx: RequestContext) -> list[ThinkingResult]:
        """Every prompt's vote, concurrently, under one deadline; an engine error becomes
        its HTTP error."""
        assert ctx.plan is not None
        # One deadline and one token budget for the whole request, all its prompts.
        deadline = Deadline(ctx.timeout_s)
        most = None
        if ctx.token_budget is not None:  # then every sample's max_tokens is set (sampling.from_request)
            plan = ctx.plan
            most = plan.prompts * plan.n_choices * plan.cap * max(p.max_tokens for p, _ in ctx.sampling)
        budget = TokenBudget(self.engine, ctx.token_budget, most=most)
        tasks = [
            asyncio.ensure_future(
                self.thinker.run(
                    prompt,
                    params,
                    ctx.plan,
                    request_id=f"{ctx.engine_id}-p{i}",
                    deadline=deadline,
                    budget=budget,
                    reader=reader,
                )
            )
            for i, (prompt, (params, reader)) in enumerate(zip(ctx.prompts, ctx.sampling, strict=True))
        ]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException as exc:
            # One prompt failed (or the client left): stop the others' samples too.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(exc, EngineDead):
                raise engine_dead_error() from exc
            if isinstance(exc, EngineRejected):  # vLLM's checks ran in prepare(); a last guard
                raise APIError(400, f"the engine rejected the request: {exc}", code="invalid_value") from exc
            raise
        finally:
            deadline.cancel()
            await budget.close()
        # The voted text is the first content a client gets, streaming or not.
        admitted = ctx.admitted if ctx.admitted is not None else ctx.started
        metrics.TIME_TO_FIRST_TOKEN.labels(ctx.endpoint).observe(time.monotonic() - admitted)
        for r in results:
            result.record(r)
        if ctx.plan.explore:
            self.exploration.observe(ctx, results)
        metrics.REQUEST_TOKENS.observe(sum(r.completion_tokens for r in results))
        if any(r.budget_exhausted for r in results):
            metrics.BUDGET_EXHAUSTED.inc()
        return list(results)

    # -- chat -----------------------------------------------------------------------------

    def _chat_response(
        self, ctx: RequestContext, request: ChatCompletionRequest, results: list[ThinkingResult]
    ) -> ChatCompletionResponse:
        (thought,) = results
        reader = ctx.sampling[0][1]
        return ChatCompletionResponse(
            id=f"chatcmpl-{ctx.request_id}",
            model=request.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=finish,
                    logprobs=self.chat_logprobs(request, c.winner),
                )
                for i, c in enumerate(thought.choices)
                for message, finish in [chat_message(c.winner, reader)]
            ],
            usage=result.usage(results),
            t2=result.t2_info(results, ctx.token_budget),
        )

    async def _chat_stream(self, ctx: RequestContext, request: ChatCompletionRequest) -> AsyncIterator[str]:
        chunk_id, created = f"chatcmpl-{ctx.request_id}", int(time.time())
        reader = ctx.sampling[0][1]

        def chunk(choices: list[ChatChunkChoice], **extra: Any) -> str:
            body = ChatCompletionChunk(
                id=chunk_id, created=created, model=request.model, choices=choices, **extra
            )
            return sse(body.model_dump(exclude_none=True))

        # The role goes out at once so clients see the stream open while samples run.
        yield chunk(
            [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(request.n)
            ]
        )
        try:
            results = await self.think(ctx)
        except Exception as exc:
            yield stream_error(exc)
            return
        (thought,) = results
        finishes = []
        for i, c in enumerate(thought.choices):
            message, finish = chat_message(c.winner, reader)
            finishes.append(finish)
            calls = [{"index": k, **call} for k, call in enumerate(message.tool_calls or [])] or None
            delta = DeltaMessage(
                reasoning=message.reasoning,
                reasoning_content=message.reasoning_content,
                content=message.content,
                tool_calls=calls,
            )
            yield chunk(
                [ChatChunkChoice(index=i, delta=delta, logprobs=self.chat_logprobs(request, c.winner))]
            )
        info = result.t2_info(results, ctx.token_budget)
        for i, finish in enumerate(finishes):
            last = i == len(thought.choices) - 1
            yield chunk(
                [ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason=finish)],
                t2=info if last else None,
            )
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], usage=result.usage(results))
        yield "data: [DONE]\n\n"

    def chat_logprobs(self, request: ChatCompletionRequest, winner: Sample) -> dict[str, Any] | None:
        """The winning sample's own token log-probs, in vLLM's chat shape, when asked for."""
        if not request.logprobs or winner.logprobs is None:
            return None
        return vllm_openai.chat_logprobs(
            winner.token_ids, winner.logprobs, request.top_logprobs or 0, self.engine.tokenizer
        )

    # -- responses ------------------------------------------------------------------------

    async def _responses_outcome(
        self, ctx: RequestContext, turn: responses.ResponsesTurn, streamed: bool
    ) -> tuple[Any, list[Any]]:
        """The vote, as a Response (and its item events when `streamed`), stored if it holds room."""
        results = await self.think(ctx)
        winner = results[0].choices[0].winner
        message, _ = chat_message(winner, ctx.sampling[0][1])
        usage, t2 = result.usage(results), result.t2_info(results, ctx.token_budget)
        return responses.finish(
            turn, message, winner.finish_reason, usage, t2, self.response_store, streamed=streamed
        )

    # -- completions ----------------------------------------------------------------------

    def completion_choices(
        self, request: CompletionRequest, results: list[ThinkingResult]
    ) -> list[CompletionChoice]:
        # OpenAI's layout for several prompts: prompt i's choices are i*n .. i*n + n - 1.
        n = len(results[0].choices)
        return [
            CompletionChoice(
                index=p * n + i,
                text=c.winner.text,
                finish_reason=c.winner.finish_reason,
                logprobs=None
                if request.logprobs is None or c.winner.logprobs is None
                else vllm_openai.completion_logprobs(
                    c.winner.token_ids, c.winner.logprobs, request.logprobs, self.engine.tokenizer
                ),
            )
            for p, thought in enumerate(results)
            for i, c in enumerate(thought.choices)
        ]

    async def _completion_stream(self, ctx: RequestContext, request: CompletionRequest) -> AsyncIterator[str]:
        chunk_id, created = f"cmpl-{ctx.request_id}", int(time.time())

        def chunk(choices: list[CompletionChoice], **extra: Any) -> str:
            body = CompletionChunk(
                id=chunk_id, created=created, model=request.model, choices=choices, **extra
            )
            return sse(body.model_dump(exclude_none=True))

        try:
            results = await self.think(ctx)
        except Exception as exc:
            yield stream_error(exc)
            return
        choices = self.completion_choices(request, results)
        for choice in choices:
            yield chunk(
                [
                    CompletionChoice(
                        index=choice.index, text=choice.text, finish_reason=None, logprobs=choice.logprobs
                    )
                ]
            )
        for k, choice in enumerate(choices):
            yield chunk(
                [CompletionChoice(index=choice.index, text="", finish_reason=choice.finish_reason)],
                t2=result.t2_info(results, ctx.token_budget) if k == len(choices) - 1 else None,
            )
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], usage=result.usage(results))
        yield "data: [DONE]\n\n"


# -- response pieces --------------------------------------------------------------------


def chat_message(winner: Sample, reader: vllm_openai.OutputParser) -> tuple[ChatMessageOut, str | None]:
    """The returned message and finish reason: the winner's reasoning (with a reasoning
    parser, unless the request set `include_reasoning: false`), content and tool calls in
    OpenAI shape (then finish_reason "tool_calls")."""
    parsed = reader.parse(winner.text)
    thought = parsed.reasoning if getattr(reader.request, "include_reasoning", True) else None
    message = ChatMessageOut(
        content=parsed.content, reasoning=thought, reasoning_content=thought, tool_calls=parsed.tool_calls
    )
    return message, "tool_calls" if parsed.tool_calls else winner.finish_reason


def stream_error(exc: Exception) -> str:
    """The status line is already sent: report the error as an event, then end the stream."""
    if not isinstance(exc, APIError):
        logger.exception("error while streaming", exc_info=exc)
        exc = APIError(500, "internal server error", code="internal_error")
    return error_event(exc) + "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
