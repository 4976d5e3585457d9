import pytest

from estimator.offline.inputs import grading
from estimator.offline.inputs.grading import Grader
from server.voting import normalize_answer


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:
        yield g


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        ("\\frac{\\pi}{2}", "\\pi/2"),
        ("(3,\\frac{\\pi}{2})", "(3, \\pi/2)"),
        ("5\\sqrt{2}", "\\sqrt{50}"),
        ("x^2+1", "1+x^2"),
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("10^{\\circ}", "10"),
    ],
)
def test_equivalent_math_answers_count_as_gold(grader, gold, answer):
    gold_key, answer_key = normalize_answer(gold), normalize_answer(answer)
    assert gold_key != answer_key  # the server's keys alone would call these different
    assert grader.equivalent(answer_key, gold_key)


@pytest.mark.parametrize(
    ("gold", "answer"),
    [("\\frac{\\pi}{2}", "\\pi"), ("5\\sqrt{2}", "5"), ("x^2+1", "x^2-1"), ("12", "13"), ("B", "C")],
)
def test_different_answers_do_not(grader, gold, answer):
    assert not grader.equivalent(normalize_answer(answer), normalize_answer(gold))


def test_numbers_and_abstentions_never_reach_the_worker():
    g = Grader()
    assert g.equivalent("12", "12") and not g.equivalent("12", "12.5") and not g.equivalent(None, "3")
    assert g._pool is None


def test_labels_count_every_equivalent_key_as_correct_and_keep_them_apart(grader):
    from estimator.offline.inputs.problems import Problem
    from estimator.offline.labels.labeling import LabelConfig, label_record

    problem = Problem("p", "q", "\\frac{\\pi}{2}", "f", 0, "test", "math")
    answers = ["\\pi/2", None, "\\pi", "\\frac{\\pi}{2}"] * 4
    record = label_record(problem, answers, [5] * 16, LabelConfig(), grader)
    assert record["answers"] == answers  # the keys the server votes with, unchanged
    assert record["gold_keys"] == ["\\pi/2", "\\frac{\\pi}{2}"]
    # Two right keys of 4 samples each against one wrong key of 4: right most of the time.
    assert 0.6 < record["accuracy"][-1] <= 1.0
    assert label_record(problem, answers, [5] * 16, LabelConfig())["gold_keys"] == ["\\frac{\\pi}{2}"]


def _hang(gold, answer):
    import threading

    threading.Event().wait()  # never set: hangs until the grader replaces the worker


def test_a_check_that_runs_over_counts_as_not_equivalent_and_replaces_the_worker(monkeypatch):
    monkeypatch.setattr(grading, "_verify", _hang)
    with Grader(timeout=0.5) as g:
        # Not equal as keys and not both numbers: the worker is asked, and hangs.
        assert not g.equivalent("a+b", "b+a")
        assert g.timeouts == 1 and g._pool is None
