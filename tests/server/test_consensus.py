"""Selection among free-text samples (server/consensus.py, server/aggregation.py): the
largest similarity group's medoid, the minimum-Bayes-risk fallback when no group wins, and
the `auto` rules that keep a stray or copied number from outvoting free text. Then on the
real engine: free-text samples at a forced N, `consensus` with ESC stopping, and `usc`."""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI

from server import aggregation, consensus
from server.aggregation import AutoAggregator, ConsensusAggregator, USCAggregator, decide
from tests.conftest import MODEL_NAME
from tests.server.helpers import client_for, serve

# Five tips no two of which reach the 0.7 similarity threshold. CENTRE shares a clause with
# each of the first three (one edit from each), which share less with one another; the
# last shares little with any: CENTRE is the medoid, and it is not the first sample.
CENTRE = "Pack a warm scarf, drink hot cider, walk under the orange maples."
SPREAD = [
    "Pack a thermos of cocoa, drink hot cider, stroll past the red barns.",
    "Bring a wool hat, sip spiced tea, walk under the orange maples.",
    CENTRE,
    "Pack a warm scarf, drink hot cider, photograph the quiet lakes at dawn.",
    "Rake the lawn into piles and jump in them with your dog.",
]


def keyed(aggregator, texts: list[str]) -> list[str | None]:
    return [aggregator.key(t) for t in texts]


def test_the_medoid_is_the_text_closest_to_all_the_others():
    totals = [sum(consensus.similarity(t, o) for o in SPREAD if o is not t) for t in SPREAD]
    assert consensus.medoid(SPREAD) == SPREAD.index(CENTRE) == totals.index(max(totals))
    assert consensus.medoid(list(reversed(SPREAD))) == len(SPREAD) - 1 - SPREAD.index(CENTRE)
    # Equal totals: the first wins (three copies of one text, then two of another).
    assert consensus.medoid(["a b c", "x y z", "a b c", "x y z"]) == 0
    assert consensus.medoid(["only one"]) == 0 and consensus.medoid(["a", "b"]) == 0


def test_no_group_formed_returns_the_medoid_of_all_samples():
    agg = ConsensusAggregator()
    keys = keyed(agg, SPREAD)
    assert len(set(keys)) == len(SPREAD)  # every sample is its own group
    vote = decide(agg, keys, SPREAD)
    # Without the fallback the tie rule would return sample 0.
    assert vote.winner_index == SPREAD.index(CENTRE) != 0
    assert vote.answer == "mbr: medoid of 5 (largest group 1)" and vote.votes == {vote.answer: 5}
    assert agg.ran_for(vote.answer) == "consensus:mbr"


def test_tied_largest_groups_fall_back_to_the_medoid_of_all():
    keys = ["#1: a", "#2: b", "#1: a", "#2: b", "#3: c", None]
    pooled = consensus.mbr_keys(keys)
    assert pooled == ["mbr: medoid of 5 (largest group 2)"] * 5 + [None]  # an abstention stays out
    # A group that beats every other wins as before; so does a vote of two.
    assert consensus.mbr_keys(["#1: a", "#1: a", "#2: b", "#3: c"]) is None
    assert consensus.mbr_keys(["#1: a", "#1: a"]) is None
    assert consensus.mbr_keys(["#1: a", "#2: b", None, None]) is None
    assert consensus.mbr_keys(["#1: a", "#2: b", "#3: c"]) is not None


def test_a_group_that_wins_returns_its_own_medoid():
    texts = [SPREAD[0], CENTRE, CENTRE + " Enjoy!", SPREAD[4]]
    agg = ConsensusAggregator()
    keys = keyed(agg, texts)
    assert keys[1] == keys[2] and len(set(keys)) == 3
    vote = decide(agg, keys, texts)
    assert vote.answer == keys[1] and vote.winner_index == 1 and vote.agreement == 0.5
    assert agg.ran_for(vote.answer) == "consensus"


def test_usc_names_the_mbr_fallback_when_it_ran():
    agg = USCAggregator()
    vote = decide(agg, keyed(agg, SPREAD), SPREAD)
    assert agg.ran_for(vote.answer) == "usc:mbr" and agg.ran_for("#1: x") == "usc"


TRANSLATIONS = [
    "Je n'oublierai jamais les feuilles d'automne, rouges et dorées sous la pluie.\nC'était magnifique.",
    "Besoin 1: voici.",
    "Jamais je n'oublierai l'automne et ses feuilles qui tombent doucement.\nMerci.",
    "Je ne vais jamais oublier les feuilles mortes de l'automne.\nVoilà la traduction.",
    "Les feuilles d'automne resteront dans ma mémoire pour toujours.\nBonne journée.",
]


