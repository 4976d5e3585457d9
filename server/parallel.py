"""Parallel thinking for one prompt: capture, choose N, fan out samples, stop, vote.

One loop runs every sampling policy (estimator/policies.py). A request's extension fields
are resolved once into a `Plan` (the policy: Fixed(N) for an integer `parallelism`; the
per-choice cap; the number of choices) before it is admitted; `ParallelThinker.run` then
drives the plan for one prompt:

  1. if the policy reads the T2 prediction, sample 0 goes out alone, tagged for hidden-state
     capture; its prefill fills the prefix cache and the worker pushes the last prompt
     token's `[L, d]` residual stream; the head and its gate read it while sample 0 keeps
     decoding (server/estimate.py).
  2. every choice launches the policy's first decision. A policy that decides before
     decoding (Fixed, T2) launches all its samples as one `n=k` engine request per choice,
     as vLLM's own API sends them; an adaptive one (ESC, Adaptive-Consistency, the
     compositions) launches each sample as its own request, so each finishes on its own.
     All of them read the prompt from the prefix cache.
  3. each finished sample is shown to its choice's policy, which waits, launches more or
     stops the vote; a stopped vote's running samples are aborted (their tokens still
     count). At-once policies just wait for all their samples, then stop.
  4. each choice votes over its finished samples in launch order (so, under a seed, the
     result does not depend on which sample finished first).

The load curve (server.admission.load_scaled_cap) caps `auto` at every decision. At the
request's deadline every running sample is aborted and each choice votes over the samples
that had finished; a choice with none fails the request with 504. The engine requests, and
the server's samples-in-flight count, belong to a `SampleGroup` (server/samples.py), which
leaves nothing running however the loop ends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

from estimator.head import DEFAULT_MARGIN
from estimator.policies import Budget, Fixed, Policy
from estimator.policy_spec import describe, parse_policy
from server import aggregation, metrics, sampling, vllm_openai
from server.admission import load_scaled_cap
from server.budget import TokenBudget
from server.config import ParallelismSettings
from server.engine.engine import Engine
from server.errors import APIError
from server.estimate import Estimate, Estimator
from server.exploration import Explore
from server.result import ChoiceResult, ThinkingResult
from server.samples import InFlight, Sample, SampleGroup
from server.vote_loop import VoteLoop, picked
from server.voting import majority_vote

logger = logging.getLogger(__name__)

# vLLM samples greedily below this temperature: every sample would be the same text.
GREEDY_TEMPERATURE = 1e-5


def is_greedy(temperature: float | None) -> bool:
    return temperature is not None and temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class Plan:
    """How a request samples, resolved once from its extension fields."""

    policy: Policy
    mode: Literal["auto", "fixed"]
    cap: int  # per-choice cap on N (max_parallelism, bounded by the server's)
    n_choices: int = 1
    prompts: int = 1
    greedy: bool = False  # every sample would be the same text: `auto` runs one
    aggregate: str = "answer"  # what free-text samples vote with (server.aggregation.REQUESTABLE)
    # Why the head's prediction is not used ("temperature": the request samples unlike the
    # head's labels); None: it is, where one runs.
    estimator_fallback: str | None = None
    # Explored (server.exploration): N_max samples per choice, none stopped early, whatever
    # the load; its states are captured and its pools recorded.
    explore: bool = False
    # The head the plan was resolved with: the request runs with it to its end, whatever a
    # reload swaps in meanwhile (server.head_reload). None: the thinker's current one.
    head: HeadInUse | None = None

    @property
    def minimum_samples(self) -> int:
        """Samples the request dispatches at least (admission reserves these)."""
        per_choice = self.policy.n if isinstance(self.policy, Fixed) else 1
        return self.prompts * self.n_choices * per_choice


@dataclass(frozen=True)
class HeadInUse:
    """The estimator head requests run with and what the server derives from it. Swapped
    whole, by one assignment (`ParallelThinker.current`, server.head_reload)."""

    # estimator.head.T2Head (.predict(states) -> N*/N_max, .name, .meta.n_max) or None (the default N)
    head: Any
    version: str | None  # server.head_reload.head_version; None without a head
    n_max: int  # the fixed-N baseline: the head's N_max, else the default N
    margin: float  # T2's margin (ParallelThinker.bind)
    default_policy: Policy  # `policy` with this head's N_max, margin and stopping table
    reader: Estimator
    policy: str  # the spec `auto` runs when a request names none: --policy, or a reload's


class Deadline:
    """When a request must answer by, shared by its prompts. `expire()` ends it early
    (tests drive deadlines by events, not by the clock)."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.expired: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timer = (
            asyncio.get_running_loop().call_later(timeout_s, self.expire) if timeout_s is not None else None
        )

    def expire(self) -> None:
        if not self.expired.done():
            self.expired.set_result(None)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class ParallelThinker:
    """Runs parallel thinking requests on an `Engine`."""

    def __init__(
        self,
        engine: Engine,
        settings: ParallelismSettings,
        estimator: Any = None,
        samples_limit: int | None = None,
        head_version: str | None = None,
    ):
        self.engine = engine
        self.settings = settings
        # --max-samples-in-flight: `auto` scales its cap down as the engine fills (None: never).
        self.samples_limit = samples_limit
        self.in_flight = InFlight()
        # --policy is validated here, at start-up (and again for every head or policy a reload brings).
        self.current = self.bind(estimator, head_version, policy=settings.policy)

    def bind(
        self, head: Any, version: str | None = None, margin: float | None = None, policy: str | None = None
    ) -> HeadInUse:
        """`head` with what requests derive from it. T2's margin: `margin`, else
        --estimator-margin, else the head's (T2Head.margin), else DEFAULT_MARGIN. `policy`:
        the spec `auto` runs (default: the one in use). ValueError when that policy cannot run
        with it."""
        if policy is None:
            policy = self.current.policy
        meta = getattr(head, "meta", None)
        n_max = int(meta.n_max) if meta is not None else self.settings.default_parallelism
        if margin is None:
            margin = self.settings.estimator_margin
        if margin is None:
            margin = getattr(head, "margin", DEFAULT_MARGIN)
        default_policy = parse_policy(
            policy, fixed_n=n_max, margin=margin, stopping=getattr(head, "stopping", None)
        )
        reader = Estimator(self.engine, head, self.settings.open_ended_parallelism)
        version = version if head is not None else None
        return HeadInUse(head, version, n_max, margin, default_policy, reader, policy)

    @property
    def samples_in_flight(self) -> int:
        return self.in_flight.value

    # The head in use now, and what it sets; a running request reads its plan's instead.
    @property
    def estimator(self) -> Any:
        return self.current.head

    @property
    def n_max(self) -> int:
        return self.current.n_max

    @property
    def margin(self) -> float:
        return self.current.margin

    @property
    def default_policy(self) -> Policy:
        return self.current.default_policy

    def using(self, plan: Plan) -> HeadInUse:
        """The head `plan` runs with."""
        return plan.head or self.current

    def parse_policy(self, spec: str, head: HeadInUse | None = None) -> Policy:
        """A policy spec with the server's defaults (`fixed`: N_max; T2's margin) for `head`
        (default: the current one); ValueError if bad."""
        head = head or self.current
        return parse_policy(
            spec,
            fixed_n=head.n_max,
            margin=head.margin,
            stopping=getattr(head.head, "stopping", None),
        )

    def plan(
        self,
        parallelism: int | str | None = None,
        *,
        max_parallelism: int | None = None,
        policy: str | None = None,
        n_choices: int = 1,
        prompts: int = 1,
        temperature: float | None = None,
        aggregate: str | None = None,
    ) -> Plan:
        """A request's plan; APIError 400 naming the field for what cannot run. An integer
        `parallelism` is Fixed(N) and overrides `policy` (which must still be valid)."""
        cap = min(max_parallelism or self.settings.max_parallelism, self.settings.max_parallelism)
        head = self.current  # read once: the request keeps it (Plan.head)
        try:
            named = None if policy is None else self.parse_policy(policy, head)
        except ValueError as exc:
            raise APIError(400, f"invalid policy: {exc}", param="policy", code="invalid_value") from exc
        if parallelism is None or parallelism == "auto":
            chosen, mode = named or head.default_policy, "auto"
        elif int(parallelism) > cap:
            raise APIError(
                400, f"parallelism {parallelism} exceeds max_parallelism {cap}", param="parallelism",
                code="invalid_value",
            )  # fmt: skip
        else:
            chosen, mode = Fixed(int(parallelism)), "fixed"
        plan = Plan(
            chosen,
            mode,
            cap,
            n_choices,
            prompts,
            is_greedy(temperature),
            aggregate or self.settings.aggregate,
            self._estimator_fallback(temperature, head.head) if mode == "auto" else None,
            head=head,
        )
        if plan.greedy and plan.minimum_samples > prompts:
            # Greedy samples are all the same text (vLLM refuses n > 1 for them); `auto` runs one.
            raise APIError(
                400,
                "temperature 0 (greedy) makes every sample the same: use n=1 with parallelism 'auto' or 1, "
                "or a temperature > 0",
                param="temperature",
                code="invalid_value",
            )
        return plan

    def explored(self, plan: Plan) -> Plan:
        """The plan explored: every choice runs N_max samples to their end (server.exploration)."""
        if plan.greedy:
            raise APIError(
                400, "exploration needs a temperature > 0 (greedy samples are all the same)",
                param="temperature", code="invalid_value",
            )  # fmt: skip
        n_max = self.using(plan).n_max
        return replace(plan, policy=Explore(n_max), cap=n_max, explore=True)

    def _estimator_fallback(self, temperature: float | None, head: Any) -> str | None:
        """Why the head's N is not used at this request temperature (None: vLLM's default,
        1.0): "temperature" when it is too far from the one the head's labels were sampled at,
        where the head's N* is a guess for another distribution; None otherwise."""
        tolerance = self.settings.estimator_temperature_tolerance
        trained = getattr(head, "sampling", {}).get("temperature")
        if tolerance is None or trained is None:
            return None
        requested = 1.0 if temperature is None else float(temperature)
        return "temperature" if abs(requested - float(trained)) > tolerance + 1e-9 else None

    # -- the loop ---------------------------------------------------------------------------

    async def run(
        self,
        prompt_token_ids: list[int],
        params: Any,
        plan: Plan,
        *,
        request_id: str,
        deadline: Deadline | None = None,
        budget: TokenBudget | None = None,
        reader: vllm_openai.OutputParser | None = None,
    ) -> ThinkingResult:
        """One prompt's vote. `reader` splits each sample into reasoning, content and tool calls
        (server.vllm_openai; default: the text is the content); a fresh aggregator keys what is
        left (the params' constraint's, else the plan's `aggregate`; server.aggregation)."""
        head = self.using(plan)
        base = sampling.for_voting(params, token_logprobs=self.settings.tie_break == "logprob")
        expired = deadline.expired if deadline is not None else asyncio.get_running_loop().create_future()
        # The prompt's text: an answer copied from it does not outvote free text (server.aggregation).
        aggregator = aggregation.create(
            params.structured_outputs if reader is None else reader.constraint,
            plan.aggregate,
            self.settings.open_ended_parallelism,
            prompt=self.engine.tokenizer.decode(prompt_token_ids)
            if self.engine.tokenizer is not None
            else None,
        )
        if reader is None:
            vote_key = aggregator.key
        else:

            def vote_key(text: str) -> str | None:
                return aggregation.vote_key(reader.parse(text), aggregator)

        async with SampleGroup(
            self.engine, prompt_token_ids, base, request_id, self.in_flight, vote_key=vote_key
        ) as group:
            if budget is not None:
                budget.watch(group)
            loop = VoteLoop(self, plan, group, aggregator, expired, budget)
            # Capture only when someone reads the states: they cost the engine step time.
            reads = plan.mode == "auto" or plan.explore
            if reads and plan.policy.reads_prediction and self.engine.settings.capture:
                loop.estimate = await head.reader.estimate(
                    group, request_id, plan.estimator_fallback, expired
                )
                if loop.estimate.gate is not None:
                    aggregator.gated(loop.estimate.gate)
            await loop.run()
        choices = self._votes(loop.voted(), loop.timed_out, deadline, aggregator)
        choices = await asyncio.to_thread(picked, choices, aggregator)  # O(N²) text work off the loop
        usc = None
        if aggregator.self_consistency:
            choices, usc = await self._self_consistent(prompt_token_ids, choices, request_id, expired)
        samples = [*loop.late, *(s for c in choices for s in c.samples)]
        return ThinkingResult(
            choices=choices,
            mode=plan.mode,
            n_used=group.launched_for(0),
            n_max=head.n_max,
            max_parallelism=plan.cap,
            estimator=getattr(head.head, "name", "default"),
            head=head.version,
            prompt_tokens=len(prompt_token_ids),
            cached_tokens_per_sample=group.cached_tokens,
            policy=describe(plan.policy),
            launched=group.launched,
            aborted=group.launched - sum(len(c.samples) for c in choices) + loop.partial_voters,
            aggregate=aggregator.ran_for(choices[0].vote.answer),
            estimate=loop.estimate,
            load_cap=loop.load_cap,
            timed_out=loop.timed_out,
            budget_exhausted=loop.budget_exhausted,
            aborted_tokens=sum(s.num_tokens for s in loop.late),
            reasoning_tokens=None
            if reader is None or not reader.has_reasoning
            else sum(reader.reasoning_tokens(s.token_ids) for s in samples),
            usc=usc,
            open_ended=plan.mode == "auto" and aggregator.sample_limit is not None,
            explored=plan.explore,
            finish_order=loop.finish_order(),
        )

    # -- pieces -------------------------------------------------------------------------------

    async def _self_consistent(
        self,
        prompt_token_ids: list[int],
        choices: list[ChoiceResult],
        request_id: str,
        expired: asyncio.Future[None],
    ) -> tuple[list[ChoiceResult], dict[str, int] | None]:
        """Universal Self-Consistency: one greedy pass per choice in which the model, shown its
        candidates after the request's own prompt (so the pass reads that prefix from the
        cache), names the most consistent one; that sample is returned. Skipped for a choice
        with fewer than two candidates, or after the deadline."""
        tokens = {"prompt_tokens": 0, "completion_tokens": 0, "passes": 0}
        picked = []
        for c, choice in enumerate(choices):
            texts = [s.text for s in choice.samples]
            if len(texts) < 2 or expired.done():
                picked.append(choice)
                continue
            suffix = aggregation.usc_prompt(texts)
            ids = prompt_token_ids + list(self.engine.tokenizer.encode(suffix, add_special_tokens=False))
            final = None
            async for output in self.engine.generate(ids, sampling.usc_pass(), f"{request_id}-usc{c}"):
                final = output
            text = final.outputs[0].text if final is not None else ""
            tokens["passes"] += 1
            tokens["prompt_tokens"] += len(ids)
            tokens["completion_tokens"] += len(final.outputs[0].token_ids) if final is not None else 0
            index = aggregation.usc_choice(text, len(texts))
            if index is not None:
                vote = replace(choice.vote, winner_index=index, answer=choice.samples[index].answer)
                choice = ChoiceResult(vote, choice.samples)
            picked.append(choice)
        return picked, tokens

    def _votes(
        self,
        groups: list[list[Sample]],
        timed_out: bool,
        deadline: Deadline | None,
        aggregator: aggregation.Aggregator,
    ) -> list[ChoiceResult]:
        """Each choice's vote over its (finished) samples; after a deadline a choice with none fails."""
        choices = []
        for group in groups:
            if timed_out and not group:
                metrics.TIMEOUTS.labels("failed").inc()
                limit = f" after {deadline.timeout_s:g} s" if deadline and deadline.timeout_s else ""
                raise APIError(
                    504, f"the request timed out{limit} before a sample finished", code="request_timeout"
                )
            vote = majority_vote(aggregator.final([s.answer for s in group]), [s.mean_logprob for s in group])
            choices.append(ChoiceResult(vote, group))
        if timed_out:
            metrics.TIMEOUTS.labels("partial").inc()
        return choices

    def budget(
        self, prediction: float | None, cap: int, margin_scale: float | None = None, *, n_max: int
    ) -> Budget:
        return Budget(
            prediction,
            n_max=n_max,
            default=self.settings.default_parallelism,
            cap=cap,
            margin_scale=margin_scale or 1.0,
        )

    def scaled_cap(self, plan: Plan, own: int) -> int:
        """The per-choice cap after the load curve (1 when greedy: more samples would only
        repeat the first); `own` samples in flight are this request's, not load."""
        if plan.greedy:
            return 1
        if self.samples_limit is None:
            return plan.cap
        return load_scaled_cap(
            plan.cap, self.samples_in_flight - own, self.samples_limit, choices=plan.n_choices
        )

    def first_cap(self, plan: Plan, estimate: Estimate, own: int) -> int:
        """The cap when an `auto` request first chooses N (with `own` samples of its own
        running: sample 0, when it carried the capture), recorded in metrics, with the request
        counted as load-reduced when the cap lowers its first launch."""
        scaled = self.scaled_cap(plan, own=own)
        if self.samples_limit is not None and not plan.greedy:
            metrics.LOAD_CAP.observe(scaled)
            first = plan.policy.first_launch
            prediction, scale, n_max = estimate.prediction, estimate.margin_scale, self.using(plan).n_max
            if scaled < plan.cap and first(self.budget(prediction, scaled, scale, n_max=n_max)) < first(
                self.budget(prediction, plan.cap, scale, n_max=n_max)
            ):
                metrics.LOAD_REDUCED.inc()
        return scaled
