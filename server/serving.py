"""The OpenAI endpoints' logic: request -> prompt tokens + sampling params -> parallel
thinking -> OpenAI-shaped response or SSE stream. Routes in `server.app` stay thin."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from server import aggregation, metrics, sampling, vllm_api
from server.config import ServerSettings
from server.engine import Engine
from server.errors import APIError, error_event
from server.parallel import Deadline, ParallelThinker, Plan, ThinkingResult
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
    PromptTokensDetails,
    SamplingFields,
    T2Info,
    Usage,
    VoteInfo,
)
from server.samples import Sample

logger = logging.getLogger(__name__)


class OpenAIServing:
    def __init__(self, engine: Engine, thinker: ParallelThinker, settings: ServerSettings):
        self.engine = engine
        self.thinker = thinker
        self.settings = settings
        # --reasoning-parser / --tool-call-parser (vLLM's), checked at start-up.
        self.parsers = vllm_api.Parsers(
            engine.tokenizer,
            reasoning=settings.parallelism.reasoning_parser,
            tool_call=settings.parallelism.tool_call_parser,
        )

    # -- inputs -------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.engine.info.name:
            raise APIError(
                404,
                f"The model `{name}` does not exist. Available: `{self.engine.info.name}`.",
                param="model",
                code="model_not_found",
            )

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        messages = []
        for m in request.messages:
            # Everything a message carries reaches the template (name, tool_calls,
            # tool_call_id, ...), with its content as text.
            message = {**m.model_dump(exclude_none=True), "content": m.text()}
            if m.role == "developer":
                message["role"] = "system"
            messages.append(message)
        tools = (request.model_extra or {}).get("tools")
        try:
            return render_chat(
                self.engine.tokenizer,
                messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                **({"tools": tools} if tools else {}),
                **(request.chat_template_kwargs or {}),
            )
        except Exception as exc:  # a template may reject role orders it does not support
            raise APIError(400, f"chat template rejected the messages: {exc}", param="messages") from exc

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        vocab = len(self.engine.tokenizer)
        token_lists = []
        for p in request.prompts():
            if isinstance(p, str):
                ids = list(self.engine.tokenizer.encode(p))
            else:
                if not p:
                    raise APIError(400, "prompt token list must not be empty", param="prompt")
                if any(t < 0 or t >= vocab for t in p):
                    raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
                ids = list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            token_lists.append(ids)
        return token_lists

    def sampling_params(self, request: SamplingFields, prompt_len: int) -> tuple[Any, vllm_api.OutputParser]:
        """One prompt's validated SamplingParams and the parser of its samples' outputs."""
        params, reader = sampling.from_request(
            request,
            prompt_len,
            context=self.engine.info.max_model_len,
            defaults=self.engine.default_sampling,
            default_max_tokens=self.settings.default_max_tokens,
            parsers=self.parsers,
        )
        vllm_api.verify(self.engine, params, request)
        if request.aggregate not in (None, "auto") and (
            aggregation.constrained(params) or (reader.tools is not None and reader.tools.mode != "auto")
        ):
            raise APIError(
                400,
                f"aggregate '{request.aggregate}' cannot apply: the output is constrained (JSON, a choice "
                "or tool calls), and such samples vote on its canonical form; leave `aggregate` out",
                param="aggregate",
                code="invalid_value",
            )
        return params, reader

    def timeout_s(self, request: SamplingFields) -> float | None:
        """The request's deadline: its own `timeout`, bounded by --request-timeout."""
        limits = [t for t in (request.timeout, self.settings.limits.request_timeout_s) if t is not None]
        return min(limits) if limits else None

    def plan(self, request: SamplingFields) -> Plan:
        """How the request samples (server.parallel.Plan), resolved once, before admission;
        404 for another model, 400 for what cannot run."""
        self.check_model(request.model)
        body = sampling.request_body(request)
        chat = isinstance(request, ChatCompletionRequest)
        vllm_api.check_fields(
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

    # -- outputs ------------------------------------------------------------------------

    def chat_logprobs(self, request: ChatCompletionRequest, winner: Sample) -> dict[str, Any] | None:
        """The winning sample's own token log-probs, in vLLM's chat shape, when asked for."""
        if not request.logprobs or winner.logprobs is None:
            return None
        return vllm_api.chat_logprobs(
            winner.token_ids, winner.logprobs, request.top_logprobs or 0, self.engine.tokenizer
        )

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
                else vllm_api.completion_logprobs(
                    c.winner.token_ids, c.winner.logprobs, request.logprobs, self.engine.tokenizer
                ),
            )
            for p, result in enumerate(results)
            for i, c in enumerate(result.choices)
        ]

    # -- running ------------------------------------------------------------------------

    async def _think(
        self,
        plan: Plan,
        prompts: list[list[int]],
        params: list[tuple[Any, vllm_api.OutputParser]],
        timeout_s: float | None,
        endpoint: str,
        started: float,
    ) -> list[ThinkingResult]:
        base_id = uuid.uuid4().hex
        deadline = Deadline(timeout_s)  # one for the whole request, all its prompts
        tasks = [
            asyncio.ensure_future(
                self.thinker.run(p, sp, plan, request_id=f"{base_id}-p{i}", deadline=deadline, reader=reader)
            )
            for i, (p, (sp, reader)) in enumerate(zip(prompts, params, strict=True))
        ]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # One prompt failed (or the client left): stop the others' samples too.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            deadline.cancel()
        # The voted text is the first content a client gets, streaming or not.
        metrics.TIME_TO_FIRST_TOKEN.labels(endpoint).observe(time.monotonic() - started)
        for result in results:
            record_result(result)
        return list(results)

    async def chat(
        self, request: ChatCompletionRequest, plan: Plan
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        started = time.monotonic()
        prompt = self.chat_prompt(request)
        # Built (and so validated) before any streaming starts, so errors get a proper status.
        params = [self.sampling_params(request, len(prompt))]
        if request.stream:
            return self._chat_stream(request, plan, prompt, params, started)
        (result,) = await self._think(plan, [prompt], params, self.timeout_s(request), "chat", started)
        return ChatCompletionResponse(
            model=request.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=finish,
                    logprobs=self.chat_logprobs(request, c.winner),
                )
                for i, c in enumerate(result.choices)
                for message, finish in [chat_message(c.winner, params[0][1])]
            ],
            usage=usage([result]),
            t2=t2_info([result]),
        )

    async def _chat_stream(
        self,
        request: ChatCompletionRequest,
        plan: Plan,
        prompt: list[int],
        params: list[tuple[Any, vllm_api.OutputParser]],
        started: float,
    ) -> AsyncIterator[str]:
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

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
            (result,) = await self._think(plan, [prompt], params, self.timeout_s(request), "chat", started)
        except Exception as exc:
            yield stream_error(exc)
            return
        finishes = []
        for i, c in enumerate(result.choices):
            message, finish = chat_message(c.winner, params[0][1])
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
        info = t2_info([result])
        for i, finish in enumerate(finishes):
            last = i == len(result.choices) - 1
            yield chunk(
                [ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason=finish)],
                t2=info if last else None,
            )
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], usage=usage([result]))
        yield "data: [DONE]\n\n"

    async def completion(
        self, request: CompletionRequest, plan: Plan
    ) -> CompletionResponse | AsyncIterator[str]:
        started = time.monotonic()
        prompts = self.completion_prompts(request)
        params = [self.sampling_params(request, len(p)) for p in prompts]
        if request.stream:
            return self._completion_stream(request, plan, prompts, params, started)
        results = await self._think(plan, prompts, params, self.timeout_s(request), "completion", started)
        return CompletionResponse(
            model=request.model,
            choices=self.completion_choices(request, results),
            usage=usage(results),
            t2=t2_info(results),
        )

    async def _completion_stream(
        self,
        request: CompletionRequest,
        plan: Plan,
        prompts: list[list[int]],
        params: list[tuple[Any, vllm_api.OutputParser]],
        started: float,
    ) -> AsyncIterator[str]:
        chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            results = await self._think(plan, prompts, params, self.timeout_s(request), "completion", started)
        except Exception as exc:
            yield stream_error(exc)
            return
        choices = self.completion_choices(request, results)
        for choice in choices:
            body = CompletionChunk(
                id=chunk_id,
                created=created,
                model=request.model,
                choices=[
                    CompletionChoice(
                        index=choice.index, text=choice.text, finish_reason=None, logprobs=choice.logprobs
                    )
                ],
            )
            yield sse(body.model_dump(exclude_none=True))
        for k, choice in enumerate(choices):
            body = CompletionChunk(
                id=chunk_id,
                created=created,
                model=request.model,
                choices=[CompletionChoice(index=choice.index, text="", finish_reason=choice.finish_reason)],
                t2=t2_info(results) if k == len(choices) - 1 else None,
            )
            yield sse(body.model_dump(exclude_none=True))
        if request.stream_options and request.stream_options.include_usage:
            body = CompletionChunk(
                id=chunk_id, created=created, model=request.model, choices=[], usage=usage(results)
            )
            yield sse(body.model_dump(exclude_none=True))
        yield "data: [DONE]\n\n"


