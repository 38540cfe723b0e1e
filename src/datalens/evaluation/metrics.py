"""Scores that compare predictions with trained models' actual outputs: the linear
datamodeling score (LDS), correlations per target, seed agreement (the noise ceiling),
the held-out arrays they are computed on, selection of hyperparameters by LDS on
validation models, and retrieval of known proponents (MRR, recall at k).

Conventions that keep a score from flattering: a target whose prediction (or actual
margin) is constant across models has correlation **0**, not NaN, so it counts against
the mean instead of dropping out of it.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from datalens.core.store import SubsetStore


def columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of a[:, j] and b[:, j] for every column j: (m, t), (m, t) -> (t,).
    Columns where either side has zero variance score 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / denom
    return np.where(denom > 0, r, 0.0)


def columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per column (ranks over the rows, ties averaged): (m, t), (m, t) -> (t,)."""
    return columnwise_pearson(stats.rankdata(a, axis=0), stats.rankdata(b, axis=0))


def linear_datamodeling_score(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, per_target: bool = False):
    """LDS (Park et al., 2023, Definition 2.3; docs/methods.md).

    scores: (n_train, t) attribution of each training example to each target;
    masks: (m, n_train) held-out subset masks (0/1); actual: (m, t) margins of models
    trained on those masks (one model each, or an average over repeats: the caller says).
    predicted[j, x] = sum_i masks[j, i] * scores[i, x]; LDS(x) = Spearman over the m
    models of predicted vs actual. A target whose prediction is constant scores 0.
    Returns the mean over all targets, or the (t,) vector with ``per_target``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if masks.shape[1] != scores.shape[0] or actual.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(f"shapes do not fit: scores {scores.shape}, masks {masks.shape}, actual {actual.shape}")
    per = columnwise_spearman(masks @ scores, actual)
    return per if per_target else float(per.mean())


def seed_agreement(margins_a: np.ndarray, margins_b: np.ndarray) -> float:
    """Mean over targets of the correlation, across masks, between two models trained
    on the same mask with different seeds: (m, t), (m, t) -> float. Its square root
    bounds the correlation any predictor can reach against single models."""
    return float(columnwise_pearson(margins_a, margins_b).mean())


def noise_ceiling(margins_a: np.ndarray, margins_b: np.ndarray, repeats: int) -> dict:
    """The seed agreement r of two models per mask (m, t), (m, t), and the ceilings it sets on the
    correlation any function of the mask can reach: sqrt(r) against one model, and against the
    mean of ``repeats`` models sqrt(R r / (1 + (R - 1) r)) (Spearman-Brown: the reliability of an
    average of R equally reliable measurements)."""
    r = max(seed_agreement(margins_a, margins_b), 0.0)
    return {"seed_agreement": seed_agreement(margins_a, margins_b), "single_model_ceiling": r ** 0.5,
            "mean_ceiling": (repeats * r / (1 + (repeats - 1) * r)) ** 0.5 if r > 0 else 0.0}


def heldout_arrays(eval_store: SubsetStore, repeats: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From an evaluation store whose model j trained on mask j // repeats: masks (m, n),
    margins averaged over repeats (m, t), and margins of repeat 0 alone (m, t)."""
    done = eval_store.completed()
    if not done.all():
        raise ValueError(f"evaluation store {eval_store.url} is incomplete ({int(done.sum())}/{len(done)} models); rerun its stage")
    margins = eval_store.read("test_outputs", slice(None))
    masks = eval_store.read("masks", slice(None))[::repeats]
    per_mask = margins.reshape(len(masks), repeats, -1)
    return masks, per_mask.mean(1), per_mask[:, 0]


def evaluate_heldout(weight: np.ndarray, bias: np.ndarray, masks: np.ndarray, actual_mean: np.ndarray,
                     actual_single: np.ndarray) -> dict:
    """Predicted vs actual outputs on held-out models, for any linear predictor
    ``masks @ weight + bias`` (weight (n, t), bias (t,); a datamodel's, or scores with bias 0),
    against outputs averaged over repeats and against single models: pooled Pearson and
    Spearman over all (mask, target) pairs (dominated by differences between targets), the
    mean per-target Pearson across masks (what the predictor adds within a target), and LDS."""
    pred = np.asarray(masks, np.float64) @ np.asarray(weight, np.float64) + np.asarray(bias, np.float64)
    out = {}
    for label, actual in (("mean", actual_mean), ("single", actual_single)):
        out[f"pearson_{label}"] = float(stats.pearsonr(pred.ravel(), actual.ravel())[0])
        out[f"spearman_{label}"] = float(stats.spearmanr(pred.ravel(), actual.ravel())[0])
        out[f"per_target_pearson_{label}"] = float(columnwise_pearson(pred, actual).mean())
        out[f"lds_{label}"] = linear_datamodeling_score(weight, masks, actual)
    return out


def select_by_lds(candidates: dict, masks: np.ndarray, actual: np.ndarray) -> tuple:
    """The key of the candidate scores (n, t) with the best LDS on validation (masks, actual),
    and every candidate's validation LDS."""
    lds = {key: linear_datamodeling_score(s, masks, actual) for key, s in candidates.items()}
    return max(lds, key=lds.get), lds


def retrieval_ranks(scores: np.ndarray) -> np.ndarray:
    """Each training example's rank (1 = first) for each target, (n, t), ordered by descending
    score (n, t); ties go to the lower index, so a method that scores many examples alike does not
    have them ranked in its favour."""
    order = np.argsort(-scores, axis=0, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, len(scores) + 1)[:, None], axis=0)
    return ranks


def retrieval(scores: np.ndarray, relevant: list, k: int = 10) -> dict:
    """How well ``scores`` (n, t) retrieve each target's ``relevant`` training examples (t index
    lists, e.g. the sentences that state a fact): the mean reciprocal rank of the first relevant
    example (MRR) and the mean fraction of relevant examples among the top ``k`` (recall at k),
    over targets, as in fact tracing (Akyurek et al., 2022)."""
    ranks = retrieval_ranks(scores)
    first = np.array([ranks[list(rel), j].min() for j, rel in enumerate(relevant)])
    within = np.array([(ranks[list(rel), j] <= k).mean() for j, rel in enumerate(relevant)])
    return {"mrr": float((1.0 / first).mean()), f"recall_at_{k}": float(within.mean())}
