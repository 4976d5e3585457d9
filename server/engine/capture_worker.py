"""In-engine capture of the last prompt token's residual stream at every decoder layer.

`HiddenStateCapture` is a vLLM *worker extension* (engine arg `worker_extension_cls`): vLLM
imports this module in each worker before the model is built, and its methods are mixed
into the worker. Importing it patches the model runner (`install_runner_patches`) so that:

- right after the model is loaded, and so *before* torch.compile traces it and CUDA graphs
  are captured, each decoder layer gets a forward hook that calls the custom op
  `torch.ops.t2serve.residual_tap(hidden, residual, layer)`. Dynamo traces the hook into
  the graph; the op is opaque to the compiler and does fixed-shape work only: it gathers
  `slots` rows of the layer's residual stream (`hidden + residual`) into a persistent
  `[layers, slots, d]` float32 buffer. In eager mode the same hook and op run as plain
  Python, so there is one capture mechanism for every mode.
- around each step's forward (`_model_forward`), outside any graph, the rows of the tagged
  requests whose prompt's last token is in this step are written into the persistent row
  index; after the forward those requests' rows are pushed to the front end over a ZMQ
  socket. Under CUDA graphs the copy to the host is asynchronous (pinned memory + an
  event) and a sender thread waits for it, so the step itself never synchronises.

The patches act only when the engine is started with `additional_config["t2_capture"]`
(`capture_config`), and that dict is part of vLLM's compile-cache hash: a graph compiled
without the tap is never replayed with capture on, or the other way round.

Requests opt in through `SamplingParams.extra_args[CAPTURE_KEY]` (server.sampling). The
capture rides on the request's own prefill, so the KV blocks it produces are the ones the
other samples later read from the prefix cache; there is no second model copy and no extra
forward pass. vLLM caps a prefix-cache hit at `prompt - 1` tokens, so the last prompt token
is always computed and a fully cached prompt still yields its states.

Wire format and the opt-in keys: server/engine/capture.py.

Parallelism: under pipeline parallelism each stage taps only the layers it computes (the
others are vLLM's `PPMissingLayer` placeholders) and sends that part with its first layer;
the front end assembles `[L, d]` (server/engine/capture.py). Under tensor parallelism the
first tensor-parallel rank of each stage sends (every rank holds the same reduced residual
stream). Each data-parallel engine core has its own workers; all push to the one receiver,
which matches captures by tag whichever core ran the request.

Limits: the V1 model runner is needed (the V2 runner has no `_model_forward`/`input_batch`;
server/engine/engine.py refuses VLLM_USE_V2_MODEL_RUNNER=1).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

import numpy as np
import torch

from server.engine.capture import CAPTURE_KEY, CONFIG_KEY

logger = logging.getLogger(__name__)


def owned_layers(layers: torch.nn.ModuleList) -> tuple[int, int]:
    """`(first, end)`: the decoder layers this pipeline stage computes; vLLM fills the rest of
    the stack with `PPMissingLayer` placeholders (one stage: all of it)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    owned = [i for i, layer in enumerate(layers) if not isinstance(layer, PPMissingLayer)]
    if not owned or owned != list(range(owned[0], owned[-1] + 1)):
        raise RuntimeError(f"t2serve capture: this stage's layers are not one run: {owned}")
    return owned[0], owned[-1] + 1


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


