"""The one module that owns the vLLM engine.

`Engine` wraps vLLM V1's `AsyncLLM` (engine core in its own process, front end in ours),
starts it with automatic prefix caching and the hidden-state capture worker extension, and
offers the rest of t2serve a narrow interface: tokenizer, `generate`, `abort`,
`captured_states`, health. Nothing else in the server imports vLLM's engine classes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from server import vllm_openai
from server.config import EngineSettings
from server.engine.capture import WORKER_EXTENSION, CaptureReceiver, capture_config
from server.engine.parallel import check_stage_parts, refuse_unsupported
from server.engine.platform import CPU_BLOCK_SIZE, apply_cpu_environment, on_cpu, resolve_dtype

logger = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine's core process has stopped: nothing more can run (the server answers 503)."""


class EngineRejected(ValueError):
    """vLLM refused a request itself (its own checks): the client's fault."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    num_layers: int
    hidden_size: int
    max_model_len: int
    device: str
    fingerprint: str  # identifies the architecture + shape; estimator heads must match it
    dtype: str = "auto"  # the dtype the engine runs in (after `--dtype auto` was resolved)


def model_fingerprint(hf_config: Any) -> str:
    """A short hash of the fields that fix a model's hidden-state space."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k: getattr(hf_config, k, None)
    keys = (
        "architectures",
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rope_theta",
        "max_position_embeddings",
    )
    blob = json.dumps({k: get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CaptureSelfTestError(RuntimeError):
    """The start-up capture check found no states, or malformed ones."""


SELF_TEST_PROMPT = "The capital of France is"


class Engine:
    """A started vLLM engine plus the capture channel. Create with `await Engine.start(...)`."""

    def __init__(
        self,
        llm: Any,
        receiver: CaptureReceiver,
        info: ModelInfo,
        settings: EngineSettings,
        default_sampling: dict[str, Any] | None = None,
    ):
        self._llm = llm
        self._receiver = receiver
        self.info = info
        self.settings = settings
        self.tokenizer = llm.get_tokenizer()
        # The model's sampling defaults for fields a request leaves out, as vLLM's server
        # reads them (--generation-config).
        self.default_sampling = default_sampling or {}

    @classmethod
    async def start(cls, settings: EngineSettings) -> Engine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cpu = on_cpu()
        if cpu:
            apply_cpu_environment(settings)
        # On GPU vLLM's Model Runner V2 is the default for dense models, and the capture
        # patches the V1 runner (CPU uses V1 anyway). Spawned engine processes
        # inherit the environment; a value the user exported wins, or is refused.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        refuse_unsupported(settings, cpu)
        block_size = settings.block_size or (CPU_BLOCK_SIZE if cpu else None)
        dtype = resolve_dtype(settings.dtype, cpu)
        if dtype != settings.dtype:
            logger.info(
                "dtype auto on this CPU: %s (native bf16 kernels: %s)",
                dtype,
                "yes" if dtype == "bfloat16" else "no",
            )
        args = AsyncEngineArgs(
            model=settings.model,
            tokenizer=settings.tokenizer,
            served_model_name=settings.served_model_name,
            dtype=dtype,
            seed=settings.seed,
            generation_config=settings.generation_config,
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            data_parallel_size=settings.data_parallel_size,
            distributed_executor_backend=settings.distributed_executor_backend,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager,
            block_size=block_size,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_prefix_caching=settings.enable_prefix_caching,
            enable_chunked_prefill=(
                settings.enable_chunked_prefill
                if settings.enable_chunked_prefill is not None
                else (False if cpu else None)
            ),
            # The capture tap is installed at model load, before torch.compile traces the
            # model; its config is part of vLLM's compile-cache hash (server/engine/capture.py).
            worker_extension_cls=WORKER_EXTENSION if settings.capture else "",
            additional_config=capture_config(settings.capture_slots) if settings.capture else {},
            # vLLM's own Prometheus metrics (KV cache, prefix-cache hits) on /metrics, unless
            # turned off as with vLLM's --disable-log-stats.
            disable_log_stats=not settings.log_stats,
        )
        # Bound before the engine starts: a --capture-address in use fails in a second, not
        # after minutes of start-up.
        receiver = CaptureReceiver(settings.capture_address)
        try:
            llm = AsyncLLM.from_engine_args(args)
        except BaseException:
            await receiver.close()
            raise
        try:
            receiver.start()
            config = llm.model_config
            if settings.capture:
                # Every worker of every engine core connects (vLLM answers with the first
                # core's workers): one sender per pipeline stage, whose parts tile the layers.
                workers = await llm.collective_rpc("t2_capture_install", args=(receiver.endpoint,))
                num_layers, hidden_size = check_stage_parts(workers)
            else:
                num_layers = int(config.hf_config.num_hidden_layers)
                hidden_size = int(config.hf_config.hidden_size)
            info = ModelInfo(
                name=settings.served_model_name,
                path=settings.model,
                num_layers=num_layers,
                hidden_size=hidden_size,
                max_model_len=int(config.max_model_len),
                device="cpu" if cpu else "gpu",
                fingerprint=model_fingerprint(config.hf_config),
                dtype=str(config.dtype).removeprefix("torch."),
            )
        except BaseException:
            await receiver.close()
            llm.shutdown()
            raise
        default_sampling = vllm_openai.default_sampling_params(llm.model_config)
        if default_sampling:
            logger.info("default sampling params from the model's generation config: %s", default_sampling)
        logger.info("engine ready: %s", info)
        return cls(llm, receiver, info, settings, default_sampling)

    @property
    def mode(self) -> str:
        return "eager" if self.settings.enforce_eager else "compiled"

    async def self_test(self) -> dict[str, Any]:
        """Capture one known prompt end to end, as a request would, and check the states:
        `[num_layers, hidden_size]` (assembled from every pipeline stage), finite, not all
        zero. Raises CaptureSelfTestError naming the model and the mode, so a server never
        starts with a capture that silently produces nothing (then every `auto` request
        would wait for states)."""
        states = await self.prompt_states(list(self.tokenizer.encode(SELF_TEST_PROMPT)))
        expected = (self.info.num_layers, self.info.hidden_size)
        where = f"model {self.info.name!r} in {self.mode} mode ({self.info.dtype})"
        if states is None:
            raise CaptureSelfTestError(
                f"hidden-state capture self-test failed for {where}: no states arrived within "
                f"{self.settings.capture_timeout_s:g} s. Try --enforce-eager (capture without "
                "torch.compile/CUDA graphs) to tell a compiler problem from a model one, or serve with "
                "--no-capture (no T2 estimate; `auto` then uses --default-parallelism)."
            )
        if states.shape != expected or not np.isfinite(states).all() or not np.abs(states).sum() > 0:
            raise CaptureSelfTestError(
                f"hidden-state capture self-test failed for {where}: states of shape {states.shape} "
                f"(expected {expected}), finite: {bool(np.isfinite(states).all())}"
            )
        return {
            "model": self.info.name,
            "mode": self.mode,
            "dtype": self.info.dtype,
            "shape": list(states.shape),
        }

    async def prompt_states(self, prompt_token_ids: list[int]) -> np.ndarray | None:
        """The `[L, d]` float32 states of the prompt's last token, from a one-token greedy
        probe tagged for capture (server.sampling.capture_probe); None if none arrive within
        --capture-timeout. The probe fills the prefix cache for what follows."""
        import uuid

        from server import sampling

        tag = f"t2serve-probe-{uuid.uuid4().hex}"
        future = self.expect_capture(tag)
        try:
            async for _ in self.generate(prompt_token_ids, sampling.capture_probe(tag), f"{tag}-s0"):
                pass
            # The states leave the worker in the step that completes the prefill, before the
            # request's output: a wait here is for the socket, bounded by --capture-timeout.
            done, _ = await asyncio.wait({future}, timeout=self.settings.capture_timeout_s)
        finally:
            self.forget_capture(tag)
        return future.result() if done and not future.cancelled() else None

    # -- requests -----------------------------------------------------------------------

    def expect_capture(self, tag: str) -> asyncio.Future[np.ndarray]:
        """The future that the `[L, d]` float32 states of the request tagged `tag`
        (server.sampling.for_launch) arrive on; call before submitting it (no race)."""
        return self._receiver.expect(tag)

    def forget_capture(self, tag: str) -> None:
        self._receiver.forget(tag)

    @property
    def capture_messages(self) -> int:
        """Capture messages the workers have pushed so far (one per captured request and
        pipeline stage)."""
        return self._receiver.messages

    def verify(self, params: Any) -> None:
        """vLLM's own checks of sampling params against this engine (log-prob limits, token
        ids, structured-output grammars compiled by its backend), as its input processor runs
        them, but before anything is sent or streamed. Raises vLLM's VLLMValidationError."""
        config = self._llm.vllm_config
        params.verify(
            config.model_config, config.speculative_config, config.structured_outputs_config, self.tokenizer
        )

    async def generate(self, prompt_token_ids: list[int], params: Any, request_id: str) -> AsyncIterator[Any]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_token_ids), params, request_id
            ):
                yield output
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc
        except VLLMClientError as exc:
            raise EngineRejected(str(exc)) from exc

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.healthy:
            await self._llm.abort(request_ids)

    # -- state --------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return not self._llm.errored

    async def check_health(self) -> None:
        await self._llm.check_health()

    def num_unfinished_requests(self) -> int:
        """Requests the front end still tracks (each sample of an n>1 request counts)."""
        return self._llm.output_processor.get_num_unfinished_requests()

    def generated_tokens(self, request_ids: list[str]) -> int:
        """Tokens generated so far by these running requests (all samples of an n>1 one),
        read from the front end's own request states: the samples run with final-only
        output, so nothing else reports their progress before they end (a request budget,
        server.budget, needs it). Pinned by tests/server/test_budget.py (the token budget on the real engine)."""
        processor = self._llm.output_processor
        total = 0
        for request_id in request_ids:
            for internal_id in processor.external_req_ids.get(request_id, ()):
                state = processor.request_states.get(internal_id)
                if state is not None:
                    total += state.detokenizer.num_output_tokens()
        return total

    async def shutdown(self) -> None:
        await self._receiver.close()
        self._llm.shutdown()
