"""The worker side of the capture, piece by piece: the vLLM internals it patches, the step
planner's row choice, the tap's gather, and the wire to the front end's receiver. (The real
engine runs all of it together in test_capture.py, compiled and eager.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.engine import capture_worker
from server.engine.capture import CAPTURE_KEY, CONFIG_KEY, CaptureReceiver, capture_config


def test_the_vllm_internals_the_capture_patches_are_where_it_expects():
    """An upgrade that moves these breaks here, loudly, rather than capturing nothing."""
    from vllm.utils.torch_utils import direct_register_custom_op  # noqa: F401
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)
    # Importing the worker module patched both runners' load_model and the shared forward.
    assert getattr(CPUModelRunner.__dict__["load_model"], "_t2_patched", False)
    assert getattr(GPUModelRunner.__dict__["load_model"], "_t2_patched", False)
    assert getattr(GPUModelRunner._model_forward, "_t2_patched", False)
    assert "_model_forward" not in CPUModelRunner.__dict__  # the CPU runner uses the shared one
    patched = GPUModelRunner._model_forward
    capture_worker.install_runner_patches()
    assert GPUModelRunner._model_forward is patched  # idempotent: never wrapped twice


def test_the_capture_config_is_part_of_the_compile_cache_hash(model_dir):
    """A graph compiled without the tap must not be replayed with capture on: vLLM keys its
    compile cache on VllmConfig.compute_hash(), which covers additional_config."""
    from vllm.engine.arg_utils import EngineArgs

    def config_hash(additional: dict) -> str:
        args = EngineArgs(model=str(model_dir), max_model_len=512, additional_config=additional)
        return args.create_engine_config().compute_hash()

    plain = config_hash({})
    tapped = config_hash(capture_config(64))
    assert plain != tapped != config_hash(capture_config(8))
    assert tapped == config_hash(capture_config(64))
    assert CONFIG_KEY in capture_config(64)


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[list[tuple[str, int]], np.ndarray]] = []
        self.dropped: list[str] = []

    def send(self, plan, states) -> None:
        self.sent.append((list(plan), states.transpose(0, 1).clone().numpy()))

    def drop(self, tag: str) -> None:
        self.dropped.append(tag)


def fake_runner(requests: list[tuple[str | None, int, int, int]]) -> SimpleNamespace:
    """requests: (tag, prompt tokens, computed tokens, tokens scheduled this step)."""
    scheduled = [r[3] for r in requests]
    ids = [f"r{k}" for k in range(len(requests))]
    return SimpleNamespace(
        input_batch=SimpleNamespace(
            num_reqs=len(requests),
            req_ids=ids,
            num_prompt_tokens=np.array([r[1] for r in requests]),
            num_computed_tokens_cpu=np.array([r[2] for r in requests]),
        ),
        query_start_loc=SimpleNamespace(np=np.concatenate([[0], np.cumsum(scheduled)])),
        requests={
            rid: SimpleNamespace(
                sampling_params=SimpleNamespace(extra_args={CAPTURE_KEY: r[0]} if r[0] else None)
            )
            for rid, r in zip(ids, requests, strict=True)
        },
    )


def test_the_planner_captures_tagged_requests_whose_prefill_ends_in_the_step(monkeypatch):
    runner = fake_runner(
        [
            ("a", 10, 0, 10),  # whole prompt in this step: last token at row 9
            (None, 7, 0, 7),  # finishes its prefill but is not tagged
            ("b", 5, 12, 1),  # decoding
            ("c", 100, 0, 20),  # first chunk of a long prompt: not yet
            ("d", 40, 32, 8),  # prefix-cache hit of 32: last token at offset 7 of its slice
            ("e", 3, 0, 3),  # finishing, but the tap has only two slots
        ]
    )
    tap = capture_worker.ResidualTap(num_layers=2, hidden_size=4, slots=2, device=torch.device("cpu"))
    monkeypatch.setattr(capture_worker, "_TAP", tap)
    planner = capture_worker.StepPlanner(runner, tap)
    planner.sender = sender = FakeSender()

    planner.before_forward()
    assert planner.plan == [("a", 9), ("d", 10 + 7 + 1 + 20 + 7)]
    assert sender.dropped == ["e"]
    # The forward: each layer's op gathers the planned rows of hidden + residual.
    tokens = int(runner.query_start_loc.np[-1])
    layers = [(torch.randn(tokens, 4), torch.randn(tokens, 4)) for _ in range(2)]
    for index, (hidden, residual) in enumerate(layers):
        capture_worker.residual_tap(hidden, residual, index)
    planner.after_forward()

    [(plan, states)] = sender.sent
    assert [tag for tag, _ in plan] == ["a", "d"] and states.shape == (2, 2, 4)
    for k, (_, row) in enumerate(plan):
        for layer, (hidden, residual) in enumerate(layers):
            np.testing.assert_allclose(states[k, layer], (hidden[row] + residual[row]).numpy())
    assert tap.rows.tolist() == [0, 0]  # reset for the next step
    # The next step decodes every request: nothing to capture, nothing sent.
    runner.input_batch.num_computed_tokens_cpu = runner.input_batch.num_prompt_tokens + 1
    runner.query_start_loc.np = np.arange(len(runner.requests) + 1)
    planner.before_forward()
    assert planner.plan == []
    planner.after_forward()
    assert len(sender.sent) == 1


def test_the_op_survives_torch_compile_and_writes_the_tap():
    """The hook + custom op path on a toy model under torch.compile (the graph must keep the
    op although nothing reads its result), matching eager."""
    capture_worker.register_op()

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x, residual):
            residual = x if residual is None else x + residual
            return self.linear(residual), residual

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            residual = None
            for layer in self.layers:
                x, residual = layer(x, residual)
            return x + residual

    model = Model()
    for index, layer in enumerate(model.layers):
        layer.register_forward_hook(capture_worker._layer_hook(index))
    tap = capture_worker.ResidualTap(num_layers=2, hidden_size=4, slots=2, device=torch.device("cpu"))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 4)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(capture_worker, "_TAP", tap)
        tap.rows.copy_(torch.tensor([4, 1]))
        model(x)
        eager = tap.states.clone()
        tap.states.zero_()
        compiled(x)
        torch.testing.assert_close(tap.states, eager)
        assert tap.states.abs().sum() > 0
        tap.rows.copy_(torch.tensor([2, 0]))  # new rows, same graph: read at run time
        compiled(x)
        assert not torch.equal(tap.states, eager)


async def test_states_and_drops_reach_the_receiver_over_the_socket():
    receiver = CaptureReceiver()
    receiver.start()
    try:
        sender = capture_worker.Sender(receiver.endpoint, first_layer=0, total_layers=3)
        kept, dropped = receiver.expect("kept"), receiver.expect("dropped")
        states = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(3, 2, 4)  # [L, requests, d]
        sender.send([("kept", 0), ("other", 5)], states)
        sender.drop("dropped")
        got = await asyncio.wait_for(kept, 30)
        np.testing.assert_array_equal(got, states[:, 0].numpy())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(dropped, 30)
        assert receiver.messages == 3
        assert receiver.dropped == {"slots": 1}
    finally:
        await receiver.close()


def dropped_total(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("t2serve_capture_dropped_total", {"reason": reason}) or 0.0


async def test_pipeline_stages_parts_are_assembled_in_layer_order_over_tcp():
    """Two stages (layers 0-2 and 3-4 of 5) push their parts over the TCP channel that
    workers on other hosts use; the later stage's part may come first."""
    receiver = CaptureReceiver("127.0.0.1:0")
    receiver.start()
    try:
        assert receiver.endpoint.startswith("tcp://127.0.0.1:") and not receiver.endpoint.endswith(":0")
        first = capture_worker.Sender(receiver.endpoint, first_layer=0, total_layers=5)
        last = capture_worker.Sender(receiver.endpoint, first_layer=3, total_layers=5)
        future = receiver.expect("x")
        full = torch.randn(5, 1, 4)  # [L, requests, d]
        last.send([("x", 0)], full[3:])
        first.send([("x", 0)], full[:3])
        np.testing.assert_array_equal(await asyncio.wait_for(future, 30), full[:, 0].numpy())
        assert receiver.dropped == {}
    finally:
        await receiver.close()


