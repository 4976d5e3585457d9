"""benchmarks/loadtest.py: its pure helpers, and its core against the session's real server."""

from __future__ import annotations

import argparse
import statistics

import httpx
import numpy as np
import pytest

from benchmarks.loadtest import (
    Load,
    RequestRecord,
    benchmark,
    estimator_info,
    inter_token_latencies,
    load_problems,
    meets_slo,
    parse_args,
    parse_goodput,
    parse_variant,
    percentile,
    plot,
    poisson_arrivals,
    print_table,
    read_stream,
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
    assert not record.explored
    explored = record_from_reply(200, {**reply, "t2": {**reply["t2"], "explored": True}}, 1.0, gold="7")
    assert explored.explored  # benchmarks/explore_budget.py tells explored requests apart by it
    # A plain OpenAI server (no t2): one sample per choice, answer extracted from the text.
    plain = record_from_reply(200, {"choices": reply["choices"][:1], "usage": {}}, 1.0, gold="8")
    assert (plain.samples, plain.baseline, plain.correct) == (1, 1, False)
    assert record_from_reply(429, {}, 0.1, gold="7").status == "429"


def test_goodput_counts_requests_within_every_slo_per_second_of_the_run():
    slo = parse_goodput(["e2el:2000", "ttft:500"])
    assert slo == {"e2el": 2.0, "ttft": 0.5}
    records = [
        RequestRecord("200", 1.5, ttft_s=0.4),  # within both
        RequestRecord("200", 2.0, ttft_s=0.5),  # on both limits: within
        RequestRecord("200", 2.5, ttft_s=0.1),  # too slow end to end
        RequestRecord("200", 1.0, ttft_s=0.6),  # first token too late
        RequestRecord("200", 1.0),  # no TTFT (not streamed): a TTFT SLO is missed
        RequestRecord("429", 0.1),  # failed fast: never good
    ]
    assert [meets_slo(r, slo) for r in records] == [True, True, False, False, False, False]
    assert [meets_slo(r, {"e2el": 2.0}) for r in records] == [True, True, False, True, True, False]
    run = summarize(records, wall_s=4.0, slo=slo)
    assert run["good"] == 2 and run["goodput_per_s"] == 0.5 and run["good_fraction"] == pytest.approx(2 / 6)
    assert summarize(records, wall_s=4.0)["goodput_per_s"] is None  # no SLO, no goodput
    for bad in (["e2el"], ["tpot:50"], ["e2el:fast"], ["ttft:0"]):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_goodput(bad)
    args = parse_args(["--rate", "0.5,1,2", "--goodput", "e2el:8000"])
    assert args.slo == {"e2el": 8.0} and [(x.kind, x.value) for x in args.loads] == [
        ("rate", 0.5), ("rate", 1.0), ("rate", 2.0)
    ]  # fmt: skip
    assert args.stream and not parse_args(["--no-stream"]).stream and parse_args([]).slo is None


def test_ttft_and_itl_come_from_the_output_chunks_arrival_times():
    assert inter_token_latencies([0.5, 0.75, 1.25, 1.5]) == [0.25, 0.5, 0.25]
    assert inter_token_latencies([0.8]) == [] and inter_token_latencies([]) == []
    events = [
        (0.01, '{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}'),  # no output
        (0.90, '{"choices": [{"index": 0, "delta": {"content": "3 + 4 = 7.\\nAnswer"}}]}'),
        (1.00, '{"choices": [{"index": 0, "delta": {"content": ": 7"}}]}'),
        (1.30, '{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "t2": {"samples": 3, "n_max": 8, "answer": "7"}}'),
        (1.31, '{"choices": [], "usage": {"completion_tokens": 42}}'),
        (1.32, "[DONE]"),
    ]  # fmt: skip
    reply, times, error = read_stream(events)
    assert times == [0.90, 1.00] and error is None
    assert reply["choices"] == [{"message": {"content": "3 + 4 = 7.\nAnswer: 7"}}]
    record = record_from_reply(200, reply, 1.32, gold="7", output_times=times)
    assert (record.ttft_s, record.itl_s, record.correct, record.samples, record.completion_tokens) == (
        0.90, pytest.approx([0.10]), True, 3, 42
    )  # fmt: skip
    # t2serve sends the winner in one chunk after the vote: a TTFT, no ITL.
    one = record_from_reply(200, reply, 1.32, gold="7", output_times=[0.9])
    run = summarize([record, one, RequestRecord("200", 2.0)], wall_s=3.0)
    assert run["ttft_p50_s"] == pytest.approx(0.9) and run["ttft_mean_s"] == pytest.approx(0.9)
    assert run["itl_p50_s"] == pytest.approx(0.1) and run["itl_mean_s"] == pytest.approx(0.1)
    assert summarize([one], wall_s=1.0)["itl_p50_s"] is None
    # An error event inside a 200 stream is the request's outcome.
    _, _, error = read_stream([(0.2, '{"error": {"message": "timed out", "code": "request_timeout"}}')])
    assert error == "request_timeout"


def test_accuracy_per_token_counts_right_answers_per_thousand_generated_tokens():
    records = [
        RequestRecord("200", 1.0, completion_tokens=300, correct=True),
        RequestRecord("200", 1.0, completion_tokens=500, correct=False),
        RequestRecord("200", 1.0, completion_tokens=200, correct=True),
        RequestRecord("200", 1.0, completion_tokens=999),  # no gold: not graded, not counted
    ]
    run = summarize(records, wall_s=1.0)
    assert run["accuracy"] == pytest.approx(2 / 3) and run["correct_per_1k_tokens"] == pytest.approx(2.0)


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
        # Streamed (the default): every reply has a first output chunk, after the vote and
        # in one piece (t2serve sends the winner whole), so no inter-token gaps.
        assert all(r.ttft_s is not None and 0 < r.ttft_s <= r.latency_s for r in records)
        assert auto["ttft_p50_s"] <= auto["ttft_p99_s"] and auto["itl_p50_s"] is None

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

        # Not streamed: the same figures but TTFT.
        records, wall = await run_load(
            http, MODEL_NAME, problems, {"parallelism": 2}, Load("concurrency", 1), requests=2,
            duration_s=120, stream=False, **common,
        )  # fmt: skip
        plain = summarize(records, wall)
        assert plain["ok"] == 2 and plain["samples"] == 4 and plain["ttft_p50_s"] is None

        # The result names the server's head (t2serve_estimator_info; the test server has none).
        info = await estimator_info(http)
        assert info is not None and {"identity", "n_max", "layers"} <= set(info)


@pytest.mark.engine
@pytest.mark.slow
async def test_a_tiny_rate_sweep_reports_ttft_goodput_samples_and_accuracy(server_url, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--rate", "2,4", "--requests", "3", "--prompts", "3", "--n-max", "2", "--max-tokens", "6",
            "--goodput", "e2el:600000", "--out", str(out)]  # fmt: skip
    args = parse_args(argv)
    result = await benchmark(args, server_url)
    # Each rate runs `auto` and fixed N side by side (the server's default N = 4, N_max given: 2).
    assert [(r["label"], r["variant"]) for r in result["runs"]] == [
        ("2/s", "auto"), ("2/s", "fixed N=2"), ("4/s", "fixed N=2"), ("4/s", "auto")
    ]  # fmt: skip
    for run in result["runs"]:
        assert run["ok"] == run["sent"] == 3 and run["errors"] == {}
        # An SLO of ten minutes (the harness's own request timeout): every request is good.
        assert run["good"] == 3 and run["goodput_per_s"] == pytest.approx(run["requests_per_s"])
        assert 0 < run["ttft_p50_s"] <= run["latency_p99_s"] and run["graded"] == 3
        assert run["samples_per_request"] == (4 if run["variant"] == "auto" else 2)
        assert run["correct_per_1k_tokens"] is not None and run["correct_per_1k_tokens"] >= 0
    result["config"] = {**vars(args), "loads": [], "out": str(out)}
    print_table(result)
    plot(result, out.with_suffix(".png"))
    assert out.with_suffix(".png").stat().st_size > 0
