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
ValueError with a message meant for the client. `describe` gives a policy's spec back (its
registered name and every knob it was given), as a response's `t2.policy` and the reports
name it: parse_policy(describe(policy)) == policy.
The names, knobs and defaults are the policies' own registrations (estimator.policies,
`@register_policy`): this module is the grammar only.

`--policy @PATH` (the server's flag, not a request's field) reads the spec from a JSON file
with a "policy" key: what `t2serve tune` writes (spec_from_flag).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estimator.policies import Policy, PolicyContext, get_policy

if TYPE_CHECKING:
    from estimator.learned_stopping import StoppingTable


def parse_policy(spec: str, *, fixed_n: int, margin: float, stopping: StoppingTable | None = None) -> Policy:
    """The policy a spec names. `fixed_n` and `margin` are the server's defaults for
    `fixed` and for the T2-based policies; `stopping` is the head's learned stopping table
    (None: t2+learned is refused)."""
    name, _, rest = spec.strip().lower().partition(":")
    name = name.strip()
    registration = get_policy(name)
    kwargs: dict[str, Any] = dict(registration.preset)
    for item in filter(None, (part.strip() for part in rest.split(","))):
        knob, eq, value = item.partition("=")
        knob = knob.strip()
        if not eq or knob not in registration.knobs:
            known = ", ".join(registration.knobs)
            raise ValueError(f"policy {name!r}: bad knob {item!r} (knobs: {known}, as knob=value)")
        argument, convert = registration.knobs[knob]
        try:
            kwargs[argument] = convert(value.strip())
        except ValueError as exc:
            raise ValueError(f"policy {name!r}: bad value for {knob}: {exc}") from None
    ctx = PolicyContext(fixed_n=fixed_n, margin=margin, stopping=stopping)
    return registration.cls.from_knobs(kwargs, ctx)  # type: ignore[attr-defined]


def describe(policy: Policy) -> str:
    """The spec of a policy, as a response reports it (e.g. "esc:window=4,max=8")."""
    return f"{policy.name}:{policy.knobs}"


def spec_from_flag(value: str) -> str:
    """`--policy`'s spec: the value itself, or with "@PATH" the "policy" of that JSON file
    (`t2serve tune`'s output); ValueError naming the file when it has none."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        spec = json.loads(path.read_text()).get("policy")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"cannot read a policy from {path}: {exc}") from None
    if not isinstance(spec, str):
        raise ValueError(f'{path} names no policy (a JSON object with a "policy" spec string)')
    return spec
