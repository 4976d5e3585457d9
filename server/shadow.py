"""The live gauge: on every explored pool, what each policy would have done with it.

An explored choice (server/exploration.py) ran N_max samples to their end. Each policy at
its current knobs is driven over the pool's vote keys in the order the samples finished, by
the offline replay's own driver (estimator.replay.drive), with the budget the offline replay
gives a labelled pool (the head's prediction and the gate's margin multiple for this prompt,
the default N, the cap N_max):

    agrees    the vote (server.voting.majority_vote) over the samples the policy let finish
              names the pool's N_max vote: the vote over all N_max keys in the same order
              (what fixed N_max gives; it differs from the answer the client got only where a
              tie is broken by order)
    samples   the samples the policy launched (aborted ones are paid for too)

so a pool's outcome equals the offline replay (estimator/offline/evaluation/replay.py) of
that pool in that one ordering with the N_max vote as its gold answer (a test checks it).
1 - agreement bounds the accuracy a policy gives up against fixed N_max.

The policies: `auto` (the policy `auto` runs: --policy, or a reload's), `t2+learned` (with a
stopping table), `esc`, `ac` (beta criterion) at their default knobs, `fixed:n=1` ...
`fixed:n=N_max`, and the served policy under its own spec (e.g. `ac-beta:c=0.99,...`) when no
other row runs it, so a dashboard tells one tuned policy from the next. They follow the head
and policy in use: after a reload (server/head_reload.py) the next pool is replayed with the
new ones, and a row whose policy changed (or left, or reads the prediction of a head that
changed) starts its running means afresh. Exported, as running means over this process's
explored pools: t2serve_shadow_agreement{policy} and t2serve_shadow_samples{policy}, with
the counts behind them; and for every policy that is
not a fixed N, t2serve_shadow_samples_saved{policy}: the samples of the cheapest fixed N
whose agreement is at least the policy's, minus the policy's own (negative: that fixed N is
cheaper). Beside "samples saved against N_max" it is the honest figure: what the policy's
per-question choice saves over the fixed N that keeps as much agreement.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from estimator.policies import Budget, Fixed, Policy
from estimator.policy_spec import describe
from estimator.replay import drive
from server import metrics
from server.voting import majority_vote

if TYPE_CHECKING:
    from server.parallel import HeadInUse, ParallelThinker

logger = logging.getLogger(__name__)


def shadow_policies(thinker: ParallelThinker, head: HeadInUse | None = None) -> dict[str, Policy]:
    """The policies the gauge replays with `head` (default: the one in use), by their metric label."""
    head = head or thinker.current
    served = head.default_policy
    policies: dict[str, Policy] = {"auto": served}
    if getattr(head.head, "stopping", None) is not None:
        policies["t2+learned"] = thinker.parse_policy("t2+learned", head)
    policies["esc"] = thinker.parse_policy("esc", head)
    policies["ac"] = thinker.parse_policy("ac", head)
    for n in range(1, head.n_max + 1):
        policies[f"fixed:n={n}"] = Fixed(n)
    spec = describe(served)
    if all(describe(p) != spec for label, p in policies.items() if label != "auto"):
        policies[spec] = served
    return policies


@dataclass(frozen=True)
class Outcome:
    agrees: bool
    samples: int


@dataclass
class Totals:
    pools: int = 0
    agreed: int = 0
    samples: int = 0

    @property
    def agreement(self) -> float:
        return self.agreed / self.pools

    @property
    def mean_samples(self) -> float:
        return self.samples / self.pools


def replay_pool(policy: Policy, budget: Budget, answers: Sequence[str | None]) -> Outcome:
    """One policy on one pool: `answers` in finishing order, all N_max of them."""
    run = drive(policy, budget, answers)
    reference = majority_vote(answers).answer
    return Outcome(majority_vote(answers[: run.finished]).answer == reference, run.launched)


class ShadowGauge:
    """Running agreement with N_max and samples per policy, exported as metrics."""

    def __init__(self, policies: dict[str, Policy], *, n_max: int, default: int):
        self.policies = policies
        self.n_max = n_max
        self.default = default
        self.totals = {label: Totals() for label in policies}
        self.thinker: ParallelThinker | None = None  # followed: see following()
        self.head: HeadInUse | None = None  # the head in use the policies were built with

    @classmethod
    def following(cls, thinker: ParallelThinker) -> ShadowGauge:
        """A gauge that replays with the thinker's head and policy in use, whatever a reload
        swaps in."""
        head = thinker.current
        gauge = cls(
            shadow_policies(thinker, head), n_max=head.n_max, default=thinker.settings.default_parallelism
        )
        gauge.thinker, gauge.head = thinker, head
        return gauge

    def rebind(self, policies: dict[str, Policy], n_max: int, new_head: bool = False) -> None:
        """Replay `policies` from now on: a row whose policy is the same keeps its running
        means, a changed or new one starts afresh (with `new_head`, so does every row that
        reads the head's prediction), a row no longer replayed is dropped (its gauges with it)."""
        kept = {
            label: self.totals[label]
            for label, policy in policies.items()
            if label in self.policies
            and describe(self.policies[label]) == describe(policy)
            and not (new_head and policy.reads_prediction)
        }
        for label in self.policies.keys() - kept.keys():
            for gauge in (metrics.SHADOW_AGREEMENT, metrics.SHADOW_SAMPLES, metrics.SHADOW_SAVED):
                with contextlib.suppress(KeyError):  # a row with no pool yet has none
                    gauge.remove(label)
        self.policies, self.n_max = policies, n_max
        self.totals = {label: kept.get(label) or Totals() for label in policies}

    def _follow(self) -> None:
        """Rebind to the thinker's head in use if a reload swapped it."""
        if self.thinker is None or self.thinker.current is self.head:
            return
        new_head = self.head is None or self.thinker.current.head is not self.head.head
        self.head = self.thinker.current
        self.rebind(shadow_policies(self.thinker, self.head), self.head.n_max, new_head)
        logger.info(
            "live gauge: replaying with the reloaded head and policy %s", describe(self.head.default_policy)
        )

    def observe(
        self,
        answers: Sequence[str | None],
        prediction: float | None = None,
        margin_scale: float | None = None,
    ) -> dict[str, Outcome]:
        """Replay every policy on one pool (N_max keys in finishing order) and export."""
        self._follow()
        if len(answers) != self.n_max:
            raise ValueError(f"a pool of {len(answers)} samples, not N_max = {self.n_max}")
        budget = Budget(
            prediction,
            n_max=self.n_max,
            default=self.default,
            cap=self.n_max,
            margin_scale=margin_scale or 1.0,
        )
        outcomes = {label: replay_pool(policy, budget, answers) for label, policy in self.policies.items()}
        metrics.SHADOW_POOLS.inc()
        for label, outcome in outcomes.items():
            totals = self.totals[label]
            totals.pools += 1
            totals.agreed += outcome.agrees
            totals.samples += outcome.samples
            metrics.SHADOW_AGREED.labels(label).inc(outcome.agrees)
            metrics.SHADOW_SAMPLES_LAUNCHED.labels(label).inc(outcome.samples)
            metrics.SHADOW_AGREEMENT.labels(label).set(totals.agreement)
            metrics.SHADOW_SAMPLES.labels(label).set(totals.mean_samples)
        for label in self.policies:
            saved = self.saved(label)
            if saved is not None:
                metrics.SHADOW_SAVED.labels(label).set(saved)
        return outcomes

    def cheapest_fixed(self, agreement: float) -> Totals:
        """The fixed N with the fewest samples whose agreement is at least `agreement`
        (fixed N_max agrees always, so there is one)."""
        fixed = [(p.n, self.totals[label]) for label, p in self.policies.items() if type(p) is Fixed]
        return next(t for _, t in sorted(fixed, key=lambda f: f[0]) if t.agreement >= agreement)

    def saved(self, label: str) -> float | None:
        """Samples saved against the cheapest fixed N that agrees as often (None: a fixed N
        itself, or no pool yet)."""
        totals = self.totals[label]
        if type(self.policies[label]) is Fixed or not totals.pools:
            return None
        return self.cheapest_fixed(totals.agreement).mean_samples - totals.mean_samples
