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
        elif plan.mode == "auto" and not plan.greedy and self.random.random() < self.share:
            reason = "share"
        else:
            return plan
        explored = self.thinker.explored(plan)
        metrics.EXPLORED.labels(reason).inc()
        return explored

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
