"""Scores that compare predictions with trained models' actual outputs."""
from __future__ import annotations

import numpy as np
from scipy import stats


def columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of a[:, j] and b[:, j] for every column j: (m, t), (m, t) -> (t,).
    Columns with zero variance give NaN."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per column (ranks with ties averaged): (m, t), (m, t) -> (t,)."""
    return columnwise_pearson(stats.rankdata(a, axis=0), stats.rankdata(b, axis=0))


def linear_datamodeling_score(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, per_target: bool = False):
    """LDS (METHODS.md section 3).

    scores: (n_train, t) attribution of each training example to each target;
    masks: (m, n_train) held-out subset masks (0/1); actual: (m, t) margins of models
    trained on those masks (one model each, or an average over repeats: the caller says).
    predicted[j, x] = sum_i masks[j, i] * scores[i, x]; LDS(x) = Spearman over j of
    predicted vs actual. Returns the mean over targets (ignoring targets whose
    prediction is constant), or the (t,) vector with ``per_target``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=np.float64)
    if masks.shape[1] != scores.shape[0] or actual.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(f"shapes do not fit: scores {scores.shape}, masks {masks.shape}, actual {actual.shape}")
    per = columnwise_spearman(masks @ scores, np.asarray(actual, dtype=np.float64))
    return per if per_target else float(np.nanmean(per))


def seed_agreement(margins_a: np.ndarray, margins_b: np.ndarray) -> float:
    """Mean over targets of the correlation, across masks, between two models trained
    on the same mask with different seeds: (m, t), (m, t) -> float. Its square root
    bounds the correlation any predictor can reach against single models."""
    return float(np.nanmean(columnwise_pearson(margins_a, margins_b)))
