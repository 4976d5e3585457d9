"""The vote loop of one prompt (steps 2-3 of server/parallel.py's docstring) and the pick of
each choice's returned sample (step 4's aggregator rule): driven by `ParallelThinker.run`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from estimator.policies import Budget, Decision, Tally
from server import aggregation, consensus
from server.budget import TokenBudget
from server.estimate import Estimate
from server.result import ChoiceResult
from server.samples import Sample, SampleGroup

if TYPE_CHECKING:
    from server.parallel import ParallelThinker, Plan


def picked(choices: list[ChoiceResult], aggregator: aggregation.Aggregator) -> list[ChoiceResult]:
    """Each choice with the sample the aggregator returns for its winning key (e.g. the
    consensus group's medoid), where it has its own rule. When no group won and the pick is
    the medoid of all samples (consensus.mbr_keys), the agreement reported is the picked
    sample's own group's share, not the pooled key's 1.0."""
    out = []
    for choice in choices:
        vote, key = choice.vote, choice.vote.answer
        members = [i for i, k in enumerate(vote.answers) if k == key]
        k = None if key is None else aggregator.pick(key, [choice.samples[i].text for i in members])
        if k is not None:
            winner = members[k]
            agreement = vote.agreement
            if consensus.is_mbr_key(key) and vote.num_voters:
                own = choice.samples[winner].answer
                agreement = sum(s.answer == own for s in choice.samples) / vote.num_voters
            vote = replace(vote, winner_index=winner, agreement=agreement)
        out.append(ChoiceResult(vote, choice.samples))
    return out


@dataclass
class _Vote:
    """One choice's vote while it runs."""

    tally: Tally = field(default_factory=Tally)  # what the policy sees, in finishing order
    samples: list[Sample] = field(default_factory=list)
    stopped: bool = False


class VoteLoop:
    """Steps 2-3 of the module docstring for one prompt: the first launch of every choice,
    then each finished sample shown to its choice's policy, until every vote stopped or the
    deadline passed; then what still runs is drained."""

    def __init__(
        self,
        thinker: ParallelThinker,
        plan: Plan,
        group: SampleGroup,
        aggregator: aggregation.Aggregator,
        expired: asyncio.Future[None],
        budget: TokenBudget | None = None,
    ):
        self.thinker = thinker
        self.plan = plan
        self.group = group
        self.aggregator = aggregator
        self.expired = expired
        # The request's token budget running out ends the vote like the deadline does,
        # except that a choice with no finished sample votes over its partial ones.
        self.exhausted = budget.exhausted if budget is not None else None
        self.votes = [_Vote() for _ in range(plan.n_choices)]
        self.estimate = Estimate()  # filled in by the estimator before run(), for `auto`
        self.load_cap: int | None = None
        self.timed_out = False
        self.budget_exhausted = False
        self.partial_voters = 0  # samples cut by the budget that vote all the same
        self.late: list[Sample] = []  # finished after their vote stopped, or never finished

    def budget(self) -> Budget:
        """The vote's budget now: `auto` re-reads the load curve (its own samples are not load)."""
        plan, thinker = self.plan, self.thinker
        head = thinker.using(plan)
        if plan.explore:  # N_max, whatever the load and the gate
            return thinker.budget(
                self.estimate.prediction, plan.cap, self.estimate.margin_scale, n_max=head.n_max
            )
        cap = plan.cap if plan.mode == "fixed" else thinker.scaled_cap(plan, own=self.group.running())
        cap = head.reader.gate_cap(self.estimate, cap)
        return thinker.budget(self.estimate.prediction, cap, self.estimate.margin_scale, n_max=head.n_max)

    def cut(self) -> bool:
        """Whether the deadline passed or the token budget ran out."""
        return self.expired.done() or (self.exhausted is not None and self.exhausted.done())

    async def run(self) -> None:
        plan, group = self.plan, self.group
        ends = [self.expired] if self.exhausted is None else [self.expired, self.exhausted]
        if plan.mode == "auto" and not plan.explore and not self.cut():
            self.load_cap = self.thinker.first_cap(plan, self.estimate, own=group.running())
        for c in range(plan.n_choices):
            if self.cut():
                break
            k = plan.policy.first_launch(self.budget()) - group.launched_for(c)
            group.launch(c, k, separately=plan.policy.adapts)
        while not self.cut() and not all(v.stopped for v in self.votes):
            for sample in await group.next_finished(*ends):
                await self._show(sample)
            if not group.running():  # a policy never waits on nothing; guard anyway
                break
        unfinished = not all(v.stopped for v in self.votes)
        self.timed_out = self.expired.done() and unfinished
        self.budget_exhausted = not self.timed_out and self.cut() and unfinished
        # Stopped (or cut) votes' samples end with their partial output at once.
        for sample in await group.drain():
            vote = self.votes[sample.choice]
            voting = (self.timed_out or self.budget_exhausted) and sample.finished and not vote.stopped
            (vote.samples if voting else self.late).append(sample)
        if self.budget_exhausted:
            self._partials_vote()

    def _partials_vote(self) -> None:
        """After the budget ran out, a running choice with no finished sample votes over its
        partial ones, cut by the budget as `max_tokens` cuts a sample ("length")."""
        for c, vote in enumerate(self.votes):
            if vote.stopped or vote.samples:
                continue
            partial = [s for s in self.late if s.choice == c and s.finish_reason == "abort"]
            self.late = [s for s in self.late if s not in partial]
            vote.samples = [replace(s, finish_reason="length") for s in partial]
            self.partial_voters += len(partial)

    async def _show(self, sample: Sample) -> None:
        """A finished sample joins its vote; the policy waits, launches more or stops it."""
        plan, group = self.plan, self.group
        vote = self.votes[sample.choice]
        if vote.stopped:  # finished as the abort went out: paid for, not voted
            self.late.append(sample)
            return
        vote.samples.append(sample)
        vote.tally.add(sample.answer)
        launched = group.launched_for(sample.choice)
        decision = plan.policy.on_result(vote.tally, launched, self.budget())
        # Open-ended free text under `aggregate: auto`: an `auto` vote stops early.
        limit = self.aggregator.sample_limit if plan.mode == "auto" and not plan.explore else None
        if limit is not None and vote.tally.finished >= limit:
            decision = Decision(stop=True)
        if decision.launch > 0 and not decision.stop:
            group.launch(sample.choice, decision.launch, separately=plan.policy.adapts)
        elif decision.stop or vote.tally.finished >= launched:  # nothing left to wait for
            vote.stopped = True
            await group.abort(sample.choice)

    def finish_order(self) -> list[list[int]]:
        """Each choice's voters' sample numbers in the order they finished."""
        return [[s.number for s in v.samples] for v in self.votes]

    def voted(self) -> list[list[Sample]]:
        """Each choice's voters in launch order (so, under a seed, the result does not
        depend on which sample finished first)."""
        return [sorted(v.samples, key=lambda s: s.number) for v in self.votes]
