"""Free-text requests on the real engine (server/aggregation.py, estimator/gate.py): the
gate and `aggregate: auto` keep open-ended prompts from spending N or voting on stray
numbers; `consensus` and `usc` pick among free-text samples, the medoid of all when no
group forms."""

from __future__ import annotations

import openai
import pytest
from openai import AsyncOpenAI

from estimator.gate import Gate
from estimator.head import DEFAULT_HEAD, T2Head
from estimator.offline.inputs.open_ended import KINDS, open_ended_prompts
from estimator.policies import choose_parallelism
from server import consensus
from tests.conftest import MODEL_NAME
from tests.server.test_api import QUESTION
from tests.server.test_hardening import serve

HELD_OUT = [next(p for p in open_ended_prompts() if p.split == "test" and p.kind == kind) for kind in KINDS]


def client_for(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)


async def sample(client: AsyncOpenAI, prompt: str, max_tokens: int, **extra_body):
    """One seeded chat request at T = 0.8 with t2serve's extension fields."""
    return await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.8,
        seed=0,
        extra_body=extra_body,
    )


@pytest.fixture
def shipped_head(server_settings):
    """The server's defaults: the shipped head (and its gate), `aggregate: auto`."""
    parallelism = server_settings.parallelism.model_copy(
        update={"estimator_head": "default", "aggregate": "auto"}
    )
    return server_settings.model_copy(update={"parallelism": parallelism})


async def test_open_ended_prompts_get_one_sample_under_auto(engine, shipped_head):
    async with serve(engine, shipped_head) as (url, _), client_for(url) as client:
        replies = [
            await client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": p.question}], max_tokens=32, seed=1
            )
            for p in HELD_OUT
        ]
        # A question the gate does not call open-ended is never cut short, even when its
        # first sample rambles: every sample votes.
        math = await client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=8, seed=0)
    for prompt, reply in zip(HELD_OUT, replies, strict=True):
        t2 = reply.model_extra["t2"]
        assert t2["gate"] == "open_ended", prompt
        assert t2["launched"] == 1 and t2["samples"] == 1, prompt  # the head's N is never spent
        assert reply.choices[0].message.content
    t2 = math.model_extra["t2"]
    assert t2["gate"] in ("answerable", "unfamiliar") and t2["open_ended"] is None
    assert t2["samples"] == t2["launched"] == t2["n_used"]  # every launched sample voted
    if t2["gate"] == "unfamiliar":  # the head's guess is not trusted: the default N
        assert t2["n_used"] == shipped_head.parallelism.default_parallelism and t2["prediction"] is None
    else:  # the head's N, at the margin times the gate's multiple (>= 1, <= the head's far scale)
        gate = Gate.load(DEFAULT_HEAD)
        assert 1.0 <= t2["margin_scale"] <= gate.far_scale
        margin = T2Head.load(DEFAULT_HEAD).meta.margin * t2["margin_scale"]  # the head's own margin
        assert t2["n_used"] == choose_parallelism(
            t2["prediction"],
            n_max=t2["n_max"],
            default=shipped_head.parallelism.default_parallelism,
            cap=t2["max_parallelism"],
            margin=margin,
        )


# At a client-forced N the strict rule alone must keep list numbering and code out of the
# vote. (A one-line translation that keeps a number, "... le 3 ...", can still read as a
# short answer; under the defaults the gate gives such prompts one sample, tested above.)
STRAY = ["Give me three tips for sleeping better.", "Write a Python function that reverses a string."]


@pytest.mark.parametrize("prompt", STRAY, ids=["list", "code"])
async def test_no_vote_is_decided_by_a_stray_number(engine, server_settings, prompt):
    parallelism = server_settings.parallelism.model_copy(update={"aggregate": "auto"})
    settings = server_settings.model_copy(update={"parallelism": parallelism})
    async with serve(engine, settings) as (url, _), client_for(url) as client:
        reply = await sample(client, prompt, 48, parallelism=4)  # an explicit N: all four samples vote
        lenient = await sample(client, prompt, 48, parallelism=4, aggregate="answer")
    t2 = reply.model_extra["t2"]
    assert t2["samples"] == 4 and sum(t2["votes"].values()) == 4
    # Similarity groups only, or, when no group won, all four pooled for the MBR pick.
    assert all(key.startswith(("#", "mbr: ")) for key in t2["votes"]), t2["votes"]
    assert t2["aggregate"] == ("auto:mbr" if t2["answer"].startswith("mbr: ") else "auto:consensus")
    assert t2["open_ended"] is None  # fixed N: not stopped
    # The same samples under the lenient rule (aggregate: answer) vote with numbers read out of them.
    lenient_t2 = lenient.model_extra["t2"]
    assert lenient_t2["aggregate"] == "answer" and any(not k.startswith("#") for k in lenient_t2["votes"])


