"""Parallel thinking for one prompt: capture, choose N, fan out N samples, vote.

Timeline of a request (see README "How a request runs"):
  1. sample 0 starts at once, tagged for hidden-state capture; its prefill fills the
     prefix cache and produces the last prompt token's `[L, d]` residual stream.
  2. mode "auto": the states arrive (pushed from the worker) while sample 0 keeps
     decoding; the estimator picks N. Mode "fixed": N is known, nothing waits.
  3. the other `n_choices * N - 1` samples go out as one `n=k` engine request over the same
     token ids, reading the prompt's KV blocks from the prefix cache.
  4. each choice takes N consecutive samples (sample 0 belongs to choice 0) and votes.
Every engine request this module starts is aborted if the caller goes away or fails.
Under load, `auto` caps N by the load curve (estimator.policy.load_scaled_cap). At a
deadline (`timeout_s`) every sample is aborted and each choice votes over the samples that
had finished; a choice with none fails the request with 504.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from estimator.policy import choose_parallelism, load_scaled_cap
from server import metrics
from server.config import ParallelismSettings
from server.engine import Engine
from server.errors import APIError
from server.voting import Vote, extract_answer, majority_vote

logger = logging.getLogger(__name__)

# After an abort the engine hands back each sample's final output at once; don't wait longer.
ABORT_GRACE_S = 5.0
# vLLM samples greedily below this temperature: every sample would be the same text.
GREEDY_TEMPERATURE = 1e-5


def is_greedy(temperature: float | None) -> bool:
    return temperature is not None and temperature < GREEDY_TEMPERATURE


@dataclass
class Sample:
    text: str
    num_tokens: int
    finish_reason: str | None
    mean_logprob: float | None
    answer: str | None


@dataclass
class ChoiceResult:
    vote: Vote
    samples: list[Sample]

    @property
    def winner(self) -> Sample:
        return self.samples[self.vote.winner_index]


@dataclass
class ThinkingResult:
    choices: list[ChoiceResult]
    mode: Literal["auto", "fixed"]
    n_used: int
    n_max: int  # the fixed-N baseline (head's N_max, else the default N)
    max_parallelism: int
    prediction: float | None
    estimator: str
    prompt_tokens: int
    cached_tokens_per_sample: int  # prompt tokens the fan-out samples read from the prefix cache
    capture_ms: float | None = None
    estimator_ms: float | None = None
    load_cap: int | None = None  # auto: per-choice cap after the load curve
    timed_out: bool = False
    aborted_tokens: int = 0  # tokens of samples the deadline cut off (paid for, not voted)
    states: Any = field(default=None, repr=False)  # [L, d] float32, when captured in time

    @property
    def samples(self) -> int:
        return sum(len(c.samples) for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(s.num_tokens for c in self.choices for s in c.samples) + self.aborted_tokens


def _to_sample(output: Any) -> Sample:
    n = len(output.token_ids)
    cumulative = getattr(output, "cumulative_logprob", None)
    mean = cumulative / n if cumulative is not None and n > 0 and math.isfinite(cumulative) else None
    return Sample(output.text, n, output.finish_reason, mean, extract_answer(output.text))


async def _final_output(stream: Any) -> Any:
    final = None
    async for output in stream:
        final = output
    return final


class ParallelThinker:
    """Runs parallel thinking requests on an `Engine`."""

    def __init__(
        self,
        engine: Engine,
        settings: ParallelismSettings,
        estimator: Any = None,
        samples_limit: int | None = None,
    ):
        self.engine = engine
        self.settings = settings
        # A T2 head (estimator.head.T2Head: .predict(states) -> N*/N_max, .name, .meta.n_max) or None.
        self.estimator = estimator
        # --max-samples-in-flight: `auto` scales its cap down as the engine fills (None: never).
        self.samples_limit = samples_limit
        self.samples_in_flight = 0

    @property
    def n_max(self) -> int:
        """The fixed-N baseline: the N_max the head was trained for, else the default N."""
        meta = getattr(self.estimator, "meta", None)
        return int(meta.n_max) if meta is not None else self.settings.default_parallelism

    def resolve_budget(
        self, parallelism: int | str | None, max_parallelism: int | None
    ) -> tuple[str, int, int]:
        """(mode, fixed N or 0, per-choice cap) for a request's extension fields."""
        cap = min(max_parallelism or self.settings.max_parallelism, self.settings.max_parallelism)
        if parallelism is None or parallelism == "auto":
            return "auto", 0, cap
        if int(parallelism) > cap:
            raise ValueError(f"parallelism {parallelism} exceeds max_parallelism {cap}")
        return "fixed", int(parallelism), cap

    async def run(
        self,
        prompt_token_ids: list[int],
        params: Any,
        *,
        n_choices: int,
        parallelism: int | str | None,
        max_parallelism: int | None,
        request_id: str,
        want_states: bool = False,
        timeout_s: float | None = None,
    ) -> ThinkingResult:
        from vllm.sampling_params import RequestOutputKind

        mode, fixed_n, cap = self.resolve_budget(parallelism, max_parallelism)
        base = params.clone()
        if self.settings.tie_break == "logprob":
            # The sampled token's log-prob gives the tie rule its mean log-probability.
            base.logprobs = 0
        base.output_kind = RequestOutputKind.FINAL_ONLY
        first_params = base.clone()
        first_params.n = 1
        first_id, rest_id = f"{request_id}-s0", f"{request_id}-s1"
        states_future = self.engine.tag_for_capture(first_params, request_id)
        started = time.monotonic()
        in_flight = 1
        self._count_in_flight(1)
        first = asyncio.ensure_future(
            _final_output(self.engine.generate(prompt_token_ids, first_params, first_id))
        )
        rest: asyncio.Future[Any] | None = None
        prediction = None
        states = None
        capture_ms = None
        estimator_ms = None
        load_cap = None
        timed_out = False
        n = fixed_n or 1  # until `auto` decides
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    if mode == "auto":
                        states, capture_ms = await self._wait_states(states_future, first, started)
                        if states is not None and self.estimator is not None:
                            estimator_started = time.monotonic()
                            prediction = await self._predict(states)
                            estimator_ms = (time.monotonic() - estimator_started) * 1000
                        # Greedy: more samples would only repeat the first one.
                        greedy = is_greedy(base.temperature)
                        load_cap = 1 if greedy else self._load_cap(cap, n_choices)
                        n = self._choose(prediction, load_cap)
                        if not greedy and n < self._choose(prediction, cap):
                            metrics.LOAD_REDUCED.inc()
                    total = n * n_choices
                    if total > 1:
                        rest_params = base.clone()
                        rest_params.n = total - 1
                        if rest_params.seed is not None:
                            # vLLM seeds child i of an n>1 request with seed + i: shift past sample 0.
                            rest_params.seed += 1
                        in_flight += rest_params.n
                        self._count_in_flight(rest_params.n)
                        rest = asyncio.ensure_future(
                            _final_output(self.engine.generate(prompt_token_ids, rest_params, rest_id))
                        )
                    # shield: the deadline must not cancel the samples, the abort below ends them
                    # and hands back what finished.
                    first_out = await asyncio.shield(first)
                    rest_out = await asyncio.shield(rest) if rest is not None else None
            except TimeoutError:
                timed_out = True
                first_out, rest_out = await self._abort_and_collect(first, rest, [first_id, rest_id])
            if mode == "fixed" and want_states and not states_future.done():
                await asyncio.wait({states_future}, timeout=self.engine.settings.capture_timeout_s)
            if mode == "fixed" and states_future.done() and not states_future.cancelled():
                states = states_future.result()
        except BaseException:
            for task in (first, rest):
                if task is not None:
                    task.cancel()
            await asyncio.shield(self.engine.abort([first_id, rest_id]))
            raise
        finally:
            self._count_in_flight(-in_flight)
            self.engine.forget_capture(request_id)

        outputs = list(first_out.outputs) if first_out is not None else []
        if rest_out is not None:
            outputs += sorted(rest_out.outputs, key=lambda o: o.index)
        samples = [_to_sample(o) for o in outputs]
        unfinished = [s for s in samples if s.finish_reason in (None, "abort")]
        choices = []
        for c in range(n_choices):
            group = samples[c * n : (c + 1) * n]
            if timed_out:
                group = [s for s in group if s.finish_reason not in (None, "abort")]
                if not group:
                    metrics.TIMEOUTS.labels("failed").inc()
                    raise APIError(
                        504,
                        f"the request timed out after {timeout_s:g} s before a sample finished",
                        code="request_timeout",
                    )
            vote = majority_vote([s.answer for s in group], [s.mean_logprob for s in group])
            choices.append(ChoiceResult(vote, group))
        if timed_out:
            metrics.TIMEOUTS.labels("partial").inc()
        return ThinkingResult(
            choices=choices,
            mode=mode,  # type: ignore[arg-type]
            n_used=n,
            n_max=self.n_max,
            max_parallelism=cap,
            prediction=prediction,
            estimator=getattr(self.estimator, "name", "default"),
            prompt_tokens=len(prompt_token_ids),
            cached_tokens_per_sample=int(rest_out.num_cached_tokens or 0) if rest_out is not None else 0,
            capture_ms=capture_ms,
            estimator_ms=estimator_ms,
            load_cap=load_cap,
            timed_out=timed_out,
            aborted_tokens=sum(s.num_tokens for s in unfinished) if timed_out else 0,
            states=states,
        )

    def _count_in_flight(self, delta: int) -> None:
        self.samples_in_flight += delta
        metrics.SAMPLES_IN_FLIGHT.inc(delta)

    def _load_cap(self, cap: int, n_choices: int) -> int:
        """The request's cap after the load curve; this request's sample 0 is not load."""
        if self.samples_limit is None:
            return cap
        scaled = load_scaled_cap(cap, self.samples_in_flight - 1, self.samples_limit, choices=n_choices)
        metrics.LOAD_CAP.observe(scaled)
        return scaled

    def _choose(self, prediction: float | None, cap: int) -> int:
        return choose_parallelism(
            prediction,
            n_max=self.n_max,
            default=self.settings.default_parallelism,
            cap=cap,
            margin=self.settings.estimator_margin,
        )

    async def _predict(self, states: Any) -> float | None:
        """The head's prediction, or None (the default N) if the head fails on these states."""
        try:
            return float(await asyncio.to_thread(self.estimator.predict, states))
        except Exception:
            logger.warning("estimator head failed; using the default N", exc_info=True)
            metrics.ESTIMATOR_FALLBACKS.labels("predict").inc()
            return None

    async def _abort_and_collect(
        self, first: asyncio.Future[Any], rest: asyncio.Future[Any] | None, request_ids: list[str]
    ) -> tuple[Any, Any]:
        """Abort every sample; the engine then ends each stream with its final output
        (finish_reason "abort" for the unfinished ones). Returns (first, rest) outputs."""
        await asyncio.shield(self.engine.abort(request_ids))
        tasks = [t for t in (first, rest) if t is not None]
        _, pending = await asyncio.wait(tasks, timeout=ABORT_GRACE_S)
        for task in pending:
            task.cancel()

        def output(task: asyncio.Future[Any] | None) -> Any:
            if task is None or task in pending or task.cancelled() or task.exception() is not None:
                return None
            return task.result()

        return output(first), output(rest)

    async def _wait_states(
        self, states_future: asyncio.Future[Any], first: asyncio.Future[Any], started: float
    ) -> tuple[Any, float | None]:
        """The captured states, or None if sample 0 ended (e.g. failed) or the wait timed out."""
        done, _ = await asyncio.wait(
            {states_future, first},
            timeout=self.engine.settings.capture_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if first in done and states_future not in done and first.exception() is None:
            # The states are pushed before the step's tokens are sampled, so they are all
            # but certain to be here already; allow a moment for the socket.
            await asyncio.wait({states_future}, timeout=0.2)
            done = {states_future} if states_future.done() else done
        if states_future in done and not states_future.cancelled():
            return states_future.result(), (time.monotonic() - started) * 1000
        if first in done and first.exception() is not None:
            raise first.exception()  # type: ignore[misc]
        if states_future not in done:
            # Sample 0 finished (or the wait timed out) without states arriving: fall back
            # to the default N rather than failing the request.
            logger.warning("hidden states for a request did not arrive; using the default N")
        return None, None
