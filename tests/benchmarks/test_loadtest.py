"""benchmarks/loadtest.py: its pure helpers, and its core against the session's real server."""

from __future__ import annotations

import statistics

import httpx
import numpy as np
import pytest

from benchmarks.loadtest import (
    Load,
    estimator_info,
    load_problems,
    parse_variant,
    percentile,
    poisson_arrivals,
    record_from_reply,
    run_load,
    summarize,
)
from tests.conftest import MODEL_NAME


def test_percentile_matches_numpy_linear_interpolation():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([2.0], 99) == 2.0
    assert percentile([], 50) is None


def test_poisson_arrivals_are_deterministic_increasing_with_the_right_rate():
    arrivals = poisson_arrivals(4.0, 4000, seed=7)
    assert arrivals == poisson_arrivals(4.0, 4000, seed=7)
    assert arrivals != poisson_arrivals(4.0, 4000, seed=8)
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)]
    assert all(g > 0 for g in gaps)
    # Exponential gaps: mean 1/rate, standard deviation 1/rate (2.5 % tolerance at n = 4000).
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.08)


def test_parse_variant_and_records():
    assert parse_variant('esc={"parallelism": 16, "stop": "x"}') == ("esc", {"parallelism": 16, "stop": "x"})
    with pytest.raises(Exception):  # noqa: B017 - argparse's type error
        parse_variant("no-body")
    reply = {
        "choices": [{"message": {"content": "Answer: 7"}}, {"message": {"content": "Answer: 8"}}],
        "usage": {"completion_tokens": 50},
        "t2": {"samples": 6, "n_max": 16, "answer": "7"},
    }
    record = record_from_reply(200, reply, 1.0, gold="7")
    assert (record.samples, record.baseline, record.correct, record.completion_tokens) == (6, 32, True, 50)
    # A plain OpenAI server (no t2): one sample per choice, answer extracted from the text.
    plain = record_from_reply(200, {"choices": reply["choices"][:1], "usage": {}}, 1.0, gold="8")
    assert (plain.samples, plain.baseline, plain.correct) == (1, 1, False)
    assert record_from_reply(429, {}, 0.1, gold="7").status == "429"


def test_builtin_problems_come_from_the_test_split_with_gold_answers():
    problems = load_problems(12, seed=0, data="builtin")
    assert len(problems) == 12 and all(p.split == "test" and p.answer for p in problems)


@pytest.mark.engine
@pytest.mark.slow
async def test_loadtest_core_against_the_real_server(server_url):
    problems = load_problems(4, seed=0, data="builtin")
    common = dict(temperature=0.3, max_tokens=6, progress=False)
    async with httpx.AsyncClient(base_url=server_url, timeout=120) as http:
        # Closed loop, auto (no head in the test server: default N = 4 = the baseline).
        records, wall = await run_load(
            http, MODEL_NAME, problems, {"parallelism": "auto"}, Load("concurrency", 2), requests=5,
            duration_s=120, **common,
        )  # fmt: skip
        auto = summarize(records, wall)
        assert auto["sent"] == auto["ok"] == 5 and auto["errors"] == {}
        assert auto["samples"] == auto["baseline_samples"] == 5 * 4
        assert auto["graded"] == 5 and 0.0 <= auto["accuracy"] <= 1.0
        assert 0 < auto["latency_p50_s"] <= auto["latency_p90_s"] <= auto["latency_p99_s"] <= wall
        assert auto["generated_tokens"] > 0 and auto["requests_per_s"] == pytest.approx(5 / wall)

        # Fixed N below the baseline: fewer samples dispatched than a fixed-N_max server would.
        records, wall = await run_load(
            http, MODEL_NAME, problems, {"parallelism": 2}, Load("concurrency", 3), requests=4,
            duration_s=120, **common,
        )  # fmt: skip
        fixed = summarize(records, wall)
        assert fixed["ok"] == 4 and fixed["samples"] == 8 < fixed["baseline_samples"] == 16
        assert fixed["saved_fraction"] == pytest.approx(0.5)

        # Open loop bounded by duration: exactly the arrivals inside the window are sent,
        # and rejected requests are counted by status.
        arrivals = poisson_arrivals(3.0, 50, seed=1)
        records, wall = await run_load(
            http, MODEL_NAME, problems, {"parallelism": 0}, Load("rate", 3.0), requests=50,
            duration_s=1.5, seed=1, **common,
        )  # fmt: skip
        rejected = summarize(records, wall)
        assert rejected["sent"] == sum(t < 1.5 for t in arrivals) > 0
        assert rejected["ok"] == 0 and rejected["errors"] == {"400": rejected["sent"]}
        assert rejected["latency_p50_s"] is None and rejected["accuracy"] is None

        # The result names the server's head (t2serve_estimator_info; the test server has none).
        info = await estimator_info(http)
        assert info is not None and {"identity", "n_max", "layers"} <= set(info)
