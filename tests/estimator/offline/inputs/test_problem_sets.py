"""What `t2serve label` labels (estimator/offline/inputs/problem_sets.py): the generator's problems or
a data file's, narrowed to a count and a split."""

import json

import pytest

from estimator.offline.inputs.problem_sets import BUILTIN_COUNT, select_problems
from estimator.offline.inputs.problems import DEFAULT_TEMPLATE, generate


def test_builtin_draws_the_default_count_then_keeps_one_split():
    chosen = select_problems("builtin", template=DEFAULT_TEMPLATE, seed=0)
    assert chosen.problems == generate(BUILTIN_COUNT, seed=0) and chosen.summary is None
    test = select_problems("builtin", template=DEFAULT_TEMPLATE, seed=0, count=50, split="test")
    assert test.problems == [p for p in generate(50, seed=0) if p.split == "test"]


def test_a_data_file_is_read_subset_and_summarised(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]
    rows.append({"question": "What is nothing?", "answer": "not a number at all"})
    data = tmp_path / "sums.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    chosen = select_problems(str(data), template="Q: {question}", seed=0, max_answer=10)
    assert [p.answer for p in chosen.problems] == [str(i + 1) for i in range(10)]
    assert chosen.problems[0].question == "Q: What is 0 + 1?"
    assert chosen.summary.startswith("sums: 10 problems; left out: ")
    subset = select_problems(str(data), template="{question}", seed=0, count=4, max_answer=10)
    again = select_problems(str(data), template="{question}", seed=0, count=4, max_answer=10)
    assert len(subset.problems) == 4 and subset.problems == again.problems


def test_nothing_usable_is_refused_with_what_was_left_out(tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"question": "What is 500 + 500?", "answer": "1000"}))
    with pytest.raises(
        ValueError, match=r"no usable problems in .*big\.jsonl \(big: 0 problems; left out: 1 "
    ):
        select_problems(str(data), template="{question}", seed=0, max_answer=10)
