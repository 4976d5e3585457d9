"""Policy specs: the strings that name a sampling policy (`--policy`, the request's `policy`).

    SPEC   := NAME [":" KNOB "=" VALUE ("," KNOB "=" VALUE)*]

    fixed            n (default: the server's N_max)           Fixed(n)
    t2               margin (default: --estimator-margin)      T2(margin)
    esc              window=4, max                              ESC(window, max_samples)
    ac               criterion=beta|dirichlet, c=0.95, batch=1, max
                                                                AdaptiveConsistency
    ac-beta, ac-dirichlet   ac with that criterion
    t2+beta, t2+dirichlet   c=0.95, margin (default: --estimator-margin), extend=1,
                            max (x the T2 estimate), agree      Composition
    t2+learned       cost=0.009, margin=0.25, extend=1          LearnedStop (needs the head's
                                                                stopping table)

e.g. `esc:window=4,max=8`, `ac-beta:c=0.9,max=8`, `t2+beta:c=0.8,margin=0.75,max=3`,
`t2+learned:cost=0.005`. t2+learned keeps its own margin default (a small first launch: the
learned rule decides how far to go), not the server's T2 margin.
Names and knobs are case-insensitive; unknown names or knobs and bad values raise
ValueError with a message meant for the client. `describe` gives the name a response reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from estimator.stopping import ESC, T2, AdaptiveConsistency, Composition, Fixed, LearnedStop, Policy

if TYPE_CHECKING:
    from estimator.learned_stopping import StoppingTable

CRITERIA = ("beta", "dirichlet")


def _positive_int(name: str) -> Callable[[str], int]:
    def convert(value: str) -> int:
        number = int(value)
        if number < 1:
            raise ValueError(f"{name} must be >= 1")
        return number

    return convert


def _positive_float(name: str) -> Callable[[str], float]:
    def convert(value: str) -> float:
        number = float(value)
        if not number > 0 or number == float("inf"):
            raise ValueError(f"{name} must be a finite number > 0")
        return number

    return convert


def _probability(value: str) -> float:
    number = float(value)
    if not 0 < number < 1:
        raise ValueError("c must lie in (0, 1)")
    return number


def _criterion(value: str) -> str:
    if value not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}")
    return value


# Per family: spec knob -> (constructor argument, converter).
KNOBS: dict[str, dict[str, tuple[str, Callable[[str], Any]]]] = {
    "fixed": {"n": ("n", _positive_int("n"))},
    "t2": {"margin": ("margin", _positive_float("margin"))},
    "esc": {"window": ("window", _positive_int("window")), "max": ("max_samples", _positive_int("max"))},
    "ac": {
        "criterion": ("criterion", _criterion),
        "c": ("confidence", _probability),
        "batch": ("batch", _positive_int("batch")),
        "max": ("max_samples", _positive_int("max")),
    },
    "t2+": {
        "c": ("confidence", _probability),
        "margin": ("margin", _positive_float("margin")),
        "extend": ("extend", _positive_int("extend")),
        "max": ("max_factor", _positive_float("max")),
        "agree": ("agreement", _positive_float("agree")),
    },
    "t2+learned": {
        "cost": ("cost", _positive_float("cost")),
        "margin": ("margin", _positive_float("margin")),
        "extend": ("extend", _positive_int("extend")),
    },
}


def parse_policy(spec: str, *, fixed_n: int, margin: float, stopping: StoppingTable | None = None) -> Policy:
    """The policy a spec names. `fixed_n` and `margin` are the server's defaults for
    `fixed` and for the T2-based policies; `stopping` is the head's learned stopping table
    (None: t2+learned is refused)."""
    name, _, rest = spec.strip().lower().partition(":")
    name = name.strip()
    family, preset = name, {}
    if name.startswith("ac-"):
        family, preset = "ac", {"criterion": name[3:]}
    elif name.startswith("t2+") and name != "t2+learned":
        family, preset = "t2+", {"criterion": name[3:]}
    if family not in KNOBS:
        raise ValueError(
            f"unknown policy {name!r}: use fixed, t2, esc, ac, ac-beta, ac-dirichlet, t2+beta or t2+learned"
        )
    kwargs: dict[str, Any] = {}
    for key, value in preset.items():
        kwargs[key] = _criterion(value)
    for item in filter(None, (part.strip() for part in rest.split(","))):
        knob, eq, value = item.partition("=")
        knob = knob.strip()
        if not eq or knob not in KNOBS[family]:
            known = ", ".join(KNOBS[family])
            raise ValueError(f"policy {name!r}: bad knob {item!r} (knobs: {known}, as knob=value)")
        argument, convert = KNOBS[family][knob]
        try:
            kwargs[argument] = convert(value.strip())
        except ValueError as exc:
            raise ValueError(f"policy {name!r}: bad value for {knob}: {exc}") from None
    if family == "fixed":
        return Fixed(kwargs.get("n", fixed_n))
    if family == "t2":
        return T2(kwargs.get("margin", margin))
    if family == "esc":
        return ESC(**kwargs)
    if family == "ac":
        return AdaptiveConsistency(**kwargs)
    if family == "t2+learned":
        if stopping is None:
            raise ValueError(
                "policy 't2+learned' needs a stopping table beside the estimator head (`t2serve train` "
                "fits one); this server's head has none"
            )
        return LearnedStop(stopping, **kwargs)
    return Composition(**{"margin": margin, **kwargs})


def describe(policy: Policy) -> str:
    """The family and knobs of a policy, as a response reports it (e.g. "ESC:w=4,max=8")."""
    return f"{policy.family}:{policy.knob}"
