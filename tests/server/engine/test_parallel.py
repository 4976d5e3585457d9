"""The parallel shapes' pure rules: what start-up refuses, the core split per rank, the
check that the stages' capture parts tile the layers. (The real PP engine: test_capture_pp.py.)"""

from __future__ import annotations

import pytest

from server.config import EngineSettings
from server.engine.parallel import check_stage_parts, cpu_threads_bind, refuse_unsupported


def settings(**fields) -> EngineSettings:
    return EngineSettings(model="/m", served_model_name="m", **fields)


@pytest.mark.parametrize(
    ("cores", "ranks", "bind"),
    [(2, 1, "0-1"), (2, 2, "0|1"), (16, 4, "0-3|4-7|8-11|12-15"), (6, 4, "0|1-2|3|4-5"), (2, 3, "0|1|0")],
)
def test_each_rank_gets_its_own_cores(cores, ranks, bind):
    assert cpu_threads_bind(cores, ranks) == bind


def test_the_stages_parts_must_tile_the_layers():
    stage = {"num_layers": 30, "hidden_size": 576}
    two_stages = [
        {**stage, "layers": [15, 30], "sends": True},
        {**stage, "layers": [0, 15], "sends": True},
        {**stage, "layers": [0, 15], "sends": False},  # a second tensor-parallel rank
    ]
    assert check_stage_parts(two_stages) == (30, 576)
    with pytest.raises(RuntimeError, match="do not tile"):
        check_stage_parts([{**stage, "layers": [0, 15], "sends": True}])
    with pytest.raises(RuntimeError, match="do not tile"):
        check_stage_parts([{**stage, "layers": [0, 15], "sends": True}] * 2)


def test_start_up_refuses_the_v2_model_runner_with_capture(monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER"):
        refuse_unsupported(settings(), cpu=False)
    refuse_unsupported(settings(capture=False), cpu=False)  # plain vLLM may use it
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    refuse_unsupported(settings(), cpu=False)


def test_start_up_refuses_eager_pipeline_parallel_on_cpu(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    with pytest.raises(ValueError, match="--enforce-eager"):
        refuse_unsupported(settings(pipeline_parallel_size=2, enforce_eager=True), cpu=True)
    refuse_unsupported(settings(pipeline_parallel_size=2), cpu=True)  # compiled: starts
    refuse_unsupported(settings(pipeline_parallel_size=2, enforce_eager=True), cpu=False)
