"""The live gauge (server/shadow.py): each policy's agreement with the N_max vote and its
samples on an explored pool equal the offline replay of that pool (exact); the running means,
the samples saved against the cheapest fixed N with the same agreement, and the gauge fed by
explored requests (scripted engine)."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.offline.evaluation.replay import Pool, PoolReplay
from server.config import EngineSettings, RecordingSettings, ServerSettings
from server.exploration import Exploration
from server.shadow import ShadowGauge, shadow_policies
from server.voting import majority_vote
from tests.conftest import MODEL_NAME
from tests.server.engine_double import Finish, ScriptedEngine
from tests.server.helpers import PROMPT, metric, params, thinker_for

N_MAX = 8


def pools(count: int, seed: int) -> list[tuple[list[str | None], float | None, float]]:
    """Pools of N_MAX keys (a few answers, some abstentions), with a prediction and a margin
    multiple, some without a prediction (no head)."""
    rng = np.random.default_rng(seed)
    out = []
    for q in range(count):
        keys = rng.choice(["1", "2", "3", None], size=N_MAX, p=rng.dirichlet([2, 1, 1, 0.3])).tolist()
        keys[rng.integers(N_MAX)] = "1"  # the vote names an answer
        prediction = None if q % 5 == 0 else float(rng.uniform(0.05, 1.0))
        out.append((keys, prediction, float(rng.choice([1.0, 1.5]))))
    return out


def gauge(**settings) -> ShadowGauge:
    thinker = thinker_for(None, default_parallelism=N_MAX, **settings)
    return ShadowGauge(shadow_policies(thinker), n_max=N_MAX, default=N_MAX)


def test_the_policies_are_auto_esc_ac_every_fixed_n_and_the_served_policy_by_its_spec():
    labels = list(gauge(policy="t2:margin=1.5").policies)
    assert labels == ["auto", "esc", "ac", *(f"fixed:n={n}" for n in range(1, N_MAX + 1)), "t2:margin=1.5"]
    # A served policy that another row already runs gets no row of its own.
    assert list(gauge(policy=f"fixed:n={N_MAX}").policies)[-1] == f"fixed:n={N_MAX}"


@pytest.mark.parametrize("policy", ["t2:margin=1.5", "t2+beta:c=0.8,margin=0.5", "esc:window=2"])
def test_each_policys_outcome_equals_the_offline_replay_of_the_pool(policy):
    live = gauge(policy=policy)
    offline: dict[str, list[tuple[float, float]]] = {label: [] for label in live.policies}
    for keys, prediction, scale in pools(60, seed=1):
        outcomes = live.observe(keys, prediction, scale)
        gold = majority_vote(keys).answer  # the N_max vote, as the offline replay's gold
        replay = PoolReplay(Pool(keys, [1] * N_MAX, gold, prediction, scale), np.array([range(N_MAX)]), N_MAX)
        for label, p in live.policies.items():
            row = replay.replay(p)
            assert (float(outcomes[label].agrees), float(outcomes[label].samples)) == (
                row["accuracy"],
                row["launched"],
            ), label
            offline[label].append((row["accuracy"], row["launched"]))
    for label, rows in offline.items():
        agreement, samples = np.mean(rows, axis=0)
        assert live.totals[label].agreement == pytest.approx(agreement, abs=1e-12)
        assert live.totals[label].mean_samples == pytest.approx(samples, abs=1e-12)
        assert metric("t2serve_shadow_agreement", policy=label) == live.totals[label].agreement
    assert live.totals[f"fixed:n={N_MAX}"].agreement == 1.0  # N_max agrees with itself


def test_samples_saved_are_against_the_cheapest_fixed_n_that_agrees_as_often():
    live = gauge(policy="esc:window=2")
    # Unanimous pools: every policy agrees; ESC (window 2) stops at 2, fixed N = 1 agrees too.
    for _ in range(3):
        live.observe(["4"] * N_MAX)
    assert live.totals["auto"].mean_samples == 2 and live.saved("auto") == 1 - 2  # fixed 1 is cheaper
    assert live.saved("fixed:n=3") is None
    assert metric("t2serve_shadow_samples_saved", policy="auto") == -1.0
    # A pool whose first two samples mislead: fixed 1 and 2 miss it, fixed 3 and ESC (at 6) do not.
    live.observe(["2", "1", "1", "2", "1", "1", "2", "1"])
    assert [live.totals[f"fixed:n={n}"].agreement for n in (1, 2, 3)] == [0.75, 0.75, 1.0]
    assert live.totals["auto"].agreement == 1.0 and live.totals["auto"].mean_samples == (3 * 2 + 6) / 4
    assert live.cheapest_fixed(1.0) is live.totals["fixed:n=3"] and live.saved("auto") == 3 - 3


async def test_explored_requests_feed_the_gauge():
    engine = ScriptedEngine(lambda i: Finish(str(i % 3)))
    thinker = thinker_for(engine)
    settings = ServerSettings(
        engine=EngineSettings(model="x", served_model_name=MODEL_NAME),
        recording=RecordingSettings(explore_share=1),
    )
    exploration = Exploration(settings, thinker, engine)
    result = await thinker.run(
        PROMPT, params(), thinker.explored(thinker.plan("auto", n_choices=2)), request_id="r"
    )
    before = metric("t2serve_shadow_pools_total")
    exploration.observe(None, [result])  # no recorder: only the gauge (the context is not read)
    assert metric("t2serve_shadow_pools_total") == before + 2
    assert (
        exploration.gauge.totals["fixed:n=4"].pools == 2
        and exploration.gauge.totals["fixed:n=4"].agreement == 1
    )
