"""Datamodel applications that retrain: counterfactual removals and brittleness
(data support): Ilyas et al. (2022), sections 3-4; docs/methods.md.

Every function takes a ``retrain(masks) -> margins`` callable: masks (m, n) bool ->
margins (m, T), averaged over however many models per mask the caller trains. The
pipeline passes :func:`datalens.training.runs.train_on_masks`; tests pass brute-force
retrains of small problems.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats

Retrain = Callable[[np.ndarray], np.ndarray]
KINDS = ("top_positive", "top_negative", "random")


def removal_set(weight: np.ndarray, k: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of k training examples to remove for one target (weight: (n,))."""
    if kind == "top_positive":
        return np.argsort(-weight, kind="stable")[:k]
    if kind == "top_negative":
        return np.argsort(weight, kind="stable")[:k]
    if kind == "random":
        return rng.choice(len(weight), size=k, replace=False)
    raise ValueError(f"kind={kind!r} is unknown; allowed values: {', '.join(KINDS)}")


def counterfactual_removals(weight: np.ndarray, targets: np.ndarray, ks: list[int], retrain: Retrain,
                            seed: int = 0) -> dict[str, np.ndarray]:
    """For each target, k and kind, remove the set from the full training set, retrain,
    and compare with the datamodel's predicted change ``-sum(weight[removed, target])``.

    weight: (n, T). Returns flat arrays ``target``, ``k``, ``kind``, ``predicted``, ``actual``
    (actual = retrained margin minus the full-data margin).
    """
    n = weight.shape[0]
    rng = np.random.default_rng([seed, 17])
    rows, masks = [], [np.ones(n, bool)]
    for t in targets:
        for k in ks:
            for kind in KINDS:
                removed = removal_set(weight[:, t], k, kind, rng)
                mask = np.ones(n, bool)
                mask[removed] = False
                rows.append((t, k, kind, -weight[removed, t].sum()))
                masks.append(mask)
    margins = retrain(np.stack(masks))
    base = margins[0]
    return {
        "target": np.array([r[0] for r in rows]), "k": np.array([r[1] for r in rows]),
        "kind": np.array([r[2] for r in rows]), "predicted": np.array([r[3] for r in rows]),
        "actual": np.array([margins[i + 1, r[0]] - base[r[0]] for i, r in enumerate(rows)]),
    }


def support_size(base_margin: np.ndarray, weight: np.ndarray, max_k: int) -> np.ndarray:
    """Predicted data support (T,): the smallest k such that removing the target's k most
    positively weighted examples is predicted to flip a correct prediction
    (``base - sum(top-k weights) < 0``). 0 where the base prediction is already wrong,
    -1 where no k <= max_k flips it.

    base_margin (T,) and weight (n, T) must be of the correct-class margin
    ``logit_y - max_{j != y} logit_j`` (:func:`datalens.tasks.classification.correct_class_margins`),
    which is negative exactly when the argmax is wrong; the logsumexp margin is negative
    whenever p_y < 1/2, which a correct argmax can be."""
    top = -np.sort(-weight, axis=0)[:max_k]  # (max_k, T) descending
    after = base_margin[None, :] - np.cumsum(np.clip(top, 0, None), axis=0)
    flipped = after < 0
    k = np.where(flipped.any(0), flipped.argmax(0) + 1, -1)
    return np.where(base_margin <= 0, 0, k)


def flipped_fraction(k_star: np.ndarray, ks: list[int]) -> np.ndarray:
    """Fraction of initially correct targets whose support is at most k, for each k."""
    correct = k_star != 0
    return np.array([float(((k_star[correct] > 0) & (k_star[correct] <= k)).mean()) if correct.any() else 0.0 for k in ks])


def verify_support(weight: np.ndarray, k_star: np.ndarray, targets: np.ndarray, retrain: Retrain) -> np.ndarray:
    """Retrain without each sampled target's predicted support set; True where the retrained
    correct-class margin is indeed negative (the argmax moves off the label: the prediction
    flips). targets need k_star > 0; ``retrain`` returns correct-class margins."""
    n = weight.shape[0]
    masks = []
    for t in targets:
        mask = np.ones(n, bool)
        mask[np.argsort(-weight[:, t], kind="stable")[: k_star[t]]] = False
        masks.append(mask)
    margins = retrain(np.stack(masks)) if masks else np.zeros((0, weight.shape[1]))
    return np.array([margins[i, t] < 0 for i, t in enumerate(targets)], dtype=bool)


