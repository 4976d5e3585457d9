"""The platform the engine runs on: CPU or GPU, the dtype that is fast here, and vLLM's CPU
knobs. Pure functions of the machine and the settings, read once at start-up."""

from __future__ import annotations

import os

from server.config import EngineSettings
from server.engine.parallel import cpu_threads_bind, ranks_per_engine_core

# Defaults that make vLLM work well on a small CPU box; applied only on the CPU platform.
CPU_BLOCK_SIZE = 32  # CPU attention needs a multiple of 32; the default 128 caches little.


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (x86: AVX-512-BF16 or AMX tiles).

    Without them oneDNN emulates bf16 and the engine runs ~4.5x slower than in float32
    (measured on a 2-core EPYC without AVX-512, ../shared/NOTES.md)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(requested: str, cpu: bool) -> str:
    """The dtype to start the engine with. `auto` on CPU means the fast one for *this* CPU:
    bfloat16 where it has native bf16 kernels, float32 otherwise (the checkpoint is upcast
    at load). Elsewhere, or when the user named a dtype, vLLM's own rule stands."""
    if requested != "auto" or not cpu:
        return requested
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return requested  # vLLM's CPU platform picks by its own flags there (e.g. macOS FEAT_BF16)
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def apply_cpu_environment(settings: EngineSettings) -> None:
    """Set vLLM's CPU knobs before the engine processes are spawned (they inherit env).

    Values the user exported win. Without VLLM_CPU_KVCACHE_SPACE vLLM sizes the KV cache
    from total memory and fails to start when that much is not free.
    """
    cores = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_space_gib))
    # vLLM binds one core and reserves another by default; on small boxes use them all.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # One `|`-separated core list per rank of every engine core (data x tensor x pipeline).
    ranks = settings.data_parallel_size * ranks_per_engine_core(settings)
    os.environ.setdefault(
        "VLLM_CPU_OMP_THREADS_BIND", settings.cpu_threads_bind or cpu_threads_bind(cores, ranks)
    )
