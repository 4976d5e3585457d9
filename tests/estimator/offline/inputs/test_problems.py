from collections import Counter

import pytest

from estimator.offline.inputs.problems import (
    DEFAULT_FAMILIES,
    FAMILIES,
    PROMPT_SUFFIX,
    generate,
    split_of,
)
from server.voting import extract_answer


def test_deterministic_and_distinct():
    a, b = generate(300, seed=7), generate(300, seed=7)
    assert a == b
    assert len({p.question for p in a}) == 300
    assert generate(50, seed=8) != generate(50, seed=7)[:50]


def test_every_family_and_split_present():
    problems = generate(900, seed=0, families=list(FAMILIES))
    assert set(Counter(p.family for p in problems)) == set(FAMILIES)
    assert set(Counter(p.family for p in generate(80))) == set(DEFAULT_FAMILIES)
    splits = Counter(p.split for p in problems)
    assert set(splits) == {"train", "validation", "test"}
    assert splits["train"] > splits["validation"] > 0 and splits["test"] > 0


def test_gold_answers_are_right_and_extractable():
    for p in generate(200, seed=3):
        assert p.question.endswith(PROMPT_SUFFIX)
        # A model that answers in the requested format is graded right.
        assert extract_answer(f"Let me think. Answer: {p.answer}") == p.answer
        if p.family == "add_small":
            a, b = (int(x) for x in p.question.split("What is ")[1].split("?")[0].split(" + "))
            assert p.answer == str(a + b)


def test_split_is_stable():
    assert split_of("What is 1 + 1?") == split_of("What is 1 + 1?")


def test_unknown_family():
    with pytest.raises(ValueError):
        generate(3, families=["nope"])
