"""`t2serve train --fit-calibration FILE`: the answer posterior (estimator.offline.labels.
answer_posterior) fitted on the gold-labelled pools of label folders or traffic joined to gold.

Only the train and validation splits are used, never test: a head trained with posterior
targets is then scored on a test split the calibration never saw, whichever folders both
came from (a question's split is a hash of it, the same in every folder).
"""

from __future__ import annotations

from pathlib import Path

from estimator.offline.labels.answer_posterior import AnswerPosterior, fit_posterior
from estimator.offline.labels.gold_free import has_gold
from estimator.offline.labels.traffic import load_store

SPLITS = ("train", "validation")


def fit_calibration(folders: list[Path]) -> AnswerPosterior:
    records, _, _ = load_store(folders)
    gold = [r for r in records if has_gold(r) and r["split"] in SPLITS]
    if not gold:
        raise ValueError("no gold-labelled train or validation pools to calibrate on")
    posterior = fit_posterior(gold)
    posterior.fitted["folders"] = [str(f) for f in folders]
    posterior.fitted["splits"] = list(SPLITS)
    return posterior


def report(posterior: AnswerPosterior, out: Path) -> str:
    fitted = posterior.fitted
    weights = ", ".join(f"{n} {w:+.2f}" for n, w in zip(posterior.features, posterior.weights, strict=True))
    return "\n".join(
        [
            f"answer posterior on {fitted['pools']} pools ({fitted['answers']} distinct answers, "
            f"{fitted['right_share']:.1%} right) of the {' and '.join(SPLITS)} splits",
            f"log loss {fitted['log_loss']:.4f}  Brier {fitted['brier']:.4f}  top answer: predicted right "
            f"{fitted['top_answer_predicted']:.3f}, right {fitted['top_answer_right']:.3f}",
            f"weights (standardised): {weights}; bias {posterior.bias:+.2f}",
            f"wrote {out}",
        ]
    )
