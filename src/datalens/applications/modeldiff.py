"""ModelDiff (Shah, Park, Ilyas, Madry, ICML 2023): the training-data directions that one
learning algorithm uses and another does not, found by comparing their attributions.

Inputs are two attribution matrices over the same training and target examples, in this
repo's orientation (n_train, n_targets) (datamodel weights or TRAK scores). Per target x:

* theta_x^A, theta_x^B in R^n_train, each scaled to unit norm;
* the residual of A given B, ``r_x = theta_x^A - <theta_x^A, theta_x^B> theta_x^B``: what A's
  prediction rests on that B's does not (orthogonal to theta_x^B);
* PCA over targets of the residuals (rows r_x): each component v in R^n_train is a
  *distinguishing training direction*.

A direction is judged by how much of each algorithm's attribution variance it explains
(rows normalised, columns centred, as the residuals): a real difference explains much
under one algorithm and little under the other. All arithmetic is float64, on any device.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy import linalg, stats
from sklearn.metrics import roc_auc_score

from datalens.core.config import ParamError, resolve_location, set_dotted, validate
from datalens.core.data import stamp
from datalens.attribution.datamodels import Moments, fit_datamodels, split_models
from datalens.core.progress import progress_bar
from datalens.training.engine import resolve_device
from datalens.tasks.classification import margins_from_logits
from datalens.tasks.gradients import raw_outputs
from datalens.training.runs import SubsetRun
from datalens.core.store import SubsetStore
from datalens.attribution.trak import featurize, trak_scores


def unit_rows(theta: np.ndarray | torch.Tensor, device="cpu") -> torch.Tensor:
    """(n_train, T) attributions -> (T, n_train) float64, each target's row scaled to unit norm
    (a target with no attribution at all stays zero)."""
    t = torch.as_tensor(theta if torch.is_tensor(theta) else np.asarray(theta), dtype=torch.float64, device=device).T
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)


def residuals(theta_a, theta_b, device="cpu") -> torch.Tensor:
    """(T, n_train): per target, unit theta^A minus its projection on unit theta^B."""
    a, b = unit_rows(theta_a, device), unit_rows(theta_b, device)
    return a - (a * b).sum(1, keepdim=True) * b


def principal_directions(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of ``rows`` (T, n) over its rows (centred): components (k, n) with unit norm, their
    signs fixed so the largest |entry| is positive, and explained-variance ratios (k,).

    From the eigenvectors of the smaller Gram matrix (T x T or n x n), cheaper than an SVD
    of the rows when the permutation null repeats it hundreds of times."""
    centred = rows - rows.mean(0, keepdim=True)
    wide = centred.shape[0] <= centred.shape[1]
    gram = centred @ centred.T if wide else centred.T @ centred
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]  # the k largest, descending
    comps = (evecs.T @ centred) / evals.sqrt().clamp_min(1e-300)[:, None] if wide else evecs.T
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return comps * signs, evals / torch.trace(gram).clamp_min(1e-300)


def explained_variance(theta, directions: torch.Tensor, device="cpu") -> torch.Tensor:
    """Fraction of the variance of the row-normalised, column-centred attribution matrix
    (T, n_train) that each unit direction (k, n_train) explains: (k,)."""
    m = unit_rows(theta, device)
    m = m - m.mean(0, keepdim=True)
    return ((m @ directions.T) ** 2).sum(0) / (m * m).sum().clamp_min(1e-300)