HAIKU = "Write a haiku about autumn leaves."


async def test_a_forced_n_with_no_group_returns_the_medoid_of_all_samples(engine, server_settings):
    from vllm import SamplingParams

    from server.parallel import ParallelThinker

    thinker = ParallelThinker(engine, server_settings.parallelism)
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": HAIKU}], add_generation_prompt=True, tokenize=False
    )
    ids = list(engine.tokenizer.encode(chat, add_special_tokens=False))
    params = SamplingParams(max_tokens=32, temperature=0.8, seed=0)
    result = await thinker.run(ids, params, thinker.plan(8, aggregate="consensus"), request_id="mbr-haiku")
    (choice,) = result.choices
    texts, keys = [s.text for s in choice.samples], [s.answer for s in choice.samples]
    assert len(texts) == 8 and all(k is not None and k.startswith("#") for k in keys)
    # Seeded haiku of 32 tokens do not repeat one another: no group of two wins.
    assert consensus.mbr_keys(keys) is not None, keys
    assert result.aggregate == "consensus:mbr" and choice.vote.votes == {choice.vote.answer: 8}
    assert choice.vote.winner_index == consensus.medoid(texts)  # the medoid of all eight


async def test_an_open_ended_request_at_a_forced_n_names_the_mbr_rule(engine, server_settings):
    parallelism = server_settings.parallelism.model_copy(update={"aggregate": "auto"})
    settings = server_settings.model_copy(update={"parallelism": parallelism})
    async with serve(engine, settings) as (url, _), client_for(url) as client:
        reply = await sample(client, HAIKU, 32, parallelism=8)
    t2 = reply.model_extra["t2"]
    assert t2["samples"] == 8 and t2["aggregate"] == "auto:mbr", t2
    assert t2["answer"].startswith("mbr: medoid of 8") and t2["votes"] == {t2["answer"]: 8}
    assert reply.choices[0].message.content


async def test_consensus_with_esc_stopping_and_usc(client):
    reply = await sample(client, HAIKU, 24, aggregate="consensus", policy="esc:window=2,max=6")
    t2 = reply.model_extra["t2"]
    # A group that won, or (none did) every sample pooled for the medoid of all: named so.
    mbr = t2["answer"].startswith("mbr: ")
    assert t2["aggregate"] == ("consensus:mbr" if mbr else "consensus") and t2["policy"].startswith("ESC")
    assert 2 <= t2["samples"] <= 6 and sum(t2["votes"].values()) == t2["samples"]
    assert all(key.startswith("mbr: " if mbr else "#") for key in t2["votes"])
    assert reply.choices[0].message.content

    usc = await sample(client, HAIKU, 24, aggregate="usc", parallelism=3)
    t2 = usc.model_extra["t2"]
    # The pass names a candidate (its group's key is the answer); naming none keeps the MBR pick.
    assert t2["aggregate"] == ("usc:mbr" if t2["answer"].startswith("mbr: ") else "usc")
    assert t2["usc"]["passes"] == 1
    assert 0 < t2["usc"]["completion_tokens"] <= 4
    plain = await sample(client, HAIKU, 24, parallelism=3)
    # The pass's tokens are billed: its prompt (the request's own + the candidates) and its answer.
    assert usc.usage.prompt_tokens == plain.usage.prompt_tokens + t2["usc"]["prompt_tokens"]
    assert t2["usc"]["prompt_tokens"] > plain.usage.prompt_tokens


async def test_an_aggregate_that_cannot_apply_is_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            max_tokens=8,
            response_format={"type": "json_object"},
            extra_body={"aggregate": "consensus"},
        )
    assert err.value.body["param"] == "aggregate"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME, messages=QUESTION, max_tokens=8, extra_body={"aggregate": "vibes"}
        )
    assert "aggregate" in str(err.value.body)
