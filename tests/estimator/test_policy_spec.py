"""Policy specs (`--policy`, the request's `policy`): pure parsing, no engine."""

from __future__ import annotations

import pytest

from estimator.policies import ESC, T2, AdaptiveConsistency, Composition, Fixed
from estimator.policy_spec import describe, parse_policy


def parse(spec: str):
    return parse_policy(spec, fixed_n=16, margin=1.5)


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        ("fixed", Fixed(16)),
        ("fixed:n=4", Fixed(4)),
        ("t2", T2(1.5)),
        ("T2:margin=0.75", T2(0.75)),
        ("esc", ESC()),
        ("esc:window=4,max=8", ESC(window=4, max_samples=8)),
        ("ac", AdaptiveConsistency()),
        ("ac:criterion=dirichlet,c=0.9,batch=2", AdaptiveConsistency("dirichlet", 0.9, batch=2)),
        ("ac-beta:c=0.95,max=8", AdaptiveConsistency("beta", 0.95, max_samples=8)),
        ("t2+beta", Composition("beta", margin=1.5)),
        (
            " t2+beta: c=0.8, margin=0.75, max=3 ",
            Composition("beta", confidence=0.8, margin=0.75, max_factor=3.0),
        ),
        ("t2+dirichlet:agree=0.5,extend=2", Composition("dirichlet", margin=1.5, extend=2, agreement=0.5)),
    ],
)
def test_parse_policy(spec, policy):
    assert parse(spec) == policy


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("greedy", "unknown policy"),
        ("ac-gamma", "unknown policy"),
        ("esc:window=0", "window must be >= 1"),
        ("esc:size=4", "bad knob"),
        ("esc:window", "bad knob"),
        ("ac:c=1.5", "c must lie in (0, 1)"),
        ("t2:margin=nan", "margin must be a finite number > 0"),
        ("fixed:n=two", "bad value for n"),
    ],
)
def test_parse_policy_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(spec)


def test_describe_and_prediction_needs():
    assert describe(parse("esc:window=4,max=8")) == "ESC:w=4,max=8"
    assert describe(parse("t2")) == "T2:margin=1.5"
    assert describe(parse("ac-beta:c=0.9")) == "AC-beta:c=0.9"
    assert [parse(s).reads_prediction for s in ("fixed", "t2", "esc", "ac", "t2+beta")] == [
        False,
        True,
        False,
        False,
        True,
    ]


def test_serve_refuses_a_bad_policy_flag(model_dir):
    from server.cli import build_parser
    from server.cli.serve import serve_settings

    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--policy", "esc:window=0"])
    with pytest.raises(SystemExit, match="--policy: policy 'esc': bad value for window"):
        serve_settings(args)
    good = build_parser().parse_args(["serve", "--model", str(model_dir), "--policy", "ac-beta:c=0.8"])
    assert serve_settings(good).parallelism.policy == "ac-beta:c=0.8"


def test_a_registered_policy_is_parseable_by_name_with_its_knobs(monkeypatch):
    from dataclasses import dataclass

    from estimator import policies

    monkeypatch.setattr(policies, "POLICIES", dict(policies.POLICIES))  # leave the real registry alone

    @policies.register_policy("every-k", knobs={"k": ("k", policies.positive_int("k"))})
    @dataclass(frozen=True)
    class EveryK:
        k: int = 2

        @classmethod
        def from_knobs(cls, knobs, ctx):
            return cls(**knobs)

    assert parse("every-k:k=5") == EveryK(5)
    assert "every-k" in policies.policy_names()
    with pytest.raises(ValueError, match="k must be >= 1"):
        parse("every-k:k=0")
