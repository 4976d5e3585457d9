"""What a sample votes with: its vote key, or None when it abstains.

The vote (server.voting.majority_vote), the stopping policies' tallies and the response all
work on keys; which aggregator makes them follows from how the samples were constrained:
  answer  the answer extracted from free text (server.voting.extract_answer): the default
  json    the canonical JSON of the output (parsed, keys sorted, integral numbers as ints),
          for `response_format` json_object / json_schema and `structured_outputs.json`,
          so equal objects vote together whatever their key order or spacing
  exact   the output itself, stripped, for `structured_outputs.choice`
A sample that makes tool calls votes with the canonical calls whatever the aggregator
(vote_key), and with a reasoning parser only the final content is keyed.
A new aggregator is one class here plus its entry in AGGREGATORS.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any, ClassVar, Protocol

from server.voting import extract_answer


class Aggregator(Protocol):
    name: ClassVar[str]

    def key(self, text: str) -> str | None: ...


class AnswerAggregator:
    name: ClassVar[str] = "answer"

    def key(self, text: str) -> str | None:
        return extract_answer(text)


class JSONAggregator:
    name: ClassVar[str] = "json"

    def key(self, text: str) -> str | None:
        return canonical_json(text)


class ExactAggregator:
    name: ClassVar[str] = "exact"

    def key(self, text: str) -> str | None:
        return text.strip() or None


AGGREGATORS: dict[str, Aggregator] = {
    a.name: a for a in (AnswerAggregator(), JSONAggregator(), ExactAggregator())
}


def for_params(params: Any) -> Aggregator:
    """The aggregator for samples drawn with these SamplingParams."""
    constraint = getattr(params, "structured_outputs", None)
    if constraint is not None:
        if getattr(constraint, "json", None) is not None or getattr(constraint, "json_object", None):
            return AGGREGATORS["json"]
        if getattr(constraint, "choice", None):
            return AGGREGATORS["exact"]
    return AGGREGATORS["answer"]


def vote_key(parsed: Any, aggregator: Aggregator) -> str | None:
    """What a parsed sample (server.vllm_api.ParsedOutput) votes with: its tool calls, as
    the canonical calls (name + canonical arguments), when it makes any; else its final
    content's key; None (abstains) without final content, e.g. cut off while reasoning."""
    if parsed.tool_calls:
        return canonical_calls(parsed.tool_calls)
    return aggregator.key(parsed.content) if parsed.content else None


def canonical_calls(calls: list[dict[str, Any]]) -> str:
    """OpenAI tool calls written canonically ("calls:" + JSON): ids dropped, each call's
    arguments parsed and normalised like canonical_json (kept as text if not JSON)."""
    canonical = []
    for call in calls:
        arguments = call["function"]["arguments"]
        with contextlib.suppress(ValueError, RecursionError):
            arguments = _normalise(json.loads(arguments))
        canonical.append({"name": call["function"]["name"], "arguments": arguments})
    return "calls:" + json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(text: str) -> str | None:
    """`text` parsed as JSON and written back canonically; None if it is not JSON."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _normalise(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)  # 2.0 and 2 are the same number
        return value
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value
