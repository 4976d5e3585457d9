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

Which N is a sampling policy's call (estimator/stopping.py; `--policy` or the request's
`policy`, estimator/policy_spec.py). Policies that decide before decoding (fixed, T2) run
the timeline above. Adaptive ones (ESC, Adaptive-Consistency, the composition) run each
sample as its own engine request (all read the prompt from the prefix cache): each choice
has its own tally; every finished sample is shown to the policy, which launches more or
stops the vote, and a stopped vote's running samples are aborted in the engine (their
tokens still count as generated). Step 2 waits for the states only if the policy reads
the prediction. The load curve is re-read at every decision.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from estimator.policy import load_scaled_cap
from estimator.policy_spec import describe, needs_prediction, parse_policy
from estimator.stopping import Budget, Fixed, Policy, Tally
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
    aborted_tokens: int = 0  # tokens of aborted samples (paid for, not voted)
    policy: str = ""  # the policy that ran (estimator.policy_spec.describe)
    launched: int = 0  # samples sent to the engine
    aborted: int = 0  # of those, samples stopped before they finished (early stop, deadline)
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


@dataclass
class _Vote:
    """One choice's state under an adaptive policy."""

    tally: Tally = field(default_factory=Tally)
    samples: list[Sample] = field(default_factory=list)  # finished, in finishing order
    launched: int = 0
    running: set[str] = field(default_factory=set)  # engine request ids
    stopped: bool = False


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
        # --policy: what `auto` runs when a request names no policy (validated here, at start-up).
        self.default_policy = self.parse_policy(settings.policy)

    @property
    def n_max(self) -> int:
        """The fixed-N baseline: the N_max the head was trained for, else the default N."""
        meta = getattr(self.estimator, "meta", None)
        return int(meta.n_max) if meta is not None else self.settings.default_parallelism

    def parse_policy(self, spec: str) -> Policy:
        """A policy spec with the server's defaults (`fixed`: N_max; T2's margin); ValueError if bad."""
        return parse_policy(
            spec,
            fixed_n=self.n_max,
            margin=self.settings.estimator_margin,
            stopping=getattr(self.estimator, "stopping", None),
        )

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

    def resolve_policy(self, parallelism: int | str | None, policy: str | None) -> Policy:
        """An integer `parallelism` is Fixed(N); `auto` runs the request's policy, else --policy."""
        if parallelism is not None and parallelism != "auto":
            return Fixed(int(parallelism))
        return self.default_policy if policy is None else self.parse_policy(policy)

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
        policy: str | None = None,
    ) -> ThinkingResult:
        mode, _, cap = self.resolve_budget(parallelism, max_parallelism)
        chosen = self.resolve_policy(parallelism, policy)
        base = self._base_params(params)
        if chosen.adapts:
            return await self._run_adaptive(
                prompt_token_ids, base, chosen, n_choices=n_choices, cap=cap, request_id=request_id,
                timeout_s=timeout_s,
            )  # fmt: skip
        return await self._run_at_once(
            prompt_token_ids, base, chosen, mode=mode, n_choices=n_choices, cap=cap, request_id=request_id,
            want_states=want_states, timeout_s=timeout_s,
        )  # fmt: skip

    def _base_params(self, params: Any) -> Any:
        from vllm.sampling_params import RequestOutputKind

        base = params.clone()
        if self.settings.tie_break == "logprob":
            # The sampled token's log-prob gives the tie rule its mean log-probability.
            base.logprobs = 0
        base.output_kind = RequestOutputKind.FINAL_ONLY
        return base

    def _budget(self, prediction: float | None, cap: int) -> Budget:
        return Budget(prediction, n_max=self.n_max, default=self.settings.default_parallelism, cap=cap)

    # -- policies that decide before decoding (fixed, T2): one n=k request -----------------

    async def _run_at_once(
        self,
        prompt_token_ids: list[int],
        base: Any,
        policy: Policy,
        *,
        mode: str,
        n_choices: int,
        cap: int,
        request_id: str,
        want_states: bool,
        timeout_s: float | None,
    ) -> ThinkingResult:
        n = policy.first_launch(self._budget(None, cap)) if mode == "fixed" else 1  # auto: decided below
        # Capture only when someone reads the states: a fixed N (or a policy that ignores the
        # head) has no use for them, and the copy and push cost the engine step time.
        wants_capture = want_states or (mode == "auto" and needs_prediction(policy))
        first_params = base.clone()
        # Without a capture nothing waits on sample 0: a fixed N is one n=k request, as in
        # vLLM's own API; with one, sample 0 carries it and the rest follow as one request.
        first_params.n = n * n_choices if mode == "fixed" and not wants_capture else 1
        first_id, rest_id = f"{request_id}-s0", f"{request_id}-s1"
        states_future = self.engine.tag_for_capture(first_params, request_id) if wants_capture else None
        started = time.monotonic()
        in_flight = first_params.n
        self._count_in_flight(in_flight)
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
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    if mode == "auto":
                        if states_future is not None:
                            states, capture_ms = await self._wait_states(states_future, first, started)
                            prediction, estimator_ms = await self._timed_predict(states)
                        load_cap = self._first_cap(base, cap, n_choices, policy, prediction)
                        n = policy.first_launch(self._budget(prediction, load_cap))
                    total = n * n_choices
                    if total > first_params.n:
                        rest_params = base.clone()
                        rest_params.n = total - first_params.n
                        if rest_params.seed is not None:
                            # vLLM seeds child i of an n>1 request with seed + i: shift past sample 0.
                            rest_params.seed += first_params.n
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
            if states_future is not None and states is None:
                if want_states and not states_future.done():
                    await asyncio.wait({states_future}, timeout=self.engine.settings.capture_timeout_s)
                if states_future.done() and not states_future.cancelled():
                    states = states_future.result()
        except BaseException:
            for task in (first, rest):
                if task is not None:
                    task.cancel()
            await asyncio.shield(self.engine.abort([first_id, rest_id]))
            raise
        finally:
            self._count_in_flight(-in_flight)
            if states_future is not None:
                self.engine.forget_capture(request_id)

        outputs = sorted(first_out.outputs, key=lambda o: o.index) if first_out is not None else []
        if rest_out is not None:
            outputs += sorted(rest_out.outputs, key=lambda o: o.index)
        samples = [_to_sample(o) for o in outputs]
        unfinished = [s for s in samples if s.finish_reason in (None, "abort")] if timed_out else []
        groups = []
        for c in range(n_choices):
            group = samples[c * n : (c + 1) * n]
            if timed_out:
                group = [s for s in group if s.finish_reason not in (None, "abort")]
            groups.append(group)
        return ThinkingResult(
            choices=self._votes(groups, timed_out, timeout_s),
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
            aborted_tokens=sum(s.num_tokens for s in unfinished),
            states=states,
            policy=describe(policy),
            launched=in_flight,
            aborted=len(unfinished) + (in_flight - len(samples) if timed_out else 0),
        )

    # -- adaptive policies (ESC, Adaptive-Consistency, composition): one request per sample --

    async def _run_adaptive(
        self,
        prompt_token_ids: list[int],
        base: Any,
        policy: Policy,
        *,
        n_choices: int,
        cap: int,
        request_id: str,
        timeout_s: float | None,
    ) -> ThinkingResult:
        votes = [_Vote() for _ in range(n_choices)]
        running: dict[asyncio.Future[Any], tuple[int, str]] = {}  # sample task -> (choice, engine id)
        numbers = itertools.count()
        aborted = aborted_tokens = 0
        cached_tokens = 0

        def start(choice: int, params: Any) -> asyncio.Future[Any]:
            number = next(numbers)
            engine_id = f"{request_id}-s{number}"
            if params.seed is not None:
                # Sample i gets seed + i, as child i of an n>1 request would.
                params.seed += number
            task = asyncio.ensure_future(
                _final_output(self.engine.generate(prompt_token_ids, params, engine_id))
            )
            running[task] = (choice, engine_id)
            votes[choice].launched += 1
            votes[choice].running.add(engine_id)
            self._count_in_flight(1)
            return task

        def launch(choice: int, k: int) -> None:
            for _ in range(k):
                params = base.clone()
                params.n = 1
                start(choice, params)

        def own_budget(prediction: float | None) -> Budget:
            """The budget with the load curve re-read; this request's own samples are not load."""
            return self._budget(prediction, self._scaled_cap(base, cap, n_choices, own=len(running)))

        first_params = base.clone()
        first_params.n = 1
        # As in _run_at_once: capture only when the policy reads the prediction.
        states_future = (
            self.engine.tag_for_capture(first_params, request_id) if needs_prediction(policy) else None
        )
        started = time.monotonic()
        first = start(0, first_params)
        prediction = states = capture_ms = estimator_ms = load_cap = None
        timed_out = False
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    if states_future is not None:
                        states, capture_ms = await self._wait_states(states_future, first, started)
                        prediction, estimator_ms = await self._timed_predict(states)
                    load_cap = self._first_cap(base, cap, n_choices, policy, prediction)
                    for c, vote in enumerate(votes):
                        launch(c, policy.first_launch(own_budget(prediction)) - vote.launched)
                    while running and not all(v.stopped for v in votes):
                        done, _ = await asyncio.wait(list(running), return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            choice, engine_id = running.pop(task)
                            self._count_in_flight(-1)
                            vote = votes[choice]
                            vote.running.discard(engine_id)
                            output = task.result()
                            sample = _to_sample(output.outputs[0])
                            if vote.stopped:  # finished as the abort went out: paid for, not voted
                                aborted, aborted_tokens = aborted + 1, aborted_tokens + sample.num_tokens
                                continue
                            if task is not first:
                                cached_tokens = max(cached_tokens, int(output.num_cached_tokens or 0))
                            vote.samples.append(sample)
                            vote.tally.add(sample.answer)
                            decision = policy.on_result(vote.tally, vote.launched, own_budget(prediction))
                            if decision.launch > 0 and not decision.stop:
                                launch(choice, decision.launch)
                            elif decision.stop or not vote.running:
                                vote.stopped = True
                                await asyncio.shield(self.engine.abort(sorted(vote.running)))
            except TimeoutError:
                timed_out = True
                await asyncio.shield(self.engine.abort([engine_id for _, engine_id in running.values()]))
            # Stopped (or timed-out) votes' samples end with their partial output at once.
            aborted += len(running)
            aborted_tokens += sum(len(o.outputs[0].token_ids) for o in await self._drain(running))
        except BaseException:
            for task in running:
                task.cancel()
            await asyncio.shield(self.engine.abort([engine_id for _, engine_id in running.values()]))
            raise
        finally:
            self._count_in_flight(-len(running))
            if states_future is not None:
                self.engine.forget_capture(request_id)

        return ThinkingResult(
            choices=self._votes([v.samples for v in votes], timed_out, timeout_s),
            mode="auto",
            n_used=votes[0].launched,
            n_max=self.n_max,
            max_parallelism=cap,
            prediction=prediction,
            estimator=getattr(self.estimator, "name", "default"),
            prompt_tokens=len(prompt_token_ids),
            cached_tokens_per_sample=cached_tokens,
            capture_ms=capture_ms,
            estimator_ms=estimator_ms,
            load_cap=load_cap,
            timed_out=timed_out,
            aborted_tokens=aborted_tokens,
            states=states,
            policy=describe(policy),
            launched=sum(v.launched for v in votes),
            aborted=aborted,
        )

    async def _drain(self, running: dict[asyncio.Future[Any], tuple[int, str]]) -> list[Any]:
        """Final outputs of aborted samples (the engine hands them back at once); empties `running`."""
        if not running:
            return []
        done, pending = await asyncio.wait(list(running), timeout=ABORT_GRACE_S)
        for task in pending:
            task.cancel()
        outputs = [t.result() for t in done if not t.cancelled() and t.exception() is None]
        self._count_in_flight(-len(running))
        running.clear()
        return [o for o in outputs if o is not None and o.outputs]

    # -- shared pieces --------------------------------------------------------------------

    def _votes(
        self, groups: list[list[Sample]], timed_out: bool, timeout_s: float | None
    ) -> list[ChoiceResult]:
        """Each choice's vote over its (finished) samples; after a deadline a choice with none fails."""
        choices = []
        for group in groups:
            if timed_out and not group:
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
        return choices

    def _count_in_flight(self, delta: int) -> None:
        self.samples_in_flight += delta
        metrics.SAMPLES_IN_FLIGHT.inc(delta)

    def _scaled_cap(self, base: Any, cap: int, n_choices: int, own: int) -> int:
        """The per-choice cap after the load curve (1 when greedy: more samples would only
        repeat the first); `own` samples in flight are this request's, not load."""
        if is_greedy(base.temperature):
            return 1
        if self.samples_limit is None:
            return cap
        return load_scaled_cap(cap, self.samples_in_flight - own, self.samples_limit, choices=n_choices)

    def _first_cap(
        self, base: Any, cap: int, n_choices: int, policy: Policy, prediction: float | None
    ) -> int:
        """The cap when a request first chooses N (its sample 0 is running), recorded in
        metrics, with the request counted as load-reduced when the cap lowers its first launch."""
        scaled = self._scaled_cap(base, cap, n_choices, own=1)
        if self.samples_limit is not None and not is_greedy(base.temperature):
            metrics.LOAD_CAP.observe(scaled)
            if scaled < cap and policy.first_launch(self._budget(prediction, scaled)) < policy.first_launch(
                self._budget(prediction, cap)
            ):
                metrics.LOAD_REDUCED.inc()
        return scaled

    async def _timed_predict(self, states: Any) -> tuple[float | None, float | None]:
        """(prediction, head latency in ms); (None, None) without states or a head."""
        if states is None or self.estimator is None:
            return None, None
        estimator_started = time.monotonic()
        prediction = await self._predict(states)
        return prediction, (time.monotonic() - estimator_started) * 1000

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