class ResidualTap:
    """Persistent, fixed-shape capture buffers of one worker: `num_layers` layers from
    `first_layer` (its pipeline stage's) of a model of `total_layers`. Their addresses never
    change after the model is loaded, which is what lets a captured CUDA graph write into them."""

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        slots: int,
        device: torch.device,
        first_layer: int = 0,
        total_layers: int | None = None,
    ):
        self.num_layers = num_layers
        self.first_layer = first_layer
        self.total_layers = total_layers if total_layers is not None else num_layers
        self.hidden_size = hidden_size
        self.slots = slots
        self.rows = torch.zeros(slots, dtype=torch.long, device=device)
        self.states = torch.zeros(num_layers, slots, hidden_size, dtype=torch.float32, device=device)

    def write(self, hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
        # Unused slots point at row 0, which every forward has: no bounds to check in the graph.
        stream = hidden.index_select(0, self.rows)
        if residual is not None:
            # vLLM's fused-residual layers return (hidden, residual); the stream is their sum
            # (what transformers reports as hidden_states[layer + 1]).
            stream = stream + residual.index_select(0, self.rows)
        self.states[layer].copy_(stream)


_TAP: ResidualTap | None = None  # this worker's tap; set once, at model load


def residual_tap(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    if _TAP is not None:
        _TAP.write(hidden, residual, layer)


def _residual_tap_fake(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    return None


def register_op() -> None:
    """Define `torch.ops.t2serve.residual_tap` once per process.

    The schema says the op mutates `hidden` although it only reads it: an op with no outputs
    and no mutated arguments is dead code to the compiler and would be dropped from the graph.
    (vLLM's own side-effect ops use the same device.)"""
    if hasattr(torch.ops.t2serve, "residual_tap"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name="residual_tap",
        op_func=residual_tap,
        mutates_args=["hidden"],
        fake_impl=_residual_tap_fake,
        target_lib=_LIBRARY,
    )


_LIBRARY = torch.library.Library("t2serve", "FRAGMENT")


def _layer_hook(layer: int):
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, tuple):
            residual = output[1] if len(output) >= 2 and isinstance(output[1], torch.Tensor) else None
            torch.ops.t2serve.residual_tap(output[0], residual, layer)
        else:
            torch.ops.t2serve.residual_tap(output, None, layer)

    return hook


def install_tap(runner: Any) -> None:
    """After the model is loaded (before any forward): buffers plus one hook per layer."""
    global _TAP
    config = (runner.vllm_config.additional_config or {}).get(CONFIG_KEY)
    if not config:
        return
    register_op()
    layers = find_decoder_layers(runner.get_model())
    first, end = owned_layers(layers)
    hidden = int(runner.model_config.hf_config.hidden_size)
    _TAP = ResidualTap(
        end - first, hidden, int(config["slots"]), torch.device(runner.device), first, len(layers)
    )
    for index in range(first, end):
        # The op's layer is the tap's own row: this stage's buffer holds its layers only.
        layers[index].register_forward_hook(_layer_hook(index - first))
    runner._t2_planner = StepPlanner(runner, _TAP)
    logger.info(
        "t2serve capture: tap on layers %d..%d of %d, %d slots per step",
        first,
        end - 1,
        len(layers),
        _TAP.slots,
    )


class StepPlanner:
    """Sets the tap's rows before a step's forward and ships the captured rows after it."""

    def __init__(self, runner: Any, tap: ResidualTap):
        self.runner = runner
        self.tap = tap
        self.sender: Sender | None = None  # connected by t2_capture_install
        self.plan: list[tuple[str, int]] = []

    def before_forward(self) -> None:
        self.plan = []
        if self.sender is None:
            return
        runner = self.runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return
        starts = runner.query_start_loc.np[: num_reqs + 1]
        scheduled = np.diff(starts)
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        prompt = batch.num_prompt_tokens[:num_reqs]
        finishing = np.nonzero((computed < prompt) & (prompt <= computed + scheduled))[0]
        dropped: list[str] = []
        for i in finishing:
            state = runner.requests.get(batch.req_ids[i])
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            tag = extra.get(CAPTURE_KEY)
            if not tag:
                continue
            if len(self.plan) == self.tap.slots:
                dropped.append(str(tag))
                continue
            # Rows are laid out request by request; the last prompt token sits at offset
            # (prompt - computed - 1) of this request's slice. Using the scheduled offsets
            # (not seq_lens) stays right on prefix-cache hits.
            self.plan.append((str(tag), int(starts[i] + prompt[i] - computed[i] - 1)))
        for tag in dropped:
            logger.warning(
                "t2serve capture: more than %d captures in one step, dropped %s", self.tap.slots, tag
            )
            self.sender.drop(tag)
        if self.plan:
            rows = torch.tensor([row for _, row in self.plan], dtype=torch.long)
            self.tap.rows[: len(rows)].copy_(rows, non_blocking=True)

    def after_forward(self) -> None:
        plan, self.plan = self.plan, []
        if not plan or self.sender is None:
            return
        self.tap.rows.zero_()  # leave every slot pointing at row 0 for the next forward
        self.sender.send(plan, self.tap.states[:, : len(plan)])


class Sender:
    """Pushes captured states (this stage's layers from `first_layer`, of `total_layers`) to
    the front end. On CUDA the device-to-host copy is started asynchronously and a thread
    waits for it; elsewhere the rows are sent inline, before the stage hands its activations
    on (the receiver's missing-part rule relies on that order)."""

    def __init__(self, endpoint: str, first_layer: int, total_layers: int):
        import zmq

        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 10_000)
        self._socket.connect(endpoint)
        self._first_layer = first_layer
        self._total_layers = total_layers
        self._queue: queue.SimpleQueue[tuple[list[tuple[str, int]], torch.Tensor, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # zmq sockets are not thread-safe

    def send(self, plan: list[tuple[str, int]], states: torch.Tensor) -> None:
        """`states`: `[L, requests, d]` rows of the plan's requests, in plan order."""
        if states.device.type != "cuda":
            self._push(plan, states.transpose(0, 1).numpy())
            return
        host = torch.empty(
            states.shape[1], states.shape[0], states.shape[2], dtype=states.dtype, pin_memory=True
        )
        host.copy_(states.transpose(0, 1), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="t2serve-capture-sender", daemon=True)
            self._thread.start()
        self._queue.put((plan, host, done))

    def drop(self, tag: str) -> None:
        self._send_parts([tag.encode(), json.dumps({"dropped": True}).encode(), b""])

    def _drain(self) -> None:
        while True:
            plan, host, done = self._queue.get()
            done.synchronize()
            self._push(plan, host.numpy())

    def _push(self, plan: list[tuple[str, int]], states: np.ndarray) -> None:
        for (tag, _), rows in zip(plan, states, strict=True):
            header = json.dumps(
                {
                    "shape": list(rows.shape),
                    "dtype": "float32",
                    "first_layer": self._first_layer,
                    "total_layers": self._total_layers,
                }
            ).encode()
            self._send_parts([tag.encode(), header, np.ascontiguousarray(rows).tobytes()])

    def _send_parts(self, parts: list[bytes]) -> None:
        import zmq

        try:
            with self._lock:
                self._socket.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("t2serve capture: front end not draining, dropped a message for %s", parts[0])


def install_runner_patches() -> None:
    """Wrap the V1 model runners' `load_model` (to install the tap before any forward) and
    `_model_forward` (to plan and ship each step's captures). Idempotent; a runner whose
    engine was started without `capture_config` is left as vLLM built it."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for cls in (GPUModelRunner, CPUModelRunner):
        load = cls.__dict__.get("load_model")
        if load is None or getattr(load, "_t2_patched", False):
            continue

        def load_model(self: Any, *args: Any, _load: Any = load, **kwargs: Any) -> None:
            _load(self, *args, **kwargs)
            install_tap(self)

        load_model._t2_patched = True  # type: ignore[attr-defined]
        cls.load_model = load_model  # type: ignore[method-assign]

    forward = GPUModelRunner._model_forward
    if not getattr(forward, "_t2_patched", False):

        def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            planner: StepPlanner | None = getattr(self, "_t2_planner", None)
            if planner is None:
                return forward(self, *args, **kwargs)
            planner.before_forward()
            try:
                return forward(self, *args, **kwargs)
            finally:
                planner.after_forward()

        _model_forward._t2_patched = True  # type: ignore[attr-defined]
        GPUModelRunner._model_forward = _model_forward  # type: ignore[method-assign]


class HiddenStateCapture:
    """Worker extension: `t2_capture_install(endpoint)` via `collective_rpc` connects the
    tap (installed at model load) to the front end's socket.

    All attributes carry a `_t2` prefix because this class is mixed into vLLM's Worker."""

    def t2_capture_install(self, endpoint: str) -> dict[str, Any]:
        from vllm.distributed import get_tensor_model_parallel_rank

        model_runner = self.model_runner  # type: ignore[attr-defined]
        planner: StepPlanner | None = getattr(model_runner, "_t2_planner", None)
        if planner is None:
            raise RuntimeError("t2serve capture: the engine was started without the capture tap")
        tap = planner.tap
        # One tensor-parallel rank per pipeline stage sends: after the all-reduce every rank
        # of a stage holds the same residual stream.
        sends = get_tensor_model_parallel_rank() == 0
        if sends and planner.sender is None:
            planner.sender = Sender(endpoint, tap.first_layer, tap.total_layers)
        return {
            "num_layers": tap.total_layers,
            "hidden_size": tap.hidden_size,
            "layers": [tap.first_layer, tap.first_layer + tap.num_layers],
            "sends": sends,
            "rank": int(getattr(self, "rank", 0)),
        }


install_runner_patches()