@dataclass
class Directions:
    """Distinguishing directions of one residual ("A minus B": what A uses that B does not).

    components: (k, n_train) unit directions; explained: (k,) share of the residuals' variance;
    variance_a, variance_b: (k,) share of each algorithm's attribution variance;
    projections: (T, k) each target's residual projected on each direction.
    """

    components: np.ndarray
    explained: np.ndarray
    variance_a: np.ndarray
    variance_b: np.ndarray
    projections: np.ndarray

    def top_training_examples(self, c: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the ``count`` most positive and most negative training examples of direction c."""
        order = np.argsort(self.components[c])
        return order[::-1][:count], order[:count]

    def top_targets(self, c: int, count: int) -> np.ndarray:
        """The targets whose residual projects most strongly (in absolute value) on direction c."""
        return np.argsort(-np.abs(self.projections[:, c]))[:count]

    @property
    def variance_ratio(self) -> np.ndarray:
        """(k,) variance under A over variance under B: far above 1 for a feature A uses and B does not."""
        return self.variance_a / np.maximum(self.variance_b, 1e-300)


def model_diff(theta_a, theta_b, num_components: int = 5, device="cpu") -> tuple[Directions, Directions]:
    """Distinguishing directions both ways: (A minus B, B minus A). theta_*: (n_train, T)."""
    if np.shape(theta_a) != np.shape(theta_b):
        raise ValueError(f"the attribution matrices differ in shape: {np.shape(theta_a)} vs {np.shape(theta_b)}")
    out = []
    for first, second in ((theta_a, theta_b), (theta_b, theta_a)):
        res = residuals(first, second, device)
        comps, ratio = principal_directions(res, num_components)
        out.append(Directions(
            components=comps.cpu().numpy(), explained=ratio.cpu().numpy(),
            variance_a=explained_variance(theta_a, comps, device).cpu().numpy(),
            variance_b=explained_variance(theta_b, comps, device).cpu().numpy(),
            projections=((res - res.mean(0, keepdim=True)) @ comps.T).cpu().numpy()))
    return out[0], out[1]


def largest_variance_ratio(a_minus_b: Directions, b_minus_a: Directions) -> float:
    """The most asymmetric direction of either residual: max over directions of max(ratio, 1/ratio)."""
    ratios = np.concatenate([a_minus_b.variance_ratio, b_minus_a.variance_ratio])
    return float(np.max(np.maximum(ratios, 1 / ratios)))


@dataclass
class AttributionPair:
    """Two algorithms' attributions, theta_a and theta_b (n_train, T), from models trained on the
    same masks (model i of A and model i of B share mask i), and how to recompute both with some
    models exchanged between the algorithms: ``swapped(swaps)`` yields (theta_a', theta_b') for
    each row of a (P, num_models) bool array, where swaps[p, i] exchanges the two models i. Under
    the hypothesis that A and B are one algorithm, models i of A and B are exchangeable, so the
    swapped pairs are draws of the observed pair's distribution: the null of :func:`model_swap_null`."""

    theta_a: np.ndarray
    theta_b: np.ndarray
    swapped: Callable[[np.ndarray], Iterator[tuple[np.ndarray, np.ndarray]]]
    num_models: int


def paired_datamodels(masks: np.ndarray, outputs_a: np.ndarray, outputs_b: np.ndarray, solver: dict,
                      val_fraction: float = 0.1, seed: int = 0, device: str = "cpu", block: int = 25) -> AttributionPair:
    """Datamodels of two algorithms on the same masks (N, n) with outputs (N, T) each, on one
    support per target shared by both.

    The lasso path is run on the two algorithms' models pooled (lambda chosen on ``val_fraction``
    of them); its solution gives each target a support S, signs s and lambda. Each algorithm's
    datamodel is then the lasso's solution on that support, ``w_S = C_SS^-1 (c_S - lambda s)``
    (standardised masks, C = Z^T Z / N, c = Z^T (y - ybar) / N): the lasso's own solution when its
    support is S. A difference between the two is then not a difference in which examples each
    lasso kept, and the fit is linear in the outputs given S, s and lambda, which no exchange of
    models between A and B changes (the pool is the same models). So the swapped pairs of the
    null are exact and cheap: one factorisation of C_SS per target serves ``block`` swaps at once.
    """
    x = np.asarray(masks, dtype=np.float64)
    ya, yb = np.asarray(outputs_a, dtype=np.float64), np.asarray(outputs_b, dtype=np.float64)
    if ya.shape != yb.shape or len(ya) != len(x):
        raise ValueError(f"paired datamodels need outputs of one shape, a row per mask: masks {x.shape}, A {ya.shape}, B {yb.shape}")
    (num, n), targets = x.shape, ya.shape[1]
    tr, va = split_models(num, val_fraction, seed)
    pooled, _ = fit_datamodels(*[Moments.from_blocks([(x[r], ya[r]), (x[r], yb[r])]) for r in (tr, va)], device=device,
                               progress=False, **solver)
    z = (x - pooled.mu) / pooled.sigma  # the pooled refit's standardisation: the masks' own (every model is in the pool)
    gram = z.T @ z / num
    supports = [np.flatnonzero(pooled.weight_std[:, t]) for t in range(targets)]
    shift = pooled.lam[None, :] * np.sign(pooled.weight_std)  # lambda s, zero off the support

    def fit(swaps: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        swaps = np.atleast_2d(np.asarray(swaps, dtype=np.float64))
        for a in range(0, len(swaps), block):
            s = swaps[a:a + block]  # (p, N)
            p = len(s)
            out = np.zeros((2, p, n, targets))
            for t, sup in enumerate(supports):
                if len(sup) == 0:
                    continue
                diff = yb[:, t] - ya[:, t]
                y = np.concatenate([ya[:, t] + s * diff, yb[:, t] - s * diff])  # (2p, N): A' then B'
                cross = z[:, sup].T @ (y - y.mean(1, keepdims=True)).T / num  # (|S|, 2p)
                w = _solve_psd(gram[np.ix_(sup, sup)], cross - shift[sup, t, None])
                out[:, :, sup, t] = (w / pooled.sigma[sup, None]).T.reshape(2, p, len(sup))
            yield from zip(out[0], out[1])

    theta_a, theta_b = next(fit(np.zeros((1, num), bool)))
    return AttributionPair(theta_a, theta_b, fit, num)


def _solve_psd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^-1 b for a positive semi-definite a: by Cholesky, or by least squares (the minimum-norm
    solution) where a is singular: a support wider than the models can pin down. Which one
    applies depends on the masks alone, so every swap of a target is solved the same way."""
    try:
        return linalg.solve(a, b, assume_a="pos")
    except linalg.LinAlgError:
        return linalg.lstsq(a, b)[0]


def paired_trak(features_a: Sequence, features_b: Sequence, ridge: float) -> AttributionPair:
    """TRAK of two algorithms from the features of their checkpoints 0..M-1 (checkpoint m of each on
    mask m, projected with the same matrix); a swap exchanges checkpoints between the algorithms."""
    if len(features_a) != len(features_b):
        raise ValueError(f"paired TRAK needs as many checkpoints of each algorithm: {len(features_a)} vs {len(features_b)}")

    def fit(swaps: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for swap in np.atleast_2d(swaps):
            pairs = [(fb, fa) if s else (fa, fb) for fa, fb, s in zip(features_a, features_b, swap)]
            yield trak_scores([a for a, _ in pairs], ridge), trak_scores([b for _, b in pairs], ridge)

    theta_a, theta_b = next(fit(np.zeros((1, len(features_a)), bool)))
    return AttributionPair(theta_a, theta_b, fit, len(features_a))


def model_swap_null(pair: AttributionPair, num_components: int, permutations: int, seed: int) -> np.ndarray:
    """The null distribution (permutations,) of :func:`largest_variance_ratio` when the two algorithms
    are one: each model index's pair of models is exchanged between A and B with probability 1/2,
    the attributions recomputed (:attr:`AttributionPair.swapped`) and ModelDiff rerun. It carries
    the estimator's own noise, including what one stack of models shares across all its targets
    (a seed stream's quirks move every target's attribution together). Exchanging targets instead
    would break that shared part and give too narrow a null: an earlier version did, and it
    rejected the same-algorithm control at p = 0.01."""
    swaps = np.random.default_rng([seed, 29]).random((permutations, pair.num_models)) < 0.5
    return np.array([largest_variance_ratio(*model_diff(a, b, num_components))
                     for a, b in progress_bar(pair.swapped(swaps), total=permutations, desc="model-swap null")])


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """(1 + #null >= observed) / (1 + #null): never 0, exact under exchangeability."""
    return float((1 + np.sum(np.asarray(null) >= observed)) / (1 + len(null)))


def per_target_cosine(theta_a, theta_b) -> np.ndarray:
    """(T,) cosine similarity of each target's attributions under A and B."""
    return (unit_rows(theta_a) * unit_rows(theta_b)).sum(1).numpy()


# --- the pipeline: two algorithms on the same masks, their attributions, and interventions ---

def algorithm_run(p: dict, overrides: dict, *, store: str, num_models: int, num_checkpoints: int,
                  patch: dict | None = None, repeat_offset: int = 0) -> SubsetRun:
    """The base run of stage params ``p`` with one algorithm's ``overrides`` (dotted ``model.*`` and
    ``train.*`` keys, and ``data.blank``), on the base run's masks (the same ``train.seed``)."""
    tree, flat = copy.deepcopy(p), {}
    for key, value in overrides.items():
        if key != "data.blank" and key.split(".")[0] not in ("model", "train"):
            raise ParamError(f"modeldiff override '{key}' is not allowed; allowed keys: model.*, train.*, data.blank")
        if key != "data.blank":
            set_dotted(tree, key, value)
            flat[key] = value
    validate(flat)
    run = SubsetRun.from_params(tree, store=store, num_models=num_models, num_checkpoints=num_checkpoints)
    return replace(run, patch=patch or None, blank=overrides.get("data.blank"), repeat_offset=repeat_offset)


def attribution_pair(runs: tuple[SubsetRun, SubsetRun], stores: tuple[SubsetStore, SubsetStore], kind: str, num_models: int,
                     solver: dict, trak_models: int = 10, proj_dim: int = 2048, ridge: float = 1.0, seed: int = 0) -> AttributionPair:
    """Attributions (n_train, n_test) of two algorithms run on the same masks: datamodels fit on the
    first ``num_models`` subset models of each (:func:`paired_datamodels`, lambda chosen on a 10%
    split of them pooled), or TRAK from the first ``trak_models`` checkpoints of each."""
    if kind == "datamodels":
        rows = [np.flatnonzero(st.completed()) for st in stores]
        if min(len(r) for r in rows) < num_models:
            raise ValueError(f"modeldiff.num_models={num_models} but a store holds only {min(len(r) for r in rows)} completed models")
        rows = [r[:num_models] for r in rows]
        masks = [st.read("masks", r) for st, r in zip(stores, rows)]
        if not np.array_equal(*masks):
            raise ValueError("the two algorithms' models were not trained on the same masks (train.seed must match)")
        device = str(resolve_device(runs[0].device))
        return paired_datamodels(masks[0], *(st.read("test_outputs", r) for st, r in zip(stores, rows)), solver, 0.1, seed, device)
    if kind == "trak":
        device = resolve_device(runs[0].device)
        feats = [[featurize(run.make_task(), run.load_checkpoint(store, m, device), *run.dataset_().tensors(device), proj_dim, seed, m)
                  for m in range(trak_models)] for run, store in zip(runs, stores)]
        return paired_trak(*feats, ridge)
    raise ParamError(f"modeldiff.attribution={kind!r} is not allowed; allowed values: datamodels, trak")


def recovery(weights: np.ndarray, planted: np.ndarray) -> dict:
    """How well a direction's |weights| (n_train,) pick out the planted training examples:
    precision at the planted count (recall is the same there) and AUROC."""
    truth = np.zeros(len(weights), bool)
    truth[planted] = True
    top = np.argsort(-np.abs(weights))[:len(planted)]
    return {"precision_at_planted": float(truth[top].mean()), "auroc": float(roc_auc_score(truth, np.abs(weights)))}


def _interval(values: np.ndarray) -> dict:
    """Mean of per-model values with a 95% t-interval across models."""
    m = len(values)
    half = float(stats.t.ppf(0.975, m - 1) * values.std(ddof=1) / np.sqrt(m)) if m > 1 else float("nan")
    return {"mean": float(values.mean()), "low": float(values.mean() - half), "high": float(values.mean() + half), "models": m}


def intervention_effect(run: SubsetRun, store: SubsetStore, models: int, inputs: np.ndarray, labels: np.ndarray,
                        transform: Callable[[np.ndarray, float], np.ndarray], intensities: list[float],
                        watch: int | None = None) -> list[dict]:
    """Mean change, over ``inputs`` (n, *input_shape), of each of the first ``models`` checkpointed
    models' outputs when ``transform(inputs, intensity)`` replaces them, then the algorithm's
    preprocessing (its blanking) as for any input. Watched is class ``watch`` (its probability
    and its margin) or, by default, each input's own label (its margin). One record per
    intensity, each with a 95% interval across models."""
    device = resolve_device(run.device)
    target = torch.as_tensor(labels if watch is None else np.full(len(labels), watch), device=device)

    nets = [run.load_checkpoint(store, m, device) for m in range(models)]  # once, for every intensity
    task = run.make_task()

    def outputs(x):
        if run.blank:
            x = stamp(x, run.blank["size"], run.blank["row"], run.blank["col"], 0.0)
        xt = torch.as_tensor(x, device=device)
        logits = torch.stack([raw_outputs(net, xt, target, task) for net in nets])  # streamed in chunks of examples
        prob = torch.softmax(logits, -1).gather(-1, target.expand(models, -1).unsqueeze(-1)).squeeze(-1)
        return prob.double().cpu().numpy(), margins_from_logits(logits, target).double().cpu().numpy()

    p0, m0 = outputs(inputs)
    out = []
    for intensity in intensities:
        p1, m1 = outputs(transform(inputs, intensity))
        out.append({"intensity": float(intensity), "probability_change": _interval((p1 - p0).mean(1)),
                    "margin_change": _interval((m1 - m0).mean(1))})
    return out


def contrasted_classes(directions: Directions, c: int, labels: np.ndarray, count: int = 20) -> tuple[int, int]:
    """The most common training label among direction c's ``count`` most positive and most
    negative examples: the two classes the direction contrasts."""
    pos, neg = directions.top_training_examples(c, count)
    return int(np.bincount(labels[pos]).argmax()), int(np.bincount(labels[neg]).argmax())


def blend_toward(mean: np.ndarray) -> Callable[[np.ndarray, float], np.ndarray]:
    """The transformation x -> (1 - t) x + t * mean (a mean image of another class) at intensity t."""
    return lambda x, t: ((1 - t) * x + t * mean[None]).astype(x.dtype)


ALGORITHMS = ("planted_a", "planted_b", "natural_a", "natural_b")


def algorithm_runs(p: dict) -> dict[str, SubsetRun]:
    """Every run the ModelDiff stages need, by name: the two algorithms of the planted case (both
    on the patched data), the two of the natural case, and ``control``: ``natural_a`` again with
    other model seeds on the same masks (the negative control). An algorithm equal to the base
    run (no overrides, no patch) is the base run itself, so its store is reused."""
    md = p["modeldiff"]
    base = SubsetRun.from_params(p)
    out = {}
    for name in (*ALGORITHMS, "control"):
        overrides = md["natural_a" if name == "control" else name]
        patch = md["patch"] if name.startswith("planted") else None
        offset = 1 if name == "control" else 0
        if not overrides and not patch and not offset:
            out[name] = base
            continue
        store = f"{resolve_location(p, md['store_dir'])}/{name}"  # a folder: one store per identity
        out[name] = algorithm_run(p, overrides, store=store, num_models=md["num_models"],
                                  num_checkpoints=md["num_checkpoints"], patch=patch, repeat_offset=offset)
    return out