def agreement_by_kind(res: dict[str, np.ndarray]) -> dict[str, dict]:
    """Pearson and Spearman of predicted vs actual margin changes, pooled and per removal kind
    (pooling mixes kinds whose changes differ in sign, which alone makes a high correlation),
    with the mean actual and predicted change per k."""
    out = {}
    for kind in ("pooled", *KINDS):
        sel = np.ones(len(res["kind"]), bool) if kind == "pooled" else res["kind"] == kind
        p, a = res["predicted"][sel], res["actual"][sel]
        varied = len(p) > 2 and p.std() > 0 and a.std() > 0
        out[kind] = {"pearson": float(stats.pearsonr(p, a)[0]) if varied else 0.0,
                     "spearman": float(stats.spearmanr(p, a)[0]) if varied else 0.0, "count": int(sel.sum())}
        if kind != "pooled":
            ks = sorted(set(res["k"][sel].tolist()))
            out[kind]["mean_actual_change"] = {str(k): float(a[res["k"][sel] == k].mean()) for k in ks}
            out[kind]["mean_predicted_change"] = {str(k): float(p[res["k"][sel] == k].mean()) for k in ks}
    return out


def brittleness(k_star: np.ndarray, ks: list[int], sample: np.ndarray, flips: np.ndarray) -> dict:
    """The predicted fraction of test examples flipped by removing at most k examples, and
    beside it the *confirmed* fraction: the predicted one times the share of sampled
    predicted flips with k* <= k that retraining confirms (NaN where none was sampled)."""
    predicted = flipped_fraction(k_star, ks)
    confirmed = []
    for k, frac in zip(ks, predicted):
        sel = k_star[sample] <= k
        confirmed.append(float(frac * flips[sel].mean()) if sel.any() else float("nan"))
    return {"fraction_flipped_predicted": dict(zip(map(str, ks), predicted.tolist())),
            "fraction_flipped_confirmed": dict(zip(map(str, ks), confirmed)),
            "confirmed_flip_rate": float(flips.mean()) if len(flips) else float("nan"),
            "confirmed_sample_size": int(len(sample))}


def removal_effects(rankings: dict[str, np.ndarray], targets: np.ndarray, ks: list[int],
                    retrain: Callable[[np.ndarray], np.ndarray], seed: int = 0) -> dict:
    """For each target, k and method, remove the target's k top-ranked training examples from the
    full training set, retrain, and measure the target's output against the full-data models'
    (the TRAK paper's counterfactual: which method's top examples matter most to the target).

    rankings: {method: (n, t) scores, higher = more helpful}; a method ``random`` (k examples
    drawn uniformly, seeded) is added. ``retrain(masks (m, n))`` returns every repeat's outputs
    (R, m, t), repeat r with one seed for every mask (common random numbers). Returns
    ``methods`` (names in order) and arrays ``method``, ``target``, ``k`` (rows,) and ``change``
    (R, rows): retrained minus the same repeat's full-data output."""
    n = next(iter(rankings.values())).shape[0]
    rng = np.random.default_rng([seed, 19])
    methods = [*rankings, "random"]
    rows, masks = [], [np.ones(n, bool)]
    for t in targets:
        for k in ks:
            for method in methods:
                removed = rng.choice(n, k, replace=False) if method == "random" else np.argsort(-rankings[method][:, t], kind="stable")[:k]
                mask = np.ones(n, bool)
                mask[removed] = False
                rows.append((method, t, k))
                masks.append(mask)
    outputs = retrain(np.stack(masks))  # (R, 1 + rows, t)
    target = np.array([r[1] for r in rows])
    return {"methods": methods, "method": np.array([r[0] for r in rows]), "target": target, "k": np.array([r[2] for r in rows]),
            "change": outputs[:, 1:][:, np.arange(len(rows)), target] - outputs[:, 0][:, target]}


def removal_summary(res: dict, ks: list[int]) -> dict[str, list[dict]]:
    """Per method, per k: the mean drop (full-data output minus retrained) over targets and
    repeats, with a 95% interval (normal, from the standard error across those target-repeat
    pairs) and the count."""
    out = {}
    for method in res["methods"]:
        recs = []
        for k in ks:
            drop = -res["change"][:, (res["method"] == method) & (res["k"] == k)].ravel()
            half = 1.96 * drop.std(ddof=1) / np.sqrt(len(drop)) if len(drop) > 1 else 0.0
            recs.append({"k": int(k), "mean": float(drop.mean()), "low": float(drop.mean() - half), "high": float(drop.mean() + half),
                         "count": int(len(drop))})
        out[method] = recs
    return out
