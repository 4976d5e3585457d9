"""Answer extraction, normalisation and majority voting (server/voting.py; pure logic),
and end to end: the content a choice returns states the answer its vote chose."""

from __future__ import annotations

import threading

import pytest

from server.voting import extract_answer, find_boxed, majority_vote, normalize_answer
from tests.conftest import MODEL_NAME


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # \boxed{...}, including nested braces and the last box winning
        (r"So the result is \boxed{42}.", "42"),
        (r"\boxed{1} then corrected: \boxed{7}", "7"),
        (r"\boxed{\frac{3}{4}}", "0.75"),
        (r"\boxed{\dfrac12}", "0.5"),
        (r"\boxed{ {1,234} }", "1234"),
        (r"\boxed{x^{2}+1}", "x^{2}+1"),
        (r"\boxed{\text{(A)}}", "A"),
        (r"\fbox{9}", "9"),
        # answer phrases
        ("The answer is 17.", "17"),
        ("Final answer: -3", "-3"),
        ("answer is (B)", "B"),
        ("Answer: C", "C"),
        ("Answer: B) 12", "B"),
        ("Answer: a total of 5 apples", "5"),
        ("#### 72", "72"),
        ("The answer is 50%", "50"),
        ("The final answer is: $0.50$", "0.5"),
        (r"answer is \frac{-6}{4}", "-1.5"),
        ("Answer: 3/4", "0.75"),
        ("Answer: 2/3", "2/3"),
        ("The answer is 1,234,567 dollars", "1234567"),
        ("The answer is 3.14159", "3.14159"),
        # last-number fallback
        ("I counted 3, then 4, then 5", "5"),
        ("12 + 30 = 42.", "42"),
        ("10-3=7", "7"),
        ("x = -0.25", "-0.25"),
        ("it is 2024-11 now", "11"),
        # unicode
        ("The answer is \u22125", "-5"),  # U+2212 minus sign
        ("Answer: \uff14\uff12", "42"),  # full-width digits
        ("\u0663 apples", "3"),  # Arabic-Indic digit three
        ("Answer:\u00a08", "8"),  # no-break space
        # nothing to extract
        ("no numbers here", None),
        ("", None),
        (r"\boxed{unbalanced", None),
        (r"\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("0.5", "1/2"),
        (r"\frac{1}{2}", "0.50"),
        ("1,000", "1000"),
        ("-2", "\u22122"),
        ("$5$", "5"),
        ("7.0", "7"),
    ],
)
def test_equal_values_share_a_key(a, b):
    assert normalize_answer(a) == normalize_answer(b) is not None


def test_division_by_zero_is_not_a_number():
    assert normalize_answer("1/0") != normalize_answer("0")
    assert extract_answer(r"\boxed{\frac{1}{0}}") != "0"


def test_find_boxed_nested():
    assert find_boxed(r"a \boxed{\frac{a}{b} + {c}} b") == r"\frac{a}{b} + {c}"
    assert find_boxed("no box") is None


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 10_000 + "1" * 10_000,
        "{" * 50_000,
        "answer is " * 5_000,
        "9" * 100_000,
        "1," * 30_000,
        "\x00\ufffd\U0001f600" * 5_000,
    ],
)
def test_adversarial_inputs_are_bounded_and_safe(text):
    from server.voting import MAX_SCAN_CHARS

    # Extraction reads only the last MAX_SCAN_CHARS characters, so its cost is bounded
    # whatever a sample's length; the thread's join is a hang guard, not a speed bound.
    results: list[str | None] = []
    worker = threading.Thread(target=lambda: results.append(extract_answer(text)), daemon=True)
    worker.start()
    worker.join(timeout=600)
    assert results, "extraction hung"
    assert results[0] is None or isinstance(results[0], str)
    assert results[0] == extract_answer(text[-MAX_SCAN_CHARS:])


def test_majority_vote_counts_and_abstentions():
    vote = majority_vote(["4", None, "4", "5", None])
    assert vote.answer == "4"
    assert vote.votes == {"4": 2, "5": 1}
    assert vote.num_voters == 3
    assert vote.agreement == pytest.approx(2 / 3)
    assert vote.winner_index == 0
    assert not vote.tie


def test_tie_broken_by_mean_logprob():
    vote = majority_vote(["1", "2", "2", "1"], [-1.0, -0.2, -0.4, -2.0])
    assert vote.tie
    assert vote.answer == "2"  # mean -0.3 beats mean -1.5
    assert vote.winner_index == 1  # the more confident of the two "2" samples


def test_tie_without_logprobs_goes_to_first_seen():
    assert majority_vote(["b", "a", "a", "b"]).answer == "b"
    assert majority_vote(["b", "a", "a", "b"], [None, None, None, None]).answer == "b"


def test_no_answers():
    vote = majority_vote([None, None], [-3.0, -1.0])
    assert vote.answer is None and vote.votes == {} and vote.agreement == 0.0
    assert vote.winner_index == 1  # still returns the most confident sample's text


def test_vote_order_is_deterministic():
    answers = ["3", "1", "2", "1", "3", "2"]
    assert list(majority_vote(answers).votes) == ["3", "1", "2"]
    assert majority_vote(answers).answer == majority_vote(answers).answer == "3"


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        majority_vote(["1"], [0.0, 0.0])


# -- end to end -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{"parallelism": 3}, {"parallelism": "auto"}, {"policy": "esc:window=2,max=4"}],
    ids=["fixed", "auto", "esc"],
)
async def test_every_returned_choice_states_its_votes_answer(client, extra):
    """The core invariant: the content a choice returns is a sample whose extracted answer
    is the answer its vote chose (or no answer, when no sample had one)."""
    arithmetic = [{"role": "user", "content": "What is 6 + 7? Think, then give the answer."}]
    chat = await client.chat.completions.create(
        model=MODEL_NAME, messages=arithmetic, max_tokens=24, temperature=1.0, n=2, seed=4, extra_body=extra
    )
    votes = chat.model_extra["t2"]["choices"]
    assert len(chat.choices) == len(votes) == 2
    for choice, vote in zip(chat.choices, votes, strict=True):
        assert extract_answer(choice.message.content) == vote["answer"]
    completion = await client.completions.create(
        model=MODEL_NAME, prompt=["3 + 4 =", "10 - 8 ="], max_tokens=8, temperature=1.0, n=2, extra_body=extra
    )
    votes = completion.model_extra["t2"]["choices"]
    assert len(completion.choices) == len(votes) == 4
    for choice, vote in zip(completion.choices, votes, strict=True):
        assert extract_answer(choice.text) == vote["answer"]