def test_a_lone_number_among_free_text_does_not_win():
    auto = AutoAggregator()
    keys = keyed(auto, TRANSLATIONS)
    assert keys[1] == "1" and all(k in auto.text_keys for k in keys[:1] + keys[2:])  # the stray number
    vote = decide(auto, keys, TRANSLATIONS)
    assert vote.answer == "mbr: medoid of 5 (largest group 1)" and auto.ran_for(vote.answer) == "auto:mbr"
    assert vote.winner_index != 1  # the medoid of the pool, not the stray line
    assert vote.winner_index == consensus.medoid(TRANSLATIONS)


def test_a_number_copied_from_the_prompt_does_not_win_over_free_text():
    prompt = "Write a haiku about the winter of 2024."
    texts = [
        "Snow on the rooftops\nthe old year folds its white wings\nquiet streets at dusk",
        "Winter 2024.",
        "Cold breath on the glass\ncandles flicker in the dark\nthe kettle whistles",
        "Frost on bare branches\nthe river sleeps under ice\ncrows call from the pines",
        "A haiku for 2024.",
    ]
    without_prompt = AutoAggregator()
    keys = keyed(without_prompt, texts)
    assert keys[1] == keys[4] == "2024"  # two samples state it: without the prompt, it wins
    assert decide(without_prompt, keys, texts).answer == "2024"
    copied = AutoAggregator(prompt=prompt)
    vote = decide(copied, keyed(copied, texts), texts)
    assert vote.answer is not None and vote.answer.startswith("mbr: ")
    assert texts[vote.winner_index].count("\n") == 2  # a haiku, not the copied number


@pytest.mark.parametrize(
    ("route", "counted"),
    [(None, False), ("unfamiliar", False), ("open_ended", False), ("answerable", True)],
)
def test_the_gate_decides_whether_a_lone_answer_counts(route, counted):
    auto = AutoAggregator()
    if route is not None:
        auto.gated(route)
    texts = [TRANSLATIONS[0], "Il y a 12 feuilles.", TRANSLATIONS[2], TRANSLATIONS[3]]
    keys = keyed(auto, texts)
    assert keys[1] == "12"
    vote = decide(auto, keys, texts)
    assert (vote.answer == "12") is counted
    assert auto.ran_for(vote.answer) == ("auto:answer" if counted else "auto:mbr")


def test_answers_outrank_free_text_when_marked_agreed_or_in_the_majority():
    ramble = "I think we should add the numbers together and see what happens next, slowly."
    other = "Let us count the apples one by one and write each of them down on paper."
    # One marked answer ("Answer:") among rambling: the prompt is answerable, the answer wins.
    auto = AutoAggregator()
    texts = [ramble, "3 + 4 = 7, so\nAnswer: 7", other]
    vote = decide(auto, keyed(auto, texts), texts)
    assert vote.answer == "7" and vote.winner_index == 1
    # Two samples agree on an unmarked short answer among more free text: it wins.
    auto = AutoAggregator()
    texts = [ramble, "7", other, "It is 7.", "Counting takes a while, let me think again about this."]
    vote = decide(auto, keyed(auto, texts), texts)
    assert vote.answer == "7" and vote.votes == {"7": 2} and auto.ran_for(vote.answer) == "auto:answer"
    # Answers in the majority (not a free-text prompt): a lone one still counts.
    auto = AutoAggregator()
    texts = ["7", "8", ramble]
    assert decide(auto, keyed(auto, texts), texts).answer == "7"
    # Even on an open-ended verdict, agreeing answers not copied from the prompt count.
    auto = AutoAggregator(prompt="What is 3 + 4?")
    auto.gated("open_ended")
    texts = ["7", "It is 7.", ramble, other, "3"]
    vote = decide(auto, keyed(auto, texts), texts)
    assert vote.answer == "7" and vote.votes == {"7": 2}  # the copied "3" abstains


def test_create_passes_the_prompt_to_auto():

    auto = aggregation.create(None, "auto", 2, prompt="Tell me about the 3 bears, 1.5 of them.")
    assert isinstance(auto, AutoAggregator) and auto.prompt_numbers == {"3", "1.5"}
    assert auto.open_ended_parallelism == 2
    assert aggregation.create(None, "auto").prompt_numbers == set()


# -- on the real engine -----------------------------------------------------------------


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
    assert t2["aggregate"] == ("consensus:mbr" if mbr else "consensus") and t2["policy"].startswith("esc")
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
