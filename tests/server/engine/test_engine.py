"""The start-up self-test's verdicts on the states a fake engine hands it (the real engine
is tested everywhere else)."""

from __future__ import annotations

import numpy as np
import pytest

from server.engine import engine


class _FakeLLM:
    """Just enough of AsyncLLM for Engine.self_test: a request that ends at once, with the
    states the test decides (none, or these) handed to the capture channel."""

    def __init__(self, receiver, states):
        self.receiver, self.states, self.errored = receiver, states, False

    def get_tokenizer(self):
        return type("Tokenizer", (), {"encode": staticmethod(lambda text: [1, 2, 3])})()

    async def generate(self, prompt, params, request_id):
        from server.engine.capture import CAPTURE_KEY

        tag = params.extra_args[CAPTURE_KEY]
        if self.states is not None:
            self.receiver.futures[tag].set_result(self.states)
        yield object()


class _FakeReceiver:
    def __init__(self):
        self.futures = {}

    def expect(self, tag):
        import asyncio

        self.futures[tag] = asyncio.get_running_loop().create_future()
        return self.futures[tag]

    def forget(self, tag):
        self.futures.pop(tag, None)


def _engine_with(states):
    from server.config import EngineSettings

    info = engine.ModelInfo(
        "m", "/m", num_layers=3, hidden_size=4, max_model_len=64, device="cpu", fingerprint="f"
    )
    settings = EngineSettings(model="/m", served_model_name="m", capture_timeout_s=0.05, enforce_eager=False)
    receiver = _FakeReceiver()
    return engine.Engine(_FakeLLM(receiver, states), receiver, info, settings)


@pytest.mark.parametrize(
    ("states", "message"),
    [
        (None, "no states arrived"),  # compiled graphs skip the hooks: nothing is pushed
        (np.zeros((2, 4), np.float32), "expected (3, 4)"),
        (np.full((3, 4), np.nan, np.float32), "finite: False"),
    ],
)
async def test_self_test_refuses_missing_or_malformed_states(states, message):
    with pytest.raises(engine.CaptureSelfTestError, match="model 'm' in compiled mode") as err:
        await _engine_with(states).self_test()
    assert message in str(err.value)


async def test_self_test_passes_on_well_formed_states():
    report = await _engine_with(np.ones((3, 4), np.float32)).self_test()
    assert report == {"model": "m", "mode": "compiled", "dtype": "auto", "shape": [3, 4]}
