"""In-engine capture of the last prompt token's residual stream at every decoder layer.

`HiddenStateCapture` is a vLLM *worker extension* (engine arg `worker_extension_cls`): its
methods are mixed into each vLLM worker, so it runs inside the process that holds the
model. Forward hooks on the decoder layers read the rows of requests whose prefill
completes in the current step and that were tagged through
`SamplingParams.extra_args[CAPTURE_KEY]`; the rows are pushed to the front end over a ZMQ
socket as soon as the step's forward pass ends. Pushing (rather than the front end polling
with `collective_rpc`) matters: an RPC is served only between engine steps, behind the
busy loop, while a push leaves the worker in the same step as the prefill.

The capture rides on the request's own prefill, so the KV blocks it produces are the ones
the other samples later read from the prefix cache; there is no second model copy and no
extra forward pass.

Wire format (one multipart message per captured request):
    [tag (utf-8), header (json: {"shape": [L, d], "dtype": "float32"}), payload (raw bytes)]

Limits: forward hooks fire only in eager mode (torch.compile/CUDA graphs bypass module
hooks), so the engine is started with `enforce_eager=True` when capture is on; pipeline
parallelism is not supported (each stage would hold only its own layers).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CAPTURE_KEY = "t2_capture"


def find_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer stack of a vLLM decoder-only model (Llama, Qwen, Mistral, ...)."""
    for path in ("model.layers", "language_model.model.layers", "transformer.h", "model.decoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise RuntimeError(f"cannot find decoder layers in {type(model).__name__}")


def residual_stream(output: Any) -> torch.Tensor:
    """The residual stream after a decoder layer.

    vLLM's fused-residual layers return `(hidden_states, residual)` and the stream is their
    sum (what transformers reports as `hidden_states[l + 1]`); other layers return one tensor.
    """
    if isinstance(output, tuple):
        if len(output) >= 2 and isinstance(output[1], torch.Tensor):
            return output[0] + output[1]
        return output[0]
    return output


class HiddenStateCapture:
    """Worker extension: install with `t2_capture_install(endpoint)` via `collective_rpc`.

    All attributes carry a `_t2` prefix because this class is mixed into vLLM's Worker.
    """

    def t2_capture_install(self, endpoint: str) -> dict[str, int]:
        import zmq

        model_runner = self.model_runner  # type: ignore[attr-defined]
        layers = find_decoder_layers(model_runner.get_model())
        if getattr(self, "_t2_handles", None):
            for handle in self._t2_handles:
                handle.remove()
        self._t2_plan: list[tuple[str, int]] = []
        self._t2_rows: list[torch.Tensor] = []
        self._t2_index: torch.Tensor | None = None
        self._t2_num_layers = len(layers)
        # Only one tensor-parallel rank sends: after the all-reduce every rank holds the
        # same residual stream.
        self._t2_sender = int(getattr(self, "rank", 0)) == 0
        if self._t2_sender:
            self._t2_socket = zmq.Context.instance().socket(zmq.PUSH)
            self._t2_socket.setsockopt(zmq.LINGER, 0)
            self._t2_socket.setsockopt(zmq.SNDHWM, 10_000)
            self._t2_socket.connect(endpoint)
        self._t2_handles = [layers[0].register_forward_pre_hook(self._t2_plan_step)]
        for index, layer in enumerate(layers):
            self._t2_handles.append(layer.register_forward_hook(self._t2_make_hook(index)))
        hidden = getattr(model_runner.model_config.hf_config, "hidden_size", 0)
        return {"num_layers": len(layers), "hidden_size": int(hidden), "rank": int(getattr(self, "rank", 0))}

    def _t2_plan_step(self, module: torch.nn.Module, args: Any) -> None:
        """Before layer 0: find tagged requests whose prompt's last token is in this step."""
        self._t2_plan = []
        self._t2_rows = []
        self._t2_index = None
        model_runner = self.model_runner  # type: ignore[attr-defined]
        batch = model_runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return
        starts = model_runner.query_start_loc.np[: num_reqs + 1]
        scheduled = np.diff(starts)
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        prompt = batch.num_prompt_tokens[:num_reqs]
        finishing = np.nonzero((computed < prompt) & (prompt <= computed + scheduled))[0]
        for i in finishing:
            state = model_runner.requests.get(batch.req_ids[i])
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None) or {}
            tag = extra.get(CAPTURE_KEY)
            if tag:
                # Rows are laid out request by request; the last prompt token sits at
                # offset (prompt - computed - 1) of this request's slice. Using the
                # scheduled offsets (not seq_lens) stays right on prefix-cache hits.
                self._t2_plan.append((str(tag), int(starts[i] + prompt[i] - computed[i] - 1)))

    def _t2_make_hook(self, index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not self._t2_plan:
                return
            if self._t2_index is None:  # built once per step, shared by all layers
                self._t2_index = torch.tensor([row for _, row in self._t2_plan], device=_device_of(output))
            self._t2_rows.append(residual_stream(output).index_select(0, self._t2_index).float())
            if index == self._t2_num_layers - 1:
                self._t2_flush()

        return hook

    def _t2_flush(self) -> None:
        plan, rows = self._t2_plan, self._t2_rows
        self._t2_plan, self._t2_rows = [], []
        if not self._t2_sender or len(rows) != self._t2_num_layers:
            return
        import zmq

        stacked = torch.stack(rows, dim=1).cpu().numpy()  # [requests, L, d]
        for (tag, _), states in zip(plan, stacked, strict=True):
            header = json.dumps({"shape": list(states.shape), "dtype": "float32"}).encode()
            try:
                self._t2_socket.send_multipart(
                    [tag.encode(), header, np.ascontiguousarray(states).tobytes()], flags=zmq.NOBLOCK
                )
            except zmq.Again:
                logger.warning("t2serve capture: front end not draining, dropped states for %s", tag)


def _device_of(output: Any) -> torch.device:
    tensor = output[0] if isinstance(output, tuple) else output
    return tensor.device
