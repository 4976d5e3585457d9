"""Graded problems with checkable answers (users' own data: estimator.offline.inputs.datasets).

The built-in generator is deterministic by seed and spans difficulty levels chosen so that
a small model's per-question accuracy ranges from ~0 to ~1 (single-digit sums, comparisons
and multiple choice at the easy end; multi-step arithmetic at the hard end). Splits are
decided by a hash of the question text, so a question never appears in two splits and
adding questions does not reshuffle the others.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

from estimator.offline.engine_runs import normalize_answer

SPLITS = ("train", "validation", "test")
PROMPT_SUFFIX = "\nGive the final answer as 'Answer: <answer>'."
# How a question becomes the user message, for the generator and for users' data alike.
DEFAULT_TEMPLATE = "{question}" + PROMPT_SUFFIX


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the user message
    answer: str  # normalised gold answer (server.voting.normalize_answer)
    family: str
    level: int
    split: str
    source: str = "builtin"  # the data set it came from (what leave-one-out holds out)
    # Other keys that are right: a multiple-choice question's right option stated by value
    # ("450" for "(E) 450") is as right as its letter.
    aliases: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def split_of(text: str, fractions: tuple[float, float] = (0.7, 0.15)) -> str:
    """train/validation/test by a stable hash of the question text."""
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < fractions[0]:
        return "train"
    return "validation" if h < fractions[0] + fractions[1] else "test"


def _successor(r: random.Random) -> tuple[str, int]:
    a = r.randint(1, 98)
    return f"What number comes right after {a}?", a + 1


def _add_one(r: random.Random) -> tuple[str, int]:
    a = r.randint(1, 50)
    return f"What is {a} + 1?", a + 1


def _double(r: random.Random) -> tuple[str, int]:
    a = r.randint(1, 9)
    return f"What is {a} + {a}?", a + a


def _add_small(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(0, 9), r.randint(0, 9)
    return f"What is {a} + {b}?", a + b


def _compare(r: random.Random) -> tuple[str, int]:
    a, b = r.sample(range(1, 100), 2)
    return f"Which number is larger, {a} or {b}?", max(a, b)


def _compare_small(r: random.Random) -> tuple[str, int]:
    a, b = r.sample(range(1, 100), 2)
    return f"Which number is smaller, {a} or {b}?", min(a, b)


def _compare3(r: random.Random) -> tuple[str, int]:
    a, b, c = r.sample(range(1, 100), 3)
    return f"Which is the largest of {a}, {b} and {c}?", max(a, b, c)


def _choice(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(1, 9), r.randint(1, 9)
    right = a + b
    wrong = r.sample([x for x in range(max(0, right - 5), right + 6) if x != right], 3)
    options = wrong + [right]
    r.shuffle(options)
    letters = "ABCD"
    text = " ".join(f"({letters[i]}) {o}" for i, o in enumerate(options))
    return f"What is {a} + {b}? Choose one: {text}", letters[options.index(right)]


def _times(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(2, 9), r.randint(2, 9)
    return f"What is {a} times {b}?", a * b


def _subtract(r: random.Random) -> tuple[str, int]:
    a = r.randint(10, 99)
    b = r.randint(1, a)
    return f"What is {a} - {b}?", a - b


def _add_two_digit(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}?", a + b


def _story(r: random.Random) -> tuple[str, int]:
    names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay"]
    items = ["apples", "books", "coins", "pens", "stamps", "shells"]
    n, item = r.choice(names), r.choice(items)
    a, b = r.randint(2, 20), r.randint(2, 20)
    if r.random() < 0.5:
        return f"{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?", a + b
    a, b = max(a, b), min(a, b)
    return f"{n} has {a} {item} and gives away {b}. How many {item} are left?", a - b


def _two_step(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(2, 12), r.randint(2, 12), r.randint(1, 20)
    return f"What is {a} times {b}, plus {c}?", a * b + c


def _chain(r: random.Random) -> tuple[str, int]:
    terms = [r.randint(1, 30) for _ in range(4)]
    return f"What is {' + '.join(map(str, terms))}?", sum(terms)


# family -> (level, generator); levels rise with the number of steps and digits.
FAMILIES: dict[str, tuple[int, Callable[[random.Random], tuple[str, int | str]]]] = {
    "successor": (0, _successor),
    "add_one": (0, _add_one),
    "double": (0, _double),
    "add_small": (1, _add_small),
    "compare": (1, _compare),
    "compare_small": (1, _compare_small),
    "compare3": (2, _compare3),
    "choice": (2, _choice),
    "times": (2, _times),
    "subtract": (3, _subtract),
    "add_two_digit": (3, _add_two_digit),
    "story": (4, _story),
    "two_step": (5, _two_step),
    "chain": (5, _chain),
}


# The default mix for the embedded model, chosen by measurement with `t2serve label`: its
# per-question accuracy spans 0..1 on these (successor/choice/two_step/chain sit near 0 for
# it). The comparison families (compare_small, compare3) produce more close contests
# between the gold answer and one wrong answer, i.e. non-monotone A(N); a family listed
# twice in --families is drawn twice as often.
DEFAULT_FAMILIES = [
    "add_small",
    "times",
    "compare",
    "add_one",
    "double",
    "subtract",
    "story",
    "add_two_digit",
]


def generate(
    count: int, seed: int = 0, families: list[str] | None = None, template: str = DEFAULT_TEMPLATE
) -> list[Problem]:
    """`count` distinct problems, cycling over the families (deterministic by seed)."""
    names = families or DEFAULT_FAMILIES
    unknown = set(names) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown problem families: {sorted(unknown)}")
    r = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    active = list(names)
    misses = dict.fromkeys(names, 0)
    turn = 0
    while len(out) < count:
        if not active:
            raise ValueError(f"cannot draw {count} distinct problems from {names}")
        family = active[turn % len(active)]
        level, make = FAMILIES[family]
        question, answer = make(r)
        if question in seen:
            # Small families (e.g. 100 single-digit sums) run out: retire them, keep the rest.
            misses[family] += 1
            if misses[family] >= 200:
                active.remove(family)
            continue
        misses[family] = 0
        turn += 1
        seen.add(question)
        gold = normalize_answer(str(answer))
        assert gold is not None
        digest = hashlib.sha256(question.encode()).hexdigest()[:12]
        out.append(
            Problem(
                f"{family}-{digest}",
                template.format(question=question),
                gold,
                family,
                level,
                split_of(question),
            )
        )
    return out