# -- response pieces --------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
    """Chat messages -> prompt token ids, exactly as the server renders them (labeling and
    evaluation use this too, so the estimator sees the states the server will see).
    `template_kwargs` reach the chat template (add_generation_prompt, enable_thinking, ...)."""
    template_kwargs.setdefault("add_generation_prompt", True)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_message(winner: Sample, reader: vllm_api.OutputParser) -> tuple[ChatMessageOut, str | None]:
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


def usage(results: list[ThinkingResult]) -> Usage:
    prompt = sum(r.prompt_tokens + r.extra_prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    cached = sum(min(r.cached_tokens_per_sample, r.prompt_tokens) for r in results)
    reasoning = [r.reasoning_tokens for r in results if r.reasoning_tokens is not None]
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details={"reasoning_tokens": sum(reasoning)} if reasoning else None,
    )


def t2_info(results: list[ThinkingResult]) -> T2Info:
    first = results[0]
    votes = [c.vote for r in results for c in r.choices]
    return T2Info(
        mode=first.mode,
        n_used=first.n_used,
        n_max=first.n_max,
        max_parallelism=first.max_parallelism,
        prediction=first.prediction,
        samples=sum(r.samples for r in results),
        estimator=first.estimator,
        capture_ms=first.capture_ms,
        load_cap=first.load_cap,
        timed_out=any(r.timed_out for r in results),
        policy=first.policy,
        aggregate=first.aggregate,
        usc=first.usc,
        gate=first.gate,
        margin_scale=first.margin_scale,
        estimator_fallback=first.estimator_fallback,
        open_ended=first.open_ended or None,
        launched=sum(r.launched for r in results),
        finished=sum(r.launched - r.aborted for r in results),
        aborted=sum(r.aborted for r in results),
        answer=votes[0].answer,
        votes=votes[0].votes,
        agreement=votes[0].agreement,
        choices=[VoteInfo(answer=v.answer, votes=v.votes, agreement=v.agreement, tie=v.tie) for v in votes]
        if len(votes) > 1
        else None,
    )


