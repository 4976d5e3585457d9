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

    def pick(**constraint):
        params = (
            SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
            if constraint
            else SamplingParams()
        )
        return aggregation.for_params(params).name

    assert pick() == "answer"
    assert pick(json={"type": "object"}) == "json"
    assert pick(json_object=True) == "json"
    assert pick(choice=["yes", "no"]) == "exact"
    assert pick(regex="Answer: [0-9]+") == "answer"  # free text with an answer in it
    assert aggregation.AGGREGATORS["exact"].key("  yes \n") == "yes"
    assert aggregation.AGGREGATORS["answer"].key("so the answer is 42.") == "42"
