"""estimator.offline.training.margin_fit: the head's own T2 margin, chosen on validation (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.offline.training.margin_fit import MARGIN_GRID, at_margin_multiples, fit_margin

N_MAX = 16


def step_curves(needed: np.ndarray) -> np.ndarray:
    """A_x(N) = 1 once N reaches the samples question x needs, else 0."""
    return (np.arange(1, N_MAX + 1)[None, :] >= needed[:, None]).astype(float)


def test_the_smallest_margin_that_reaches_fixed_n_max():
    needed = np.arange(2, 17, 2)  # 2, 4, ..., 16 samples
    accuracy = step_curves(needed)
    halved = needed / (2 * N_MAX)  # a head that predicts half of what each question needs
    fitted = fit_margin(accuracy, halved, tolerance=0.0)
    assert fitted["margin"] == 2.0 and fitted["met"]
    assert fitted["accuracy"] == fitted["fixed_accuracy"] == 1.0
    # Every smaller margin of the grid falls short of fixed N_max; the curve says so.
    below = [p for p in fitted["curve"] if p["margin"] < 2.0]
    assert below and all(p["accuracy"] < 1.0 for p in below)
    assert [p["margin"] for p in fitted["curve"]] == list(MARGIN_GRID)
    # An exact head needs no margin; a looser tolerance buys a smaller one.
    assert fit_margin(accuracy, needed / N_MAX, tolerance=0.0)["margin"] == 1.0
    assert fit_margin(accuracy, halved, tolerance=0.5)["margin"] < 2.0


def test_the_gate_multiple_counts_and_an_unreachable_line_takes_the_largest_margin():
    needed = np.arange(2, 17, 2)
    accuracy = step_curves(needed)
    halved = needed / (2 * N_MAX)
    # The gate already doubles every question's margin: x1 is enough.
    assert fit_margin(accuracy, halved, scales=np.full(len(needed), 2.0), tolerance=0.0)["margin"] == 1.0
    # A head that predicts one sample for everything never reaches fixed N_max.
    fitted = fit_margin(accuracy, np.zeros(len(needed)), tolerance=0.0)
    assert not fitted["met"] and fitted["margin"] == MARGIN_GRID[-1]
    assert fitted["samples"] == pytest.approx(1.0)


def test_margin_multiples_are_scored_against_the_best_fixed_n_of_as_many_samples():
    # Question 0 needs 2 samples, question 1 is right at 1 sample and wrong from 2 on (its
    # vote turns): the fixed-N curve peaks at N = 2 (0.5 + 0 vs 0 + 1 at N = 1: equal) ...
    accuracy = np.vstack([step_curves(np.array([2]))[0], np.r_[1.0, np.zeros(N_MAX - 1)]])
    fixed = accuracy.mean(axis=0)
    assert fixed[0] == fixed[1] == 0.5
    # ... a head that gives question 0 its 2 samples and question 1 one gets both right.
    predictions = np.array([2 / N_MAX, 1 / N_MAX])
    exact, doubled = at_margin_multiples(accuracy, predictions, 1.0, multiples=(1.0, 2.0))
    assert (exact["accuracy"], exact["samples"], exact["margin"]) == (1.0, 1.5, 1.0)
    assert exact["above_fixed_curve"] == pytest.approx(0.5)
    # At margin 2: 4 and 2 samples, question 1 lost; the best fixed N of <= 3 samples is 0.5.
    assert (doubled["accuracy"], doubled["samples"]) == (0.5, 3.0)
    assert doubled["above_fixed_curve"] == pytest.approx(0.0)
