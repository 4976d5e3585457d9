"""benchmarks/tool_calls.py: how a sample's vote key is read as a call outcome."""

from __future__ import annotations

import json

import pytest

from benchmarks.tool_calls import call_outcome


def calls(*pairs: tuple[str, object]) -> str:
    return "calls:" + json.dumps([{"name": name, "arguments": args} for name, args in pairs])


@pytest.mark.parametrize(
    ("key", "outcome"),
    [
        (calls(("get_weather", {"city": "Paris"})), "valid call"),
        (calls(("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})), "valid call"),
        (calls(("add", {"a": 1})), "call off schema"),  # a required parameter missing
        (calls(("add", {"a": 1, "b": "2"})), "call off schema"),  # wrong type
        (calls(("add", {"a": True, "b": 2})), "call off schema"),  # bool is not an integer
        (calls(("get_weather", {"city": "Paris", "country": "FR"})), "call off schema"),  # extra key
        (calls(("get_weather", "Paris")), "call off schema"),  # arguments not an object
        (calls(("search", {"q": "x"})), "call off schema"),  # no such tool
        ("5", "text"),
    ],
)
def test_a_vote_key_reads_as_its_call_outcome(key, outcome):
    assert call_outcome(key) == outcome
