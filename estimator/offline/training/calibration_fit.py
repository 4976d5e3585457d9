"""`t2serve train --fit-calibration FILE`: the answer posterior (estimator.offline.labels.
answer_posterior) fitted on the gold-labelled pools of label folders or traffic joined to gold.

Only the train and validation splits are used, never test: a head trained with posterior
targets is then scored on a test split the calibration never saw, whichever folders both
came from (a question's split is a hash of it, the same in every folder).

With `states` (the default, `--calibration-states auto`) it also tries the states part
(estimator.offline.labels.leader_states) and keeps it where it beats the pool features alone
in cross-validation. Its gold must come from the traffic's own source: what states say is
specific to the source (a head trained on one sits on the fixed-N curve on another).
"""

from __future__ import annotations

from pathlib import Path

from estimator.offline.labels.answer_posterior import AnswerPosterior, fit_posterior
from estimator.offline.labels.gold_free import has_gold
from estimator.offline.labels.leader_states import FOLDS
from estimator.offline.labels.traffic import load_store

SPLITS = ("train", "validation")


def fit_calibration(folders: list[Path], *, states: bool = True) -> AnswerPosterior:
    records, all_states, header = load_store(folders)
    keep = [i for i, r in enumerate(records) if has_gold(r) and r["split"] in SPLITS]
    if not keep:
        raise ValueError("no gold-labelled train or validation pools to calibrate on")
    posterior = fit_posterior([records[i] for i in keep], states=all_states[keep] if states else None)
    posterior.fitted["folders"] = [str(f) for f in folders]
    posterior.fitted["splits"] = list(SPLITS)
    posterior.fitted["model"] = header["model"]
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
            *([states_line(fitted["states"])] if "states" in fitted else []),
            f"wrote {out}",
        ]
    )


def states_line(report: dict) -> str:
    """The states part's cross-validation, against the pool features alone."""
    if "reason" in report:
        return f"states part not fitted: {report['reason']}"
    pool, best = report["pool_only"], report["with_states"]
    gain = report["gain"]
    verdict = (
        f"kept (gain {gain['log_loss']:.4f} ± {gain['standard_error']:.4f})"
        if report["kept"]
        else f"not kept: gain {gain['log_loss']:.4f} within two standard errors ({gain['standard_error']:.4f})"
    )
    return (
        f"leader right, {FOLDS}-fold cross-validated on {report['pools']} pools: pool features log loss "
        f"{pool['log_loss']:.4f} (AUC {pool['auc']:.3f}); with layer {report['layer']}'s states "
        f"{best['log_loss']:.4f} (AUC {best['auc']:.3f}): {verdict}"
    )
