"""t2serve's Prometheus metrics (prefix `t2serve_`; vLLM owns `vllm:`).

Metrics live in prometheus_client's default registry, next to the vLLM engine's own, so one
`GET /metrics` shows both. They are created once per process (module import).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

REQUESTS = Counter(
    "t2serve_requests",
    "Requests finished, by endpoint, parallelism mode (auto/fixed) and outcome (ok/error/cancelled).",
    ["endpoint", "mode", "outcome"],
)
SAMPLES = Counter("t2serve_samples_dispatched", "Samples sent to the engine.")
SAMPLES_ABORTED = Counter(
    "t2serve_samples_aborted",
    "Samples aborted before they finished: a stopping policy decided the vote, or the deadline hit.",
)
AGGREGATES = Counter(
    "t2serve_aggregates",
    "Votes, by what the samples voted with (answer, consensus, usc, json, exact, auto:answer, "
    "auto:consensus; consensus:mbr, usc:mbr, auto:mbr when no group won) and whether an `auto` "
    "request was found open-ended (stopped early).",
    ["aggregate", "open_ended"],
)
GATE_ROUTES = Counter(
    "t2serve_gate_routes",
    "Requests the head's gate routed, by outcome: answerable (the head's N), open_ended "
    "(--open-ended-parallelism) or unfamiliar (the default N).",
    ["route"],
)
for _route in ("answerable", "open_ended", "unfamiliar"):  # exported at 0 before any request
    GATE_ROUTES.labels(_route)
POLICY_REQUESTS = Counter(
    "t2serve_policy_requests",
    "Prompts served, by the sampling policy's registered name (fixed, t2, esc, t2+beta, ...).",
    ["policy"],
)
BASELINE_SAMPLES = Counter(
    "t2serve_samples_baseline",
    "Samples a fixed-N deployment (N_max per choice: the head's, else the default N) would have sent; "
    "samples saved = t2serve_samples_baseline_total - t2serve_samples_dispatched_total.",
)
GENERATED_TOKENS = Counter("t2serve_generated_tokens", "Tokens generated over all samples.")
REQUEST_TOKENS = Histogram(
    "t2serve_request_tokens",
    "Tokens one request's samples generated together (what --max-request-tokens bounds).",
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144),
)
BUDGET_EXHAUSTED = Counter(
    "t2serve_budget_exhausted", "Requests whose vote the token budget ended (server/budget.py)."
)
TOOL_CALL_SAMPLES = Counter(
    "t2serve_tool_call_samples",
    "Samples of requests with tools under a tool-call parser, by what their text held: call, text, "
    "malformed (a call envelope no call could be read from; it votes with its text).",
    ["outcome"],
)
VOTES = Counter("t2serve_votes", "Votes by outcome: decided, tie, no_answer.", ["outcome"])
CHOSEN_N = Histogram(
    "t2serve_chosen_parallelism",
    "Samples per choice chosen for a request.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128),
)
CAPTURE_SECONDS = Histogram(
    "t2serve_capture_latency_seconds",
    "From submitting sample 0 to its prefill hidden states arriving (auto mode).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REQUEST_SECONDS = Histogram(
    "t2serve_request_latency_seconds",
    "End-to-end request latency.",
    ["endpoint"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)
REQUESTS_IN_FLIGHT = Gauge("t2serve_requests_in_flight", "Requests being served.")
SAMPLES_IN_FLIGHT = Gauge("t2serve_samples_in_flight", "Samples running in the engine.")
UNIT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
PREDICTION = Histogram(
    "t2serve_estimator_prediction",
    "Estimator output N*/N_max per request (auto mode, head loaded).",
    buckets=UNIT_BUCKETS,
)
ESTIMATOR_SECONDS = Histogram(
    "t2serve_estimator_latency_seconds",
    "Estimator head latency per request (off the event loop).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
AGREEMENT = Histogram(
    "t2serve_vote_agreement",
    "Share of voting samples that gave the winning answer, per choice.",
    buckets=UNIT_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "t2serve_time_to_first_token_seconds",
    "Request start to the first content byte (the voted text is sent once the vote is decided).",
    ["endpoint"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)
ENGINE_INFO = Info(
    "t2serve_engine", "The running engine: device, dtype (after --dtype auto) and eager or compiled mode."
)
ESTIMATOR_INFO = Info(
    "t2serve_estimator",
    "The estimator head in use (empty values: none loaded); version: its files' content hash @ load "
    "time, as in t2.head (server/head_reload.py); policy: the one `auto` runs, as in t2.policy.",
)
HEAD_RELOADS = Counter(
    "t2serve_head_reloads",
    "Head and policy reloads, by source (api: POST /admin/head or /admin/policy; sighup; watch: "
    "--reload-watch) and outcome (ok; refused: it could not be used and the old one stays).",
    ["source", "outcome"],
)
for _source in ("api", "sighup", "watch"):  # exported at 0 before any reload
    for _outcome in ("ok", "refused"):
        HEAD_RELOADS.labels(_source, _outcome)
# -- hardening: back-pressure, load-aware N, faults (README "Operating t2serve") --
QUEUE_DEPTH = Gauge("t2serve_queue_depth", "Requests waiting for admission.")
REJECTED = Counter(
    "t2serve_requests_rejected",
    "Requests turned away before running, by reason: queue_full (429), queue_timeout (503), "
    "unauthorized (401), engine_dead (503).",
    ["reason"],
)
LOAD_REDUCED = Counter(
    "t2serve_load_reduced_requests", "auto requests that got a smaller N than they would have without load."
)
LOAD_CAP = Histogram(
    "t2serve_load_scaled_cap",
    "Per-choice cap on N after the load curve, per auto request.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128),
)
TIMEOUTS = Counter(
    "t2serve_request_timeouts",
    "Requests that hit their deadline, by outcome: partial (voted) or failed.",
    ["outcome"],
)
ESTIMATOR_FALLBACKS = Counter(
    "t2serve_estimator_fallbacks",
    "Times the configured head could not be used and the default N was: load (at start-up), "
    "predict, or temperature (the request samples unlike the head's labels).",
    ["reason"],
)
for _reason in ("load", "predict", "temperature"):  # exported at 0 before any request
    ESTIMATOR_FALLBACKS.labels(_reason)
ENGINE_HEALTHY = Gauge("t2serve_engine_healthy", "1 while the vLLM engine is alive, 0 once it died.")
# -- exploration and traffic records (server/exploration.py, server/recording.py) --
EXPLORED = Counter(
    "t2serve_explored_requests",
    "Requests run at N_max for the live gauge and the traffic records, by why: share "
    "(--explore-share) or requested (t2_explore with an admin key); budget_skipped: drawn but not "
    "explored, the --explore-budget credit being short (not run at N_max).",
    ["reason"],
)
EXPLORE_EXTRA_SAMPLES = Counter(
    "t2serve_explore_extra_samples",
    "Samples explored requests were charged beyond what `auto` would have launched for them (N_max "
    "minus the live gauge's `auto` samples, per choice); exploration's share of the cost = this / "
    "t2serve_samples_dispatched_total.",
)
EXPLORE_CREDIT = Gauge(
    "t2serve_explore_budget_credit",
    "--explore-budget: extra samples exploration may still spend (B x samples launched - extra "
    "samples charged; negative after admin t2_explore requests).",
)
LABEL_RECORDS = Counter(
    "t2serve_label_records",
    "Traffic records, by outcome: written to the label store, dropped_full (the writer's queue was "
    "full) or dropped_error (the store failed, or shutdown came first).",
    ["outcome"],
)
for _outcome in ("written", "dropped_full", "dropped_error"):  # exported at 0 before any record
    LABEL_RECORDS.labels(_outcome)
# -- /v1/responses (server.response_store) --
RESPONSE_STORE = Counter(
    "t2serve_response_store",
    "Response store outcomes: stored, skipped_full (store left out, no room: not stored), "
    "refused_full / refused_off (store=true: 400), expired, deleted, previous_missing "
    "(previous_response_id not held: 400).",
    ["outcome"],
)
# -- hidden-state capture across pipeline stages and engine cores (server/engine/capture.py) --
CAPTURE_DROPPED = Counter(
    "t2serve_capture_dropped",
    "Captures that fell back to the default N at once, by reason: slots (more captures in one step "
    "than --capture-slots) or part_missing (a pipeline stage's part of the states never arrived).",
    ["reason"],
)
for _reason in ("slots", "part_missing"):  # exported at 0 before any drop
    CAPTURE_DROPPED.labels(_reason)
# -- the live gauge: policies replayed on explored pools (server/shadow.py) --
SHADOW_POOLS = Counter("t2serve_shadow_pools", "Explored pools the live gauge replayed every policy on.")
SHADOW_AGREED = Counter(
    "t2serve_shadow_agreed",
    "Explored pools on which a policy's vote agreed with the N_max vote, by policy.",
    ["policy"],
)
SHADOW_SAMPLES_LAUNCHED = Counter(
    "t2serve_shadow_samples_launched",
    "Samples a policy would have launched on the explored pools.",
    ["policy"],
)
SHADOW_AGREEMENT = Gauge(
    "t2serve_shadow_agreement",
    "Share of explored pools on which a policy's vote agrees with the N_max vote (running mean; "
    "1 - it bounds the accuracy given up against fixed N_max).",
    ["policy"],
)
SHADOW_SAMPLES = Gauge(
    "t2serve_shadow_samples",
    "Samples a policy would have launched per explored pool (running mean).",
    ["policy"],
)
SHADOW_SAVED = Gauge(
    "t2serve_shadow_samples_saved",
    "Samples per pool a policy saves against the cheapest fixed N with at least its agreement "
    "(negative: that fixed N is cheaper).",
    ["policy"],
)
