"""What a sample votes with: its vote key, or None when it abstains; and which sample of the
winning key is returned.

The vote (server.voting.majority_vote), the stopping policies' tallies and the response all
work on keys. Each vote gets a fresh aggregator (`create`): constrained samples get their
constraint's, free text the one the request's `aggregate` names (default --aggregate):
  answer     the answer extracted from free text (server.voting.extract_answer)
  consensus  free text grouped by similarity as samples finish (server.consensus); the
             largest group wins and its medoid is returned; when no group wins (largest
             of one, or tied) the medoid of all samples (minimum Bayes risk: "consensus:mbr")
  usc        consensus keys for stopping; the returned sample is the one the model itself
             names as the most consistent in one extra pass (server.parallel)
  auto       the default: a sample that states an answer (strict extraction: a marker
             such as "Answer:", \\boxed{}, "####", or a short answer holding one number)
             votes with it, free text with its consensus group; the final vote counts the
             answers when they outrank the free text, the groups otherwise (as `consensus`,
             MBR included: "auto:mbr"). On a free-text prompt an answer copied from the
             prompt, or one no two samples state, does not outrank it. An open-ended request
             (the head's gate, else the first finished sample) stops at
             --open-ended-parallelism
  json       the canonical JSON of the output (parsed, keys sorted, integral numbers as ints),
             for `response_format` json_object / json_schema and `structured_outputs.json`,
             so equal objects vote together whatever their key order or spacing
  exact      the output itself, stripped, for `structured_outputs.choice`
A sample that makes tool calls votes with the canonical calls whatever the aggregator
(vote_key), and with a reasoning parser only the final content is keyed.
A new aggregator is one class here plus its entry in AGGREGATORS.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from dataclasses import replace
from typing import Any, ClassVar

from server import consensus, metrics
from server.voting import Vote, extract_answer, has_marked_answer, majority_vote, numbers_in

# What a request's `aggregate` may name (the constrained outputs' own are chosen for them).
REQUESTABLE = ("answer", "consensus", "usc", "auto")


class Aggregator:
    name: ClassVar[str]
    # The returned sample is chosen by the model in one extra pass (server.parallel).
    self_consistency: ClassVar[bool] = False

    def key(self, text: str) -> str | None:
        raise NotImplementedError

    def final(self, keys: list[str | None]) -> list[str | None]:
        """The keys the final vote counts (the samples' keys as they finished, by default)."""
        return keys

    def pick(self, key: str, texts: list[str]) -> int | None:
        """Which of the winning `key`'s samples (their texts, in sample order) is returned;
        None: the vote's own rule (server.voting.majority_vote)."""
        return None

    @property
    def sample_limit(self) -> int | None:
        """Samples the vote stops at, whatever the policy (None: the policy decides)."""
        return None

    def gated(self, route: str) -> None:
        """The head's gate (estimator.gate) routed the prompt ("answerable", "open_ended",
        "unfamiliar") from its states, before any sample finished."""

    def ran_for(self, winner: str | None) -> str:
        """What the `t2` object reports as the aggregate that ran, given the winning key."""
        return self.name


# What `t2.aggregate` reports when no group won and the medoid of all samples was returned.
MBR_SUFFIX = ":mbr"


class AnswerAggregator(Aggregator):
    name: ClassVar[str] = "answer"

    def __init__(self, strict: bool = False):
        self.strict = strict

    def key(self, text: str) -> str | None:
        return extract_answer(text, strict=self.strict)


class ConsensusAggregator(Aggregator):
    name: ClassVar[str] = "consensus"

    def __init__(self) -> None:
        self.groups = consensus.ConsensusKeys()

    def key(self, text: str) -> str | None:
        return self.groups.key(text)

    def final(self, keys: list[str | None]) -> list[str | None]:
        return consensus.mbr_keys(keys) or keys

    def pick(self, key: str, texts: list[str]) -> int | None:
        return consensus.medoid(texts)  # the group's medoid; with the MBR key, all voters'

    def ran_for(self, winner: str | None) -> str:
        return self.name + MBR_SUFFIX if consensus.is_mbr_key(winner) else self.name


class USCAggregator(ConsensusAggregator):
    """Consensus keys while the vote runs (so policies can stop it); the returned sample is
    the one the model names in the extra pass (usc_prompt / usc_choice)."""

    name: ClassVar[str] = "usc"
    self_consistency: ClassVar[bool] = True


# Universal Self-Consistency (Chen et al., 2023), continued from the request's own prompt.
USC_CANDIDATE_CHARS = 400
USC_PROMPT = (
    "\n\nI have generated the following responses to the request above:\n\n{responses}\n\n"
    "Evaluate these responses. Select the most consistent response based on majority consensus.\n"
    "The most consistent response is Response "
)


def usc_prompt(texts: list[str]) -> str:
    """The pass's text after the prompt: the candidates (each cut to USC_CANDIDATE_CHARS),
    ending where the model writes the chosen number."""
    responses = "\n\n".join(f"Response {k}: {t.strip()[:USC_CANDIDATE_CHARS]}" for k, t in enumerate(texts))
    return USC_PROMPT.format(responses=responses)


def usc_choice(text: str, candidates: int) -> int | None:
    """The candidate the pass named, or None if it named none of them."""
    digits = ""
    for ch in text.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits and int(digits) < candidates else None


class AutoAggregator(Aggregator):
    """A sample with an explicit answer (strict extraction; lenient once the head's gate has
    called the prompt answerable) votes with it; one without votes with its consensus
    group. The final vote counts the answers when they outrank the free text (the free-text
    samples then abstain) and the groups otherwise, with the MBR fallback when no group
    wins (its pool: every sample with a key, answers set aside included). A request is
    open-ended when the head's gate says so, or, without a gate, when the first finished
    sample has no answer: then an `auto` vote stops at `open_ended_parallelism` samples.

    Answers outrank free text unless the prompt is free text: the gate said open-ended, or,
    when it did not say answerable, more samples wrote free text than stated an answer and
    none marked one ("Answer:", \\boxed{}, "####"). Then an answer counts only if it is not
    a number copied from the `prompt` and two samples or more state it ("Besoin 1: ..."
    among seven translations does not vote "1")."""

    name: ClassVar[str] = "auto"

    def __init__(self, open_ended_parallelism: int = 1, prompt: str | None = None):
        self.open_ended_parallelism = open_ended_parallelism
        self.prompt_numbers = numbers_in(prompt) if prompt else set()
        self.answers = AnswerAggregator(strict=True)
        self.texts = ConsensusAggregator()
        self.text_keys: set[str] = set()
        self.open_ended: bool | None = None  # the gate's verdict, else the first sample's
        self.route: str | None = None  # the gate's route, when it ran
        self.marked = False  # a sample marked its answer: the prompt is not free text

    @property
    def sample_limit(self) -> int | None:
        return self.open_ended_parallelism if self.open_ended else None

    def gated(self, route: str) -> None:
        self.route = route
        self.open_ended = route == "open_ended"  # the gate saw the prompt: it outranks the first sample
        if route == "answerable":
            # The gate called the prompt answerable: read answers as the head's labels did
            # (the lenient rule, which also reads a number out of a worked solution). The
            # strict rule stays for requests no gate vouched for.
            self.answers = AnswerAggregator(strict=False)

    def key(self, text: str) -> str | None:
        answer = self.answers.key(text)
        if self.open_ended is None and text.strip():
            self.open_ended = answer is None
        if answer is not None:
            self.marked = self.marked or has_marked_answer(text)
            return answer
        key = self.texts.key(text)
        if key is not None:
            self.text_keys.add(key)
        return key

    def final(self, keys: list[str | None]) -> list[str | None]:
        answers = self.counted_answers(keys)
        if any(a is not None for a in answers):
            return answers  # the free text abstains
        groups = [k if k in self.text_keys else None for k in keys]
        return consensus.mbr_keys(keys, groups) or groups

    def counted_answers(self, keys: list[str | None]) -> list[str | None]:
        """The answers that outrank the free text (the rest None): all of them, unless the
        prompt is free text (class docstring)."""
        answers = [None if k in self.text_keys else k for k in keys]
        stated, free = sum(a is not None for a in answers), sum(k in self.text_keys for k in keys)
        free_text = self.route == "open_ended" or (
            self.route != "answerable" and not self.marked and free > stated
        )
        if not free or not free_text:
            return answers
        answers = [None if a in self.prompt_numbers else a for a in answers]
        top = Counter(a for a in answers if a is not None).most_common(1)
        return answers if top and top[0][1] >= 2 else [None] * len(keys)

    def pick(self, key: str, texts: list[str]) -> int | None:
        # A winning text group (or the MBR pool) returns its medoid; an answer, the vote's pick.
        return consensus.medoid(texts) if key in self.text_keys or consensus.is_mbr_key(key) else None

    def ran_for(self, winner: str | None) -> str:
        if consensus.is_mbr_key(winner):
            return self.name + MBR_SUFFIX
        return "auto:consensus" if winner in self.text_keys else "auto:answer"


class JSONAggregator(Aggregator):
    name: ClassVar[str] = "json"

    def key(self, text: str) -> str | None:
        return canonical_json(text)


class ExactAggregator(Aggregator):
    name: ClassVar[str] = "exact"

    def key(self, text: str) -> str | None:
        return text.strip() or None


AGGREGATORS: dict[str, type[Aggregator]] = {
    a.name: a
    for a in (
        AnswerAggregator,
        ConsensusAggregator,
        USCAggregator,
        AutoAggregator,
        JSONAggregator,
        ExactAggregator,
    )
}


def constrained(constraint: Any) -> str | None:
    """The aggregator samples need when the client's structured-outputs constraint (vLLM's
    StructuredOutputsParams, server.vllm_openai.OutputParser.constraint) shapes their output
    (None for free text)."""
    if constraint is not None:
        if getattr(constraint, "json", None) is not None or getattr(constraint, "json_object", None):
            return "json"
        if getattr(constraint, "choice", None):
            return "exact"
    return None


def create(
    constraint: Any, requested: str = "answer", open_ended_parallelism: int = 1, prompt: str | None = None
) -> Aggregator:
    """A fresh aggregator for one vote: the `constraint`'s (as `constrained` reads it), else
    the `requested` one. `prompt`: the prompt's text, so `auto` can tell an answer copied from it."""
    name = constrained(constraint) or requested
    if name == "auto":
        return AutoAggregator(open_ended_parallelism, prompt)
    return AGGREGATORS[name]()


def decide(
    aggregator: Aggregator,
    keys: list[str | None],
    texts: list[str],
    mean_logprobs: list[float | None] | None = None,
) -> Vote:
    """One choice's final vote over its finished samples (their keys and texts, in sample
    order), with `winner_index` the sample returned: the aggregator's `final` keys, the
    majority vote over them, then the aggregator's pick among the winning key's samples."""
    vote = majority_vote(aggregator.final(keys), mean_logprobs)
    if vote.answer is None:
        return vote
    members = [i for i, key in enumerate(vote.answers) if key == vote.answer]
    k = aggregator.pick(vote.answer, [texts[i] for i in members])
    return vote if k is None else replace(vote, winner_index=members[k])


def vote_key(parsed: Any, aggregator: Aggregator) -> str | None:
    """What a parsed sample (server.vllm_openai.ParsedOutput) votes with: its tool calls, as
    the canonical calls (name + canonical arguments), when it makes any; else its final
    content's key; None (abstains) without final content, e.g. cut off while reasoning."""
    if parsed.tool_outcome is not None:
        metrics.TOOL_CALL_SAMPLES.labels(parsed.tool_outcome).inc()
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