async def test_a_stage_part_that_never_comes_falls_back_at_once_and_is_counted():
    """The last stage's part is in and the socket holds nothing more: the first stage's part
    was lost (it would have been pushed before the last stage ran), so the waiter is
    cancelled without waiting for a timeout or for any other message."""
    receiver = CaptureReceiver()
    receiver.start()
    try:
        last = capture_worker.Sender(receiver.endpoint, first_layer=3, total_layers=5)
        future = receiver.expect("lost")
        before = dropped_total("part_missing")
        last.send([("lost", 0)], torch.randn(2, 1, 4))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(future, 30)  # cancelled: the dropped capture, not a timeout
        assert receiver.dropped == {"part_missing": 1}
        assert dropped_total("part_missing") == before + 1
        assert "lost" not in receiver._parts  # nothing kept for a capture given up on
    finally:
        await receiver.close()


async def test_a_first_stage_part_alone_waits_for_the_rest():
    """Only the last stage's part ends a step's capture: an earlier stage's part alone keeps
    the request waiting for the later stages (they run after it)."""
    receiver = CaptureReceiver()  # not started: the message is handed in directly
    try:
        future = receiver.expect("early")
        header = b'{"shape": [3, 4], "dtype": "float32", "first_layer": 0, "total_layers": 5}'
        receiver.receive([b"early", header, np.zeros((3, 4), np.float32).tobytes()])
        assert not future.done() and not receiver._last_stage_in
    finally:
        await receiver.close()


def test_owned_layers_are_the_stage_s_run_of_real_layers():
    from vllm.model_executor.models.utils import PPMissingLayer

    stage = torch.nn.ModuleList(
        [PPMissingLayer(), PPMissingLayer(), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    )
    assert capture_worker.owned_layers(stage) == (2, 4)
    assert capture_worker.owned_layers(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3)) == (0, 3)
    with pytest.raises(RuntimeError, match="not one run"):
        capture_worker.owned_layers(
            torch.nn.ModuleList([torch.nn.Linear(2, 2), PPMissingLayer(), torch.nn.Linear(2, 2)])
        )
