"""The holdout report (benchmarks/holdout_policies.py) on synthetic pools: pure logic."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.holdout_policies import holdout_report
from estimator.offline.training.stopping_fit import fit_stopping
from tests.estimator.offline.evaluation.test_comparison import ConstantHead, synthetic_records


def test_holdout_report_fronts_and_chosen_knobs():
    head = ConstantHead(0.25)
    head.stopping = fit_stopping(
        synthetic_records(3, count=20), np.full(20, 0.25), orderings=20, progress=False
    )
    holdout = synthetic_records(4, count=10)
    chosen = {
        "t2": {"knobs": "margin=1"},
        "t2+learned": {"knobs": "cost=0.009,margin=0.25"},
        "gone": {"knobs": "x"},
    }
    result = holdout_report(head, holdout, np.zeros((10, 1, 1)), chosen, orderings=10)
    assert result["questions"] == 10
    assert result["target"] == pytest.approx(result["fixed_n_max"]["accuracy"] - 0.01)
    assert set(result["selected"]) == {"t2", "t2+learned"}  # a policy the grid lacks is skipped
    assert result["selected"]["t2"]["launched"] == 4.0  # round(16 x 0.25 x 1)
    front = result["front_at_target"]
    assert {"fixed", "t2", "esc", "t2+learned", "oracle"} <= set(front)
    # The fixed-N front reaches the target at no more than N_max samples, the oracle at no more
    # than any fixed N.
    assert front["oracle"] <= front["fixed"] <= 16
    # On these pools the learned rule's knobs never reach the target: no gap figure, not a crash.
    assert front["t2+learned"] is None and result["gap_closed_front"] is None
