"""Sampling policies: how many samples to launch, and when to stop, for one vote.

One interface for every policy, before and while decoding. A policy is a frozen dataclass
holding only its knobs; everything about the request lives in a `Budget` (what is known
before decoding) and a `Tally` (the answers of the samples that have finished so far), so
one policy object serves every request and sweeps are just lists of policies. A policy
names itself as its spec does: `name` (its registered name, e.g. "esc", "t2+beta") and
`knobs` (e.g. "window=4,max=8"), which estimator.policy_spec.describe joins into a spec
that parses back to the same policy.

How the server drives a policy (one vote = one choice of one request):

    budget = Budget(prediction, n_max=head N_max, default=default N, cap=max_parallelism)
    launched = policy.first_launch(budget)      # >= 1 and <= cap; counts sample 0, the
                                                # sample whose prefill carried the capture
    tally = Tally()
    each time one of the launched samples finishes (in finishing order):
        tally.add(sample.answer)
        decision = policy.on_result(tally, launched, budget)
        decision.stop:     abort the samples still running, vote over tally.answers
                           (finishing order: the offline replay breaks ties by first seen
                           in this order)
        decision.launch:   launch that many more (launched + k never exceeds budget.cap)
        else:              wait for the next sample to finish

A policy never waits with nothing in flight: once every launched sample has finished it
either launches more or stops. `cap` is an input on every call, so the server may lower it
under load (server.admission.load_scaled_cap) and the policy follows; a policy never
launches above the cap it is given, but samples already running are not taken back.
Policies with `adapts = False` (Fixed, T2) decide everything before decoding: the server
launches `first_launch` samples as one engine request and they stop once all have
finished; adaptive ones get one engine request per sample. `reads_prediction` says whether
a policy reads the head's prediction (then the server captures sample 0's states and waits
for them before the first launch).

Policies
- Fixed(n): standard parallel thinking, n samples.
- T2(margin): the pre-decoding estimate N = clamp(round(N_max * prediction * margin), 1, cap)
  (choose_parallelism, below).
- ESC(window, max_samples) (Li et al. 2024, Early-Stopping Self-Consistency): sample windows
  of w; stop when every answer of the latest window is the same answer, or at max_samples.
- AdaptiveConsistency(criterion, confidence, batch, max_samples) (Aggarwal et al. 2023): keep
  `batch` samples in flight (1 = one at a time); stop as soon as the criterion says the
  current leader stays the majority with probability >= confidence, or at max_samples.
- Composition(criterion, confidence, margin, extend, max_factor, agreement): launch the T2
  estimate N at once; stop before N when the criterion says the vote is decided (running
  samples are aborted); when all have finished and the vote is still undecided, launch
  `extend` more at a time, up to max_factor * N (None: up to N_max). The estimate bounds the
  extension because the votes that stay undecided longest are mostly questions more samples
  do not fix: unbounded, they run to N_max. With `agreement` set, the head's estimate
  also sets how sure "decided" must be (instead of the fixed `confidence`): as sure as k
  unanimous votes, k = max(1, agreement * N_max * prediction), i.e. the threshold
  1 - 2^-(k + 1) (the beta criterion at k votes to 0; the dirichlet one up to its Monte
  Carlo error). Why: votes cannot tell a consistent wrong answer from a right one, but the
  head ranks the questions where more samples raise accuracy above those where they do
  not; so a question the head expects little from stops at its first agreeing votes
  (k = 1: after one sample) and one it expects much from waits for a larger majority.
- LearnedStop(cost, margin, extend): the composition with a learned stopping rule instead
  of a confidence threshold: launch the T2 estimate at `margin`, stop as soon as the head's
  stopping table (estimator.learned_stopping) says that going on buys less accuracy than
  `cost` per sample, given the estimate and the votes so far; while it says go on and
  nothing is running, launch `extend` more (up to N_max).
Every stopping policy's default most is N_max (the head's, else the default N), the samples
fixed N_max spends, never more than the cap: without it an undecided vote ran to the cap
(--max-parallelism, 64 by default).

The stopping criteria the adaptive policies read are in estimator/criteria.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from estimator.criteria import CRITERIA, Criterion, confidence, criterion

if TYPE_CHECKING:
    from estimator.learned_stopping import StoppingTable


def choose_parallelism(
    prediction: float | None,
    *,
    n_max: int,
    default: int,
    cap: int,
    margin: float = 1.0,
) -> int:
    """Samples per choice for one request.

    `prediction` is the estimator's N*/N_max in [0, 1] (None when no estimator ran); the
    result is clamp(round(N_max * prediction * margin), 1, cap), or the configured default
    when there is no prediction.
    """
    if cap < 1:
        raise ValueError("cap must be >= 1")
    if prediction is None:
        return max(1, min(default, cap))
    return max(1, min(round(n_max * prediction * margin), cap))


# -- the policy registry: spec name -> class, knobs and presets (estimator.policy_spec parses
# the spec strings; a new policy is one class here plus its @register_policy line) --------


@dataclass(frozen=True)
class PolicyContext:
    """What a spec's defaults come from: the server's settings and the loaded head."""

    fixed_n: int  # `fixed` without n: the server's N_max
    margin: float  # T2's margin when a spec names none (--estimator-margin)
    stopping: StoppingTable | None = None  # the head's learned stopping table, if any


def positive_int(name: str) -> Callable[[str], int]:
    def convert(value: str) -> int:
        number = int(value)
        if number < 1:
            raise ValueError(f"{name} must be >= 1")
        return number

    return convert


def positive_float(name: str) -> Callable[[str], float]:
    def convert(value: str) -> float:
        number = float(value)
        if not number > 0 or number == float("inf"):
            raise ValueError(f"{name} must be a finite number > 0")
        return number

    return convert


def probability(value: str) -> float:
    number = float(value)
    if not 0 < number < 1:
        raise ValueError("c must lie in (0, 1)")
    return number


@dataclass(frozen=True)
class Registration:
    cls: type
    knobs: dict[str, tuple[str, Callable[[str], Any]]]  # spec knob -> (constructor argument, converter)
    preset: dict[str, Any]  # constructor arguments the name itself fixes (e.g. ac-beta's criterion)


POLICIES: dict[str, Registration] = {}


def register_policy(
    name: str,
    knobs: dict[str, tuple[str, Callable[[str], Any]]],
    presets: dict[str, dict[str, Any]] | None = None,
) -> Callable[[type], type]:
    """Register a policy class under a spec name (and each preset's name), e.g.
    `@register_policy("ac", knobs={...}, presets={"ac-beta": {"criterion": "beta"}})`."""

    def decorate(cls: type) -> type:
        POLICIES[name] = Registration(cls, knobs, {})
        for preset, arguments in (presets or {}).items():
            POLICIES[preset] = Registration(cls, knobs, arguments)
        return cls

    return decorate


def policy_names() -> list[str]:
    return list(POLICIES)


def get_policy(name: str) -> Registration:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}: use {', '.join(policy_names())}") from None


@dataclass(frozen=True)
class Budget:
    """What is known about a vote before decoding."""

    prediction: float | None  # the T2 head's N*/N_max; None without an estimator
    n_max: int  # the N_max the prediction is relative to (the head's)
    default: int  # samples when there is no prediction
    cap: int  # most samples this vote may launch (max_parallelism, lowered under load)
    margin_scale: float = 1.0  # the T2 margin's multiple for this request (estimator.gate)

    def __post_init__(self) -> None:
        if self.cap < 1 or self.n_max < 1 or self.default < 1:
            raise ValueError("cap, n_max and default must be >= 1")


@dataclass
class Tally:
    """Answers of the finished samples, in finishing order, with running counts."""

    answers: list[str | None] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, answer: str | None) -> None:
        self.answers.append(answer)
        if answer is not None:
            self.counts[answer] = self.counts.get(answer, 0) + 1

    @property
    def finished(self) -> int:
        return len(self.answers)

    def sorted_counts(self) -> tuple[int, ...]:
        return tuple(sorted(self.counts.values(), reverse=True))

    def state(self) -> tuple[int, int, int]:
        """(finished, leader's votes, runner-up's votes): the vote as the learned stopping
        table (estimator.learned_stopping) sees it."""
        counts = self.sorted_counts()
        return (self.finished, counts[0] if counts else 0, counts[1] if len(counts) > 1 else 0)


@dataclass(frozen=True)
class Decision:
    launch: int = 0  # samples to launch now
    stop: bool = False  # vote now; samples still running are aborted


STOP = Decision(stop=True)
WAIT = Decision()


def _number(value: float) -> str:
    """A knob's value as the spec writes it: short ("1.5", "3"), exact where short is not."""
    if isinstance(value, int):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _knobs(**values: float | None) -> str:
    """`knob=value,...` in the spec's own knob names and syntax (estimator.policy_spec), so
    that `name:knobs` parses back to the same policy; knobs given as None are left out."""
    return ",".join(f"{knob}={_number(value)}" for knob, value in values.items() if value is not None)


def _limit(max_samples: int | None, budget: Budget) -> int:
    """Most samples a stopping policy runs: its own `max`, else N_max (what fixed N_max
    spends, not the cap: an undecided vote would otherwise run to --max-parallelism);
    within the cap either way."""
    return _n_max_cap(budget) if max_samples is None else max(1, min(max_samples, budget.cap))


def _n_max_cap(budget: Budget) -> int:
    return min(budget.n_max, budget.cap)


def _more(k: int, launched: int, tally: Tally, cap: int) -> Decision:
    """Launch up to k more within the cap; with nothing left to launch and nothing running, stop."""
    k = max(0, min(k, cap - launched))
    if k > 0:
        return Decision(launch=k)
    return STOP if tally.finished >= launched else WAIT


@register_policy("fixed", knobs={"n": ("n", positive_int("n"))})
@dataclass(frozen=True)
class Fixed:
    """Standard parallel thinking: n samples, vote when all have finished."""

    n: int
    adapts = False
    reads_prediction = False

    @classmethod
    def from_knobs(cls, knobs: dict[str, Any], ctx: PolicyContext) -> Fixed:
        return cls(knobs.get("n", ctx.fixed_n))

    @property
    def name(self) -> str:
        return "fixed"

    @property
    def knobs(self) -> str:
        return _knobs(n=self.n)

    def first_launch(self, budget: Budget) -> int:
        return max(1, min(self.n, budget.cap))

    def on_result(self, tally: Tally, launched: int, budget: Budget) -> Decision:
        return STOP if tally.finished >= launched else WAIT


@register_policy("t2", knobs={"margin": ("margin", positive_float("margin"))})
@dataclass(frozen=True)
class T2:
    """The T2 estimate decided before decoding: N = clamp(round(N_max * prediction * margin), 1, cap)."""

    margin: float = 1.0
    adapts = False
    reads_prediction = True

    @classmethod
    def from_knobs(cls, knobs: dict[str, Any], ctx: PolicyContext) -> T2:
        return cls(knobs.get("margin", ctx.margin))

    @property
    def name(self) -> str:
        return "t2"

    @property
    def knobs(self) -> str:
        return _knobs(margin=self.margin)

    def first_launch(self, budget: Budget) -> int:
        return choose_parallelism(
            budget.prediction,
            n_max=budget.n_max,
            default=budget.default,
            cap=budget.cap,
            margin=self.margin * budget.margin_scale,
        )

    def on_result(self, tally: Tally, launched: int, budget: Budget) -> Decision:
        return STOP if tally.finished >= launched else WAIT


@register_policy(
    "esc", knobs={"window": ("window", positive_int("window")), "max": ("max_samples", positive_int("max"))}
)
@dataclass(frozen=True)
class ESC:
    """Early-Stopping Self-Consistency: windows of `window` samples; stop on a unanimous window."""

    window: int = 4
    max_samples: int | None = None  # the method's own budget (None: N_max, within the cap)
    adapts = True
    reads_prediction = False

    @classmethod
    def from_knobs(cls, knobs: dict[str, Any], ctx: PolicyContext) -> Any:
        return cls(**knobs)

    @property
    def name(self) -> str:
        return "esc"

    @property
    def knobs(self) -> str:
        return _knobs(window=self.window, max=self.max_samples)

    def first_launch(self, budget: Budget) -> int:
        return max(1, min(self.window, _limit(self.max_samples, budget)))

    def on_result(self, tally: Tally, launched: int, budget: Budget) -> Decision:
        if tally.finished < launched:
            return WAIT  # the window is judged whole
        # Windows are launched whole and judged whole, so the latest one starts at a multiple
        # of w (the last window may be cut short by the cap).
        start = (tally.finished - 1) // self.window * self.window
        window = tally.answers[start:]
        if window[0] is not None and all(a == window[0] for a in window):
            return STOP
        return _more(self.window, launched, tally, _limit(self.max_samples, budget))


@register_policy(
    "ac",
    knobs={
        "criterion": ("criterion", criterion),
        "c": ("confidence", probability),
        "batch": ("batch", positive_int("batch")),
        "max": ("max_samples", positive_int("max")),
    },
    presets={f"ac-{k}": {"criterion": k} for k in CRITERIA},
)
@dataclass(frozen=True)
class AdaptiveConsistency:
    """Adaptive-Consistency: `batch` samples in flight; stop once the leader is the majority
    with probability >= confidence under the criterion."""

    criterion: Criterion = "beta"
    confidence: float = 0.95
    batch: int = 1
    max_samples: int | None = None  # the method's own budget (None: N_max, within the cap)
    adapts = True
    reads_prediction = False

    @classmethod
    def from_knobs(cls, knobs: dict[str, Any], ctx: PolicyContext) -> Any:
        return cls(**knobs)

    @property
    def name(self) -> str:
        return f"ac-{self.criterion}"

    @property
    def knobs(self) -> str:
        return _knobs(c=self.confidence, batch=self.batch if self.batch != 1 else None, max=self.max_samples)

    def first_launch(self, budget: Budget) -> int:
        return max(1, min(self.batch, _limit(self.max_samples, budget)))

    def on_result(self, tally: Tally, launched: int, budget: Budget) -> Decision:
        if confidence(self.criterion, tally) >= self.confidence:
            return STOP
        in_flight = launched - tally.finished
        return _more(self.batch - in_flight, launched, tally, _limit(self.max_samples, budget))


@register_policy(
    "t2+beta",
    knobs={
        "c": ("confidence", probability),
        "margin": ("margin", positive_float("margin")),
        "extend": ("extend", positive_int("extend")),
        "max": ("max_factor", positive_float("max")),
        "agree": ("agreement", positive_float("agree")),
    },
    presets={"t2+dirichlet": {"criterion": "dirichlet"}},
)
@dataclass(frozen=True)
class Composition:
    """T2 first, a stopping criterion after: launch the T2 estimate at once, stop before it
    when the vote is decided, extend past it `extend` at a time while undecided, up to
    `max_factor` x the estimate (None: up to N_max). `agreement` (None: the fixed `confidence`)
    makes the confidence threshold grow with the head's estimate."""

    criterion: Criterion = "beta"
    confidence: float = 0.95
    margin: float = 1.0
    extend: int = 1
    max_factor: float | None = None
    agreement: float | None = None
    adapts = True
    reads_prediction = True

    @classmethod
    def from_knobs(cls, knobs: dict[str, Any], ctx: PolicyContext) -> Composition:
        return cls(**{"margin": ctx.margin, **knobs})

    @property
    def name(self) -> str:
        return f"t2+{self.criterion}"

    @property
    def knobs(self) -> str:
        # With `agree` the threshold comes from the estimate: c is shown only if it was set.
        fixed_threshold = self.agreement is None or self.confidence != Composition.confidence
        return _knobs(
            c=self.confidence if fixed_threshold else None,
            agree=self.agreement,
            margin=self.margin,
            extend=self.extend if self.extend != 1 else None,
            max=self.max_factor,
        )

    def first_launch(self, budget: Budget) -> int:
        return T2(self.margin).first_launch(budget)

    def threshold(self, budget: Budget) -> float:
        """The confidence at which the vote counts as decided."""
        if self.agreement is None:
            return self.confidence
        # The head's estimate of N* (before the margin; without a prediction, the default N).
        estimate = budget.default if budget.prediction is None else budget.n_max * budget.prediction
        votes = max(1.0, self.agreement * estimate)
        return 1.0 - 2.0 ** -(votes + 1.0)

    def on_result(self, tally: Tally, launched: int, budget: Budget) -> Decision:
        # The small tolerance keeps k unanimous votes decided at exactly their own threshold.
        if confidence(self.criterion, tally) >= self.threshold(budget) - 1e-12:
            return STOP
        if tally.finished < launched:
            return WAIT  # the estimate's samples are still coming in
        ceiling = _n_max_cap(budget)
        if self.max_factor is not None:
            # The estimate also bounds the extension: a question T2 expects little from
            # (e.g. one whose answers never agree) stays cheap.
            estimate = self.first_launch(budget)
            ceiling = min(budget.cap, max(estimate, math.ceil(self.max_factor * estimate)))
        return _more(self.extend, launched, tally, ceiling)


@register_policy(
    "t2+learned",
    knobs={
        "cost": ("cost", positive_float("cost")),
        "margin": ("margin", positive_float("margin")),
        "extend": ("extend", positive_int("extend")),
    },
)
@dataclass(frozen=True)
class LearnedStop:
    """T2 first, the head's learned stopping rule after: launch the T2 estimate at `margin`,
    stop once going on buys less than `cost` accuracy per sample (the table's judgement at
    this estimate and these votes), else keep `extend` samples coming."""

    table: StoppingTable = field(compare=False, repr=False)
    cost: float = 0.009  # the knob chosen on validation (README "Early stopping")
    margin: float = 0.25
    extend: int = 1
    adapts = True
    reads_prediction = True

    @classmethod
    def from_knobs(cls, knobs: dict[str, Any], ctx: PolicyContext) -> LearnedStop:
        if ctx.stopping is None:
            raise ValueError(
                "policy 't2+learned' needs a stopping table beside the estimator head (`t2serve train` "
                "fits one); this server's head has none"
            )
        return cls(ctx.stopping, **knobs)

    @property
    def name(self) -> str:
        return "t2+learned"

    @property
    def knobs(self) -> str:
        return _knobs(cost=self.cost, margin=self.margin, extend=self.extend if self.extend != 1 else None)

    def first_launch(self, budget: Budget) -> int:
        return T2(self.margin).first_launch(budget)

    def on_result(self, tally: Tally, launched: int, budget: Budget) -> Decision:
        prediction = budget.default / budget.n_max if budget.prediction is None else budget.prediction
        if self.table.should_stop(budget.n_max * prediction, tally.state(), self.cost):
            return STOP
        if tally.finished < launched:
            return WAIT
        return _more(self.extend, launched, tally, _n_max_cap(budget))


Policy = Fixed | T2 | ESC | AdaptiveConsistency | Composition | LearnedStop
