"""The served stopping table (estimator/learned_stopping.py): backward induction on a
hand-made table (fitting it is offline: tests/estimator/offline/training/test_stopping_fit.py)."""

from __future__ import annotations

import numpy as np

from estimator.learned_stopping import StoppingTable


def test_backward_induction_on_a_hand_made_table():
    # From (1,1,0), right half the time: the next sample leads to a state right 90% of the
    # time or one right 50% of the time, equally often. Going on is worth 0.7 - cost.
    table = StoppingTable(
        n_max=2,
        bandwidth=1.0,
        grid=np.array([1.0]),
        states=[(1, 1, 0), (2, 2, 0), (2, 1, 1)],
        visits=np.array([[10.0, 5.0, 5.0]]),
        correct=np.array([[5.0, 4.5, 2.5]]),
        edges=np.array([[0, 1], [0, 2]]),
        moves=np.array([[5.0, 5.0]]),
    )
    assert not table.should_stop(1.0, (1, 1, 0), cost=0.15)
    assert table.should_stop(1.0, (1, 1, 0), cost=0.25)
    assert table.should_stop(1.0, (2, 2, 0), cost=0.0)  # k = N_max: nothing left to sample
    assert table.should_stop(1.0, (3, 2, 1), cost=0.0)  # a state it never saw: stop
