"""What parallel thinking returns for one prompt, and everything made from it in one place:
the response's `usage`, the `t2` extension object, and the per-request metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server import metrics
from server.estimate import Estimate
from server.protocol import PromptTokensDetails, T2Info, Usage, VoteInfo
from server.samples import Sample
from server.voting import Vote


@dataclass
class ChoiceResult:
    vote: Vote
    samples: list[Sample]  # those that voted, in launch order

    @property
    def winner(self) -> Sample:
        return self.samples[self.vote.winner_index]


@dataclass
class ThinkingResult:
    """One prompt's vote (server.parallel.ParallelThinker.run)."""

    choices: list[ChoiceResult]
    mode: Literal["auto", "fixed"]
    n_used: int  # choice 0's launched samples
    n_max: int  # the fixed-N baseline (head's N_max, else the default N)
    max_parallelism: int
    estimator: str  # the head's name, "default" without one
    prompt_tokens: int
    cached_tokens_per_sample: int  # prompt tokens the fan-out samples read from the prefix cache
    policy: str  # the policy that ran (estimator.policy_spec.describe)
    launched: int  # samples sent to the engine
    aborted: int  # of those, samples that did not vote (early stop, deadline)
    aggregate: str  # what the samples voted with (server.aggregation's `ran_for`)
    estimate: Estimate = field(default_factory=Estimate)  # empty unless `auto` read states
    load_cap: int | None = None  # auto: per-choice cap after the load curve
    timed_out: bool = False
    budget_exhausted: bool = False  # the request's token budget ended the vote
    aborted_tokens: int = 0  # tokens of samples that did not vote (paid for all the same)
    reasoning_tokens: int | None = None  # of completion_tokens, with a reasoning parser
    usc: dict[str, int] | None = None  # the self-consistency pass: its tokens and pick
    open_ended: bool = False  # `aggregate: auto` stopped the vote at --open-ended-parallelism
    explored: bool = False  # ran at N_max for the gauge and the records (server.exploration)
    # per choice: its voters' sample numbers in the order they finished
    finish_order: list[list[int]] = field(default_factory=list)
    head: str | None = None  # the head's version (server.head_reload.head_version), with one

    @property
    def samples(self) -> int:
        return sum(len(c.samples) for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        extra = self.usc["completion_tokens"] if self.usc else 0
        return sum(s.num_tokens for c in self.choices for s in c.samples) + self.aborted_tokens + extra

    @property
    def extra_prompt_tokens(self) -> int:
        """Prompt tokens beyond the request's own: the self-consistency pass's."""
        return self.usc["prompt_tokens"] if self.usc else 0


def usage(results: list[ThinkingResult]) -> Usage:
    """Every sample counts, voted or not (aborted samples' tokens were generated too)."""
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


def t2_info(results: list[ThinkingResult], token_budget: int | None = None) -> T2Info:
    """The `t2` object of a request over one or more prompts: the plan and the estimate of
    the first prompt (every prompt runs the same plan), counts summed over all."""
    first = results[0]
    votes = [c.vote for r in results for c in r.choices]
    estimate = first.estimate
    return T2Info(
        mode=first.mode,
        n_used=first.n_used,
        n_max=first.n_max,
        max_parallelism=first.max_parallelism,
        estimator=first.estimator,
        head=first.head,
        policy=first.policy,
        aggregate=first.aggregate,
        usc=first.usc,
        load_cap=first.load_cap,
        open_ended=first.open_ended or None,
        explored=first.explored or None,
        prediction=estimate.prediction,
        capture_ms=estimate.capture_ms,
        gate=estimate.gate,
        margin_scale=estimate.margin_scale,
        estimator_fallback=estimate.estimator_fallback,
        samples=sum(r.samples for r in results),
        timed_out=any(r.timed_out for r in results),
        budget_exhausted=any(r.budget_exhausted for r in results),
        max_total_tokens=token_budget,
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


def record(result: ThinkingResult) -> None:
    """One prompt's contribution to the Prometheus metrics."""
    estimate = result.estimate
    metrics.SAMPLES.inc(result.launched)
    metrics.SAMPLES_ABORTED.inc(result.aborted)
    metrics.POLICY_REQUESTS.labels(result.policy.partition(":")[0]).inc()
    metrics.AGGREGATES.labels(result.aggregate, str(result.open_ended).lower()).inc()
    if estimate.estimator_fallback is not None:
        metrics.ESTIMATOR_FALLBACKS.labels(estimate.estimator_fallback).inc()
    metrics.BASELINE_SAMPLES.inc(result.n_max * len(result.choices))
    metrics.GENERATED_TOKENS.inc(result.completion_tokens)
    metrics.CHOSEN_N.observe(result.n_used)
    if estimate.capture_ms is not None:
        metrics.CAPTURE_SECONDS.observe(estimate.capture_ms / 1000)
    if estimate.prediction is not None:
        metrics.PREDICTION.observe(estimate.prediction)
    if estimate.estimator_ms is not None:
        metrics.ESTIMATOR_SECONDS.observe(estimate.estimator_ms / 1000)
    for choice in result.choices:
        vote = choice.vote
        if vote.num_voters:
            metrics.AGREEMENT.observe(vote.agreement)
        metrics.VOTES.labels("no_answer" if vote.answer is None else "tie" if vote.tie else "decided").inc()
