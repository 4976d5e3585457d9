"""Sample 0's states → the head's prediction and the gate's route (server/estimate.py), on
the real engine with the shipped head: open-ended prompts get one sample, others the head's N
at the gate's margin."""

from __future__ import annotations

import pytest

from estimator.gate import Gate
from estimator.head import DEFAULT_HEAD, T2Head
from estimator.offline.inputs.open_ended import KINDS, open_ended_prompts
from estimator.policies import choose_parallelism
from tests.conftest import MODEL_NAME
from tests.server.helpers import QUESTION, client_for, serve

HELD_OUT = [next(p for p in open_ended_prompts() if p.split == "test" and p.kind == kind) for kind in KINDS]


@pytest.fixture
def shipped_head(server_settings):
    """The server's defaults: the shipped head (and its gate), `aggregate: auto`."""
    parallelism = server_settings.parallelism.model_copy(
        update={"estimator_head": "default", "aggregate": "auto"}
    )
    return server_settings.model_copy(update={"parallelism": parallelism})


async def test_open_ended_prompts_get_one_sample_under_auto(engine, shipped_head):
    async with serve(engine, shipped_head) as (url, _), client_for(url) as client:
        replies = [
            await client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": p.question}], max_tokens=32, seed=1
            )
            for p in HELD_OUT
        ]
        # A question the gate does not call open-ended is never cut short, even when its
        # first sample rambles: every sample votes.
        math = await client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=8, seed=0)
    for prompt, reply in zip(HELD_OUT, replies, strict=True):
        t2 = reply.model_extra["t2"]
        assert t2["gate"] == "open_ended", prompt
        assert t2["launched"] == 1 and t2["samples"] == 1, prompt  # the head's N is never spent
        assert reply.choices[0].message.content
    t2 = math.model_extra["t2"]
    assert t2["gate"] in ("answerable", "unfamiliar") and t2["open_ended"] is None
    assert t2["samples"] == t2["launched"] == t2["n_used"]  # every launched sample voted
    if t2["gate"] == "unfamiliar":  # the head's guess is not trusted: the default N
        assert t2["n_used"] == shipped_head.parallelism.default_parallelism and t2["prediction"] is None
    else:  # the head's N, at the margin times the gate's multiple (>= 1, <= the head's far scale)
        gate = Gate.load(DEFAULT_HEAD)
        assert 1.0 <= t2["margin_scale"] <= gate.far_scale
        margin = T2Head.load(DEFAULT_HEAD).meta.margin * t2["margin_scale"]  # the head's own margin
        assert t2["n_used"] == choose_parallelism(
            t2["prediction"],
            n_max=t2["n_max"],
            default=shipped_head.parallelism.default_parallelism,
            cap=t2["max_parallelism"],
            margin=margin,
        )
