"""Vote keys (server/aggregation.py): which aggregator a request's samples get, and keys.
Then on the real engine: constrained outputs (a JSON schema, a choice, a named tool call)
vote on their canonical form."""

from __future__ import annotations

import pytest

from server import aggregation
from server.aggregation import canonical_json
from tests.conftest import MODEL_NAME
from tests.server.helpers import ADD_TOOL, TOOL_QUESTION


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
        return aggregation.create(params.structured_outputs, requested).name

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


# -- on the real engine: constrained outputs --------------------------------------------


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


async def test_json_schema_constrains_every_sample_and_votes_on_canonical_json(
    client, engine, server_settings
):
    import json

    import jsonschema
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from server.aggregation import canonical_json
    from server.parallel import ParallelThinker

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=100,
        temperature=1.0,
        seed=1,
        response_format=fmt,
        extra_body={"parallelism": 4},
    )
    t2 = response.model_extra["t2"]
    assert t2["n_used"] == 4
    jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)
    assert t2["answer"] == canonical_json(response.choices[0].message.content)
    for key in t2["votes"]:  # every vote key is a canonical, schema-valid object
        jsonschema.validate(json.loads(key), PERSON)
        assert canonical_json(key) == key

    # Every sample of such a vote is constrained (thinker level: all samples visible).
    thinker = ParallelThinker(engine, server_settings.parallelism)
    ids = list(engine.tokenizer.encode("A person as JSON:"))
    params = SamplingParams(
        max_tokens=100, temperature=1.0, seed=2, structured_outputs=StructuredOutputsParams(json=PERSON)
    )
    result = await thinker.run(ids, params, thinker.plan(4), request_id="json-vote")
    samples = result.choices[0].samples
    assert len(samples) == 4 and result.aggregate == "json"
    for sample in samples:
        if sample.finish_reason == "stop":
            jsonschema.validate(json.loads(sample.text), PERSON)
            assert sample.answer == canonical_json(sample.text)


async def test_structured_outputs_choice_votes_on_the_choice(client):
    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        max_tokens=4,
        temperature=1.0,
        extra_body={"parallelism": 3, "structured_outputs": {"choice": ["yes", "no"]}},
    )
    t2 = response.model_extra["t2"]
    assert t2["aggregate"] == "exact" and set(t2["votes"]) <= {"yes", "no"} and sum(t2["votes"].values()) == 3
    assert response.choices[0].message.content in ("yes", "no")


async def test_a_named_tool_choice_returns_one_voted_schema_valid_call(client):
    import json

    import jsonschema

    from server.aggregation import canonical_calls

    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=TOOL_QUESTION,
        tools=[ADD_TOOL],
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=40,
        temperature=1.0,
        seed=3,
        extra_body={"parallelism": 4},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id  # the parser's id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, ADD_TOOL["function"]["parameters"])
    t2 = response.model_extra["t2"]
    assert t2["n_used"] == 4
    # The vote is over canonical calls: name + normalised arguments, whatever the spacing.
    assert t2["answer"] == canonical_calls([call.model_dump()])
    for key in t2["votes"]:
        (voted,) = json.loads(key.removeprefix("calls:"))
        assert voted["name"] == "add"
        jsonschema.validate(voted["arguments"], ADD_TOOL["function"]["parameters"])
