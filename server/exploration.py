"""Exploration: some requests run at N_max samples so the server can measure itself on its
own traffic.

A share `--explore-share` of `auto` requests (drawn per request), and any request whose body
sets `t2_explore: true` with an admin key (--admin-key) as its Bearer token, are explored:
decided before admission (which then reserves N_max samples per choice), every choice runs
N_max samples (`Explore`: one engine request per sample, so the order they finish in is
seen) and none is stopped early, whatever the load or the head's gate; the prompt's states
are captured as for `auto`. The client gets the N_max vote and `t2.explored: true`; `usage`
counts every sample, as always. Each complete pool then feeds the live gauge
(server/shadow.py) and, with --record-dir, the traffic records (server/recording.py).
Nothing here fails a request once it runs: recording and the gauge only count their
failures.

`--explore-budget B` bounds exploration's cost in samples, the unit an operator pays,
whatever `auto` costs on the traffic (`ExploreBudget`): the share draws candidates (every
`auto` request when the share is 0), the budget lets a candidate through only while
exploration's extra samples stay within a share B of the samples the server launches.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from estimator.policies import Fixed
from server import metrics
from server.config import ServerSettings
from server.errors import APIError
from server.recording import Recorder, complete_pools, model_identity, traffic_records
from server.shadow import ShadowGauge

if TYPE_CHECKING:
    from server.parallel import ParallelThinker, Plan
    from server.protocol import SamplingFields
    from server.requests import RequestContext
    from server.result import ThinkingResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explore(Fixed):
    """Fixed(N_max) with each sample its own engine request (so each finishes on its own)
    and the prompt's states captured: the loop runs every sample to its end. Not a
    registered policy: only exploration runs it; `t2.policy` reports it as explore:n=N."""

    adapts = True
    reads_prediction = True

    @property
    def name(self) -> str:
        return "explore"


def samples_launched() -> float:
    """Samples every served request launched so far in this process, explored ones too
    (t2serve_samples_dispatched_total, counted when a request's result is recorded:
    server.result.record)."""
    (family,) = metrics.SAMPLES.collect()
    return next(s.value for s in family.samples if s.name.endswith("_total"))


class ExploreBudget:
    """--explore-budget B: the extra samples exploration spends (an explored request's
    samples beyond what `auto` would have launched for it) held to a share B of all samples
    launched, over every prefix of traffic, not only on average.

    A credit: every sample the server launches earns B, every explored request spends its
    extra samples when it is planned. Every sample, not only unexplored `auto` ones: B is a
    share of what the operator pays for, which is all of them (fixed-N requests and the
    explored requests' own samples too), and t2serve_samples_dispatched_total, where the
    serving path counts each finished request's launched samples (`usage`'s), is what this
    class sees of requests it does not explore. A candidate is explored with probability
    min(1, credit / cost), never with no credit, so the credit never falls below minus one
    request's cost: extra <= B x launched + one request's cost at every moment. Requested
    (admin) explorations are charged without asking and may drive the credit further
    negative; the share's candidates then wait until traffic has earned it back.

    Why a draw and not "the next candidate once the credit suffices": the probability
    depends only on the credit (past traffic) and the request's cost (N_max x choices x
    prompts, its shape), never on its content, so among same-shaped candidates the explored
    ones are a uniform draw, and a client whose requests arrive right after a refill is not
    favoured. Requests with more choices or prompts cost more and are drawn less often while
    the credit is short (`t2.explored` pools are per choice, so the gauge weighs their
    choices as it always did)."""

    def __init__(self, share: float, rng: random.Random):
        self.share = share
        self.random = rng
        self.credit = 0.0

    def earn(self, samples: float) -> None:
        """Samples the server launched: each earns `share` of a sample."""
        self.credit += self.share * samples
        metrics.EXPLORE_CREDIT.set(self.credit)

    def allows(self, cost: float) -> bool:
        """Whether a candidate costing `cost` extra samples may be explored (a draw)."""
        if cost <= 0:
            return True
        return self.credit > 0 and self.random.random() < self.credit / cost

    def charge(self, cost: float) -> None:
        self.credit -= cost
        metrics.EXPLORE_CREDIT.set(self.credit)


class Exploration:
    """Which requests are explored, and where their pools go."""

    def __init__(self, settings: ServerSettings, thinker: ParallelThinker, engine: Any):
        self.share = settings.recording.explore_share
        self.record_text = settings.recording.record_text
        self.thinker = thinker
        self.engine = engine
        self.recorder = Recorder(settings.recording) if settings.recording.record_dir else None
        self.random = random.Random()
        self.gauge = ShadowGauge.following(thinker)  # a reload's head and policy too
        budget = settings.recording.explore_budget
        self.budget = ExploreBudget(budget, self.random) if budget is not None else None
        self.launched_seen = samples_launched()  # the credit counts from this server's start

    def plan(self, plan: Plan, request: SamplingFields, admin: bool) -> Plan:
        """The request's plan, explored if it asked (admin only: 403 otherwise) or was drawn."""
        if request.t2_explore and not admin:
            raise APIError(
                403,
                "t2_explore is admin-only: send an admin key (--admin-key) as the Bearer token",
                param="t2_explore",
                code="admin_only",
            )
        if request.t2_explore:
            reason = "requested"
        elif plan.mode == "auto" and not plan.greedy and self.drawn():
            reason = "share"
        else:
            return plan
        explored = self.thinker.explored(plan)
        cost = self.extra_samples(explored)
        if self.budget is not None:
            self.budget.earn(self.launched_since())
            if reason == "share" and not self.budget.allows(cost):
                metrics.EXPLORED.labels("budget_skipped").inc()
                return plan
            self.budget.charge(cost)
        metrics.EXPLORED.labels(reason).inc()
        metrics.EXPLORE_EXTRA_SAMPLES.inc(cost)
        return explored

    def drawn(self) -> bool:
        """The share's draw; with a budget and no share, every `auto` request is a candidate."""
        if self.budget is not None and self.share == 0:
            return True
        return self.random.random() < self.share

    def launched_since(self) -> float:
        """Samples launched since the last look (what the budget earns on)."""
        now = samples_launched()
        launched, self.launched_seen = now - self.launched_seen, now
        return launched

    def extra_samples(self, explored: Plan) -> float:
        """An explored plan's samples beyond what `auto` would have launched for it: N_max
        minus `auto`'s samples per choice, for each choice of each prompt.

        `auto`'s samples per choice are the live gauge's `auto` row: its replay of the policy
        `auto` serves on the explored pools, a uniform draw of the traffic, so what `auto`
        would have launched on requests like this one (the load curve aside). Served `auto`
        requests never pass through here, and their mean would count the load curve's cuts.
        Before the first pool (or after a reload restarts the row) it is 1, the fewest `auto`
        launches: the charge is then the most it can be, so the bound still holds."""
        auto = self.gauge.totals.get("auto")
        per_choice = auto.mean_samples if auto is not None and auto.pools else 1.0
        choices = explored.prompts * explored.n_choices
        return max(0.0, (explored.cap - per_choice) * choices)

    def observe(self, ctx: RequestContext, results: list[ThinkingResult]) -> None:
        """An explored request's pools, to the gauge and the records (queued); never raises."""
        try:
            for result in results:
                estimate = result.estimate
                for _, pool in complete_pools(result):
                    self.gauge.observe([s.answer for s in pool], estimate.prediction, estimate.margin_scale)
        except Exception:
            logger.warning("the live gauge could not replay an explored pool", exc_info=True)
        if self.recorder is None:
            return
        try:
            info = self.engine.info
            for p, result in enumerate(results):
                text = self.engine.tokenizer.decode(ctx.prompts[p]) if self.record_text else None
                self.recorder.submit(
                    traffic_records(
                        result,
                        request_id=ctx.request_id,
                        prompt=p,
                        params=ctx.sampling[p][0],
                        model=model_identity(self.engine),
                        replica=self.recorder.replica,
                        shape=(info.num_layers, info.hidden_size),
                        prompt_text=text,
                    )
                )
        except Exception:
            logger.warning("an explored request's records could not be made", exc_info=True)
            metrics.LABEL_RECORDS.labels("dropped_error").inc()

    async def start(self) -> None:
        if self.recorder is not None:
            await self.recorder.start()

    async def stop(self) -> None:
        if self.recorder is not None:
            await self.recorder.stop()
