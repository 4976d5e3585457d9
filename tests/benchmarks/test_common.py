"""benchmarks/common.py's reading of a /metrics page, on text prometheus_client writes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from benchmarks.common import metric_value


def test_metric_value_reads_one_sample_by_name_and_exact_labels():
    registry = CollectorRegistry()
    explored = Counter("t2serve_explored_requests", "", ["reason"], registry=registry)
    explored.labels("share").inc(3)
    explored.labels("budget_skipped").inc(2)
    Gauge("t2serve_explore_budget_credit", "", registry=registry).set(-2.5)
    text = generate_latest(registry).decode()
    assert metric_value(text, "t2serve_explored_requests_total", reason="budget_skipped") == 2
    assert metric_value(text, "t2serve_explored_requests_total", reason="share") == 3
    assert metric_value(text, "t2serve_explore_budget_credit") == -2.5
    # A sample with other labels, or one not exported yet, reads 0.
    assert metric_value(text, "t2serve_explored_requests_total") == 0.0
    assert metric_value(text, "t2serve_explore_extra_samples_total") == 0.0
