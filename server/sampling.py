"""The one place that builds vLLM `SamplingParams`.

Three steps, each a pure function of what it is given:
  from_request   a request's sampling fields -> validated params, built by vLLM's own request
                 model with the model's generation_config defaults, and the parser of the
                 samples' outputs (server.vllm_openai)
  for_voting     params as every sample of a vote runs them (final outputs only; each token's
                 log-prob when the tie rule reads it)
  for_launch     one engine request of `n` samples, numbered from `first`: seeds shifted so
                 sample i of a request always gets seed + i, and the capture tag on sample 0
  capture_probe  a prompt's states alone (the start-up self-test, offline runs): one greedy
                 token, tagged for capture
  usc_pass       the self-consistency pass: a few greedy tokens naming a candidate
  offline        the offline pipeline's samples (labels): temperature, length and seed only
"""

from __future__ import annotations

from typing import Any

from server import vllm_openai
from server.engine.capture import CAPTURE_KEY
from server.errors import APIError
from server.protocol import SamplingFields


def from_request(
    request: SamplingFields,
    prompt_len: int,
    *,
    context: int,
    defaults: dict[str, Any],
    default_max_tokens: int | None,
    parsers: vllm_openai.Parsers | None = None,
    token_budget: int | None = None,
) -> tuple[Any, vllm_openai.OutputParser]:
    """The request's sampling parameters for one prompt, as vLLM's server builds them (its
    own request model, the model's generation_config `defaults`, adjusted by the server's
    reasoning / tool-call `parsers`), checked against the context left after the prompt;
    and the parser its samples' outputs are read with. No sample may decode past the
    request's `token_budget` (server.budget) on its own."""
    if context - prompt_len <= 0:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; this model's context is {context} tokens",
            param="messages" if hasattr(request, "messages") else "prompt",
            code="context_length_exceeded",
        )
    params, reader = vllm_openai.to_sampling_params(
        request_body(request),
        chat=hasattr(request, "messages"),
        prompt_len=prompt_len,
        context=context,
        defaults=defaults,
        default_max_tokens=default_max_tokens,
        parsers=parsers,
    )
    if token_budget is not None and (params.max_tokens is None or params.max_tokens > token_budget):
        params.max_tokens = token_budget
    return params, reader


def request_body(request: SamplingFields) -> dict[str, Any]:
    """The fields the client sent (declared and extra), as JSON values."""
    return request.model_dump(exclude_unset=True, mode="json")


def for_voting(params: Any, *, token_logprobs: bool) -> Any:
    """A copy that returns each engine request's outputs once, when it ends (the vote reads
    whole samples), with the sampled token's log-prob when the tie rule needs it."""
    from vllm.sampling_params import RequestOutputKind

    voting = params.clone()
    if token_logprobs and voting.logprobs is None:  # a request's own logprobs already cover it
        voting.logprobs = 0
    voting.output_kind = RequestOutputKind.FINAL_ONLY
    return voting


def for_launch(base: Any, *, n: int, first: int, capture_tag: str | None = None) -> Any:
    """One engine request of samples `first .. first + n - 1`: vLLM seeds child i of an n>1
    request with seed + i, so shifting the seed by `first` gives sample j the seed + j it
    would have as child j of one request. A capture tag marks the request whose prefill the
    worker captures (server.engine.capture)."""
    params = base.clone()
    params.n = n
    if params.seed is not None:
        params.seed += first
    if capture_tag is not None:
        params.extra_args = {**(params.extra_args or {}), CAPTURE_KEY: capture_tag}
    return params


def capture_probe(capture_tag: str) -> Any:
    """A request that only captures its prompt's states (server.engine.engine.Engine.prompt_states)."""
    from vllm import SamplingParams

    return for_launch(SamplingParams(max_tokens=1, temperature=0.0), n=1, first=0, capture_tag=capture_tag)


def usc_pass() -> Any:
    """The `usc` aggregator's extra pass (server.aggregation.usc_prompt): greedy, a few tokens."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=4, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)


def offline(*, temperature: float, max_tokens: int, seed: int | None = None) -> Any:
    """Samples drawn for labels (estimator.offline.engine_runs): what the labels record as
    their sampling setup, and nothing else."""
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
