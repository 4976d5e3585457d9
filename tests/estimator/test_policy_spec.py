"""Policy specs (`--policy`, the request's `policy`): pure parsing, no engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from estimator.learned_stopping import StoppingTable
from estimator.policies import ESC, T2, AdaptiveConsistency, Composition, Fixed, LearnedStop, policy_names
from estimator.policy_spec import describe, parse_policy, spec_from_flag

TABLE = StoppingTable(
    n_max=2,
    bandwidth=1.0,
    grid=np.array([1.0]),
    states=[(1, 1, 0)],
    visits=np.array([[1.0]]),
    correct=np.array([[1.0]]),
    edges=np.zeros((0, 2), dtype=int),
    moves=np.zeros((1, 0)),
)


def parse(spec: str):
    return parse_policy(spec, fixed_n=16, margin=1.5, stopping=TABLE)


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


# Per registered name, a policy with knobs away from their defaults: describe must give a
# spec that parses back to it (with other server defaults, so no knob may go unsaid).
NON_DEFAULT = {
    "fixed": Fixed(5),
    "t2": T2(1.375),
    "esc": ESC(window=3, max_samples=9),
    "ac": AdaptiveConsistency("dirichlet", 0.9, batch=2, max_samples=8),
    "ac-beta": AdaptiveConsistency("beta", 0.8, batch=3, max_samples=6),
    "ac-dirichlet": AdaptiveConsistency("dirichlet", 0.99, batch=2),
    "t2+beta": Composition("beta", 0.9, margin=0.75, extend=2, max_factor=1.5),
    "t2+dirichlet": Composition("dirichlet", 0.8, margin=2.0, extend=3, max_factor=3.0, agreement=0.35),
    "t2+learned": LearnedStop(TABLE, cost=0.005, margin=1.0, extend=2),
}


def test_every_registered_policy_round_trips_through_its_description():
    assert set(NON_DEFAULT) == set(policy_names())
    for policy in NON_DEFAULT.values():
        spec = describe(policy)
        assert parse_policy(spec, fixed_n=7, margin=0.6, stopping=TABLE) == policy, spec
    # The composition's agree threshold, a knob with no exact short form, an unset c.
    for policy in (
        Composition("beta", margin=0.25, agreement=0.5, max_factor=5.0),
        T2(1 / 3),
        AdaptiveConsistency("beta", 0.123456789),
    ):
        assert parse_policy(describe(policy), fixed_n=7, margin=0.6) == policy, describe(policy)


@pytest.mark.parametrize(
    ("policy", "spec"),
    [
        (Fixed(16), "fixed:n=16"),
        (T2(1.375), "t2:margin=1.375"),
        (ESC(4, 8), "esc:window=4,max=8"),
        (AdaptiveConsistency("beta", 0.95, batch=2, max_samples=8), "ac-beta:c=0.95,batch=2,max=8"),
        (Composition("beta", 0.95, 1.0, extend=2, max_factor=3.0), "t2+beta:c=0.95,margin=1,extend=2,max=3"),
        (Composition("beta", margin=1.0, agreement=0.5), "t2+beta:agree=0.5,margin=1"),
        (Composition("dirichlet", 0.8, 0.5, agreement=0.5), "t2+dirichlet:c=0.8,agree=0.5,margin=0.5"),
        (LearnedStop(TABLE, cost=0.009, margin=0.25), "t2+learned:cost=0.009,margin=0.25"),
    ],
)
def test_describe_gives_the_registry_name_and_the_spec_knobs(policy, spec):
    assert describe(policy) == spec


def test_prediction_needs():
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


def test_a_flag_value_at_a_path_reads_the_spec_tune_wrote(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"policy": "esc:window=4,max=8", "target": 0.99}))
    assert spec_from_flag(f"@{tuned}") == "esc:window=4,max=8"
    assert spec_from_flag("t2:margin=1.5") == "t2:margin=1.5"
    with pytest.raises(ValueError, match="cannot read a policy from"):
        spec_from_flag(f"@{tmp_path / 'missing.json'}")
    tuned.write_text(json.dumps({"target": 0.99}))
    with pytest.raises(ValueError, match="names no policy"):
        spec_from_flag(f"@{tuned}")