def record_result(result: ThinkingResult) -> None:
    metrics.SAMPLES.inc(result.launched)
    metrics.SAMPLES_ABORTED.inc(result.aborted)
    metrics.POLICY_REQUESTS.labels(result.policy.partition(":")[0]).inc()
    metrics.AGGREGATES.labels(result.aggregate, str(result.open_ended).lower()).inc()
    if result.estimator_fallback is not None:
        metrics.ESTIMATOR_FALLBACKS.labels(result.estimator_fallback).inc()
    metrics.BASELINE_SAMPLES.inc(result.n_max * len(result.choices))
    metrics.GENERATED_TOKENS.inc(result.completion_tokens)
    metrics.CHOSEN_N.observe(result.n_used)
    if result.capture_ms is not None:
        metrics.CAPTURE_SECONDS.observe(result.capture_ms / 1000)
    if result.prediction is not None:
        metrics.PREDICTION.observe(result.prediction)
    if result.estimator_ms is not None:
        metrics.ESTIMATOR_SECONDS.observe(result.estimator_ms / 1000)
    for choice in result.choices:
        vote = choice.vote
        if vote.num_voters:
            metrics.AGREEMENT.observe(vote.agreement)
        metrics.VOTES.labels("no_answer" if vote.answer is None else "tie" if vote.tie else "decided").inc()
