"""Vote keys (server/aggregation.py): which aggregator a request's samples get, and keys."""

from __future__ import annotations

import pytest

from server import aggregation
from server.aggregation import canonical_json


def test_equal_objects_get_one_key_whatever_their_layout():
    a = canonical_json('{"name": "Ann", "age": 30, "tags": ["x", "y"]}')
    b = canonical_json('{\n  "tags": ["x","y"],\n  "age": 30.0,\n  "name": "Ann"\n}')
    assert a == b == '{"age":30,"name":"Ann","tags":["x","y"]}'
    assert canonical_json('{"age": 30.5}') != canonical_json('{"age": 30}')
    assert canonical_json('["b", "a"]') != canonical_json('["a", "b"]')  # lists keep their order


@pytest.mark.parametrize("text", ["", "not json", '{"a": 1', "{'a': 1}"])
def test_text_that_is_not_json_abstains(text):
    assert canonical_json(text) is None


def test_the_aggregator_follows_the_structured_outputs_constraint():
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    def pick(requested="answer", **constraint):
        params = (
            SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
            if constraint
            else SamplingParams()
        )
        return aggregation.create(params, requested).name

    assert pick() == "answer"
    assert pick("consensus") == "consensus" and pick("auto") == "auto"
    assert pick("consensus", json={"type": "object"}) == "json"  # the constraint decides
    assert pick(json_object=True) == "json"
    assert pick(choice=["yes", "no"]) == "exact"
    assert pick(regex="Answer: [0-9]+") == "answer"  # free text with an answer in it
    assert aggregation.ExactAggregator().key("  yes \n") == "yes"
    assert aggregation.AnswerAggregator().key("so the answer is 42.") == "42"
    assert set(aggregation.REQUESTABLE) <= set(aggregation.AGGREGATORS)


STRAY = [
    "1. Keep a regular schedule.\n2. Avoid screens in bed.\n3. Keep the room cool, around 18 degrees.",
    "def reverse(s):\n    return s[::-1]",
    "The treaty was signed on October 3, 2021.",
    "Meet me at 10:30 by the station.",
]


@pytest.mark.parametrize("text", STRAY)
def test_auto_never_votes_on_list_numbers_code_or_dates(text):
    # The lenient rule (aggregate: answer) reads a number out of each of these.
    assert aggregation.AnswerAggregator().key(text) is not None
    auto = aggregation.AutoAggregator()
    key = auto.key(text)
    assert key in auto.text_keys and auto.open_ended is True
    assert auto.ran_for(key) == "auto:consensus" and auto.sample_limit == 1


def test_auto_votes_on_explicit_answers_and_groups_free_text():
    auto = aggregation.AutoAggregator(open_ended_parallelism=3)
    assert auto.key("3 + 4 = 7, so\nAnswer: 7") == "7" and auto.open_ended is False
    assert auto.key("Seven it is.\n7") == "7"  # a short final line holding one number
    assert auto.sample_limit is None and auto.ran_for("7") == "auto:answer"
    rambling = auto.key("I think we should add the numbers together and see what happens next.")
    again = auto.key("I think we should add the numbers together and see what happens then.")
    assert rambling == again and rambling in auto.text_keys  # similar free text: one group
    # Answers outrank free text in the final vote: the two rambling samples abstain.
    assert auto.final(["7", rambling, rambling, None]) == ["7", None, None, None]
    assert auto.final([rambling, None]) == [rambling, None]  # no answer at all: the groups vote
    assert auto.pick("7", ["a", "b", "c"]) is None  # an answer: the vote's own pick


def test_auto_reads_answers_as_the_labels_did_once_the_gate_calls_the_prompt_answerable():
    worked = "We need the apples in the basket.\nAdding 3 and 4 gives 7 apples in the basket, which is the total we want."
    for route, expected in (("answerable", "7"), ("unfamiliar", None), ("open_ended", None)):
        auto = aggregation.AutoAggregator(open_ended_parallelism=2)
        auto.gated(route)
        key = auto.key(worked)
        # Lenient (the head's labels' rule) only where the gate vouched for the prompt.
        assert (key if key not in auto.text_keys else None) == expected
        assert auto.sample_limit == (2 if route == "open_ended" else None)


def test_consensus_groups_similar_texts_and_returns_the_medoid():
    agg = aggregation.ConsensusAggregator()
    texts = [
        "Crisp leaves descend, amber whispers on the wind, autumn breathes out slow.",
        "The capital of France is Paris, a city on the Seine.",
        "Crisp leaves descend, amber whispers in the wind, autumn breathes out slow.",
        "Crisp leaves drift down, amber whispers on the wind, autumn breathes slow.",
    ]
    keys = [agg.key(t) for t in texts]
    assert keys[0] == keys[2] == keys[3] != keys[1]
    assert keys[0].startswith("#1: Crisp leaves") and keys[1].startswith("#2: ")
    members = [texts[i] for i in (0, 2, 3)]
    assert agg.pick(keys[0], members) in (0, 1)  # the two closest to the rest, not the outlier
    assert agg.key("   ") is None


def test_usc_reads_the_number_the_model_names():
    prompt = aggregation.usc_prompt(["first answer", "second answer"])
    assert "Response 0: first answer" in prompt and prompt.endswith("Response ")
    assert aggregation.usc_choice("1", 2) == 1
    assert aggregation.usc_choice(" 0.", 2) == 0
    assert aggregation.usc_choice("7", 2) is None and aggregation.usc_choice("none", 2) is None
