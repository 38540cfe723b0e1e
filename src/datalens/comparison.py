"""The LDS-versus-compute comparison (the analogue of the TRAK paper's Figure 1):
every attribution method at a grid of compute budgets, each scored by LDS on the
held-out evaluation models.

Compute is counted two ways: the number of trained models a method needs, and wall
seconds. Wall seconds are (models x measured seconds to train one model) plus the
method's own time, hyperparameter search on validation models included.
Hyperparameters (TRAK's ridge and soft-threshold, influence damping) are chosen on
*validation* subset models: the last ``trak.num_val_models`` models of the training
store, never the LDS evaluation models.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from datalens import attribution, datamodels, trak
from datalens.metrics import linear_datamodeling_score


@dataclass
class Ground:
    """LDS ground truth: evaluation masks (m, n) with mean and single-model margins (m, t),
    and validation masks/margins from the training store."""

    masks: np.ndarray
    actual_mean: np.ndarray
    actual_single: np.ndarray
    val_masks: np.ndarray
    val_margins: np.ndarray


@dataclass
class Comparison:
    seconds_per_model: float
    ground: Ground
    records: list[dict] = field(default_factory=list)
    scores: dict = field(default_factory=dict)  # method label -> (n, t) scores, for figures

    def add(self, method: str, models: int, seconds: float, scores: np.ndarray, **knobs) -> dict:
        g = self.ground
        rec = {"method": method, "models": int(models), "seconds": float(seconds),
               "lds": linear_datamodeling_score(scores, g.masks, g.actual_mean),
               "lds_single": linear_datamodeling_score(scores, g.masks, g.actual_single), **knobs}
        self.records.append(rec)
        self.scores[(method, models, knobs.get("proj_dim"))] = scores
        return rec


def _val_lds(scores, g: Ground) -> float:
    return linear_datamodeling_score(scores, g.val_masks, g.val_margins)


def run_trak(cmp: Comparison, group, num_models: list[int], proj_dims: list[int], ridges: list[float]) -> None:
    """TRAK at every (M, k): ridge chosen on validation, then optional soft-thresholding
    with its threshold chosen on validation too. Per-model kernel terms are summed
    cumulatively, so all M share the work."""
    feat_seconds = np.asarray(group["seconds"][:max(num_models)])
    for k in proj_dims:
        sums = {r: 0.0 for r in ridges}
        q_sum, score_seconds = 0.0, 0.0
        for m in range(max(num_models)):
            f = trak.load_features(group, [m], k)[0]
            t0 = time.perf_counter()
            for r, term in trak.kernel_terms(f, ridges).items():
                sums[r] = sums[r] + term
            q_sum = q_sum + f.q.double()
            score_seconds += time.perf_counter() - t0
            M = m + 1
            if M not in num_models:
                continue
            t0 = time.perf_counter()
            candidates = {r: ((q_sum / M)[:, None] * sums[r] / M).numpy() for r in ridges}
            best, val = trak.select_by_lds(candidates, cmp.ground.val_masks, cmp.ground.val_margins)
            tau = candidates[best]
            thresholds = {float(t): trak.soft_threshold(tau, t) for t in np.quantile(np.abs(tau), [0.5, 0.8, 0.9, 0.95])}
            t_best, _ = trak.select_by_lds({0.0: tau, **thresholds}, cmp.ground.val_masks, cmp.ground.val_margins)
            seconds = M * cmp.seconds_per_model + feat_seconds[:M].sum() + score_seconds + time.perf_counter() - t0
            rec = cmp.add("trak", M, seconds, tau, proj_dim=k, ridge=best, val_lds_by_ridge={str(r): v for r, v in val.items()})
            thr = {0.0: tau, **thresholds}[t_best]
            rec["lds_soft_threshold"] = linear_datamodeling_score(thr, cmp.ground.masks, cmp.ground.actual_mean)
            rec["soft_threshold"] = t_best
            rec["eval_lds_by_ridge"] = {str(r): linear_datamodeling_score(c, cmp.ground.masks, cmp.ground.actual_mean)
                                        for r, c in candidates.items()}


def run_datamodels(cmp: Comparison, store, counts: list[int], solver: dict, val_fraction: float, seed: int) -> None:
    for n in counts:
        t0 = time.perf_counter()
        dm, _ = datamodels.fit_from_store(store, num_models=n, val_fraction=val_fraction, seed=seed, progress=False, **solver)
        cmp.add("datamodels", n, n * cmp.seconds_per_model + time.perf_counter() - t0, dm.weight)


def run_empirical_influence(cmp: Comparison, store, counts: list[int]) -> None:
    done = np.flatnonzero(store.completed())
    for n in counts:
        t0 = time.perf_counter()
        scores = attribution.empirical_influence(store.read("masks", done[:n]), store.read("test_margins", done[:n]))
        cmp.add("empirical_influence", n, n * cmp.seconds_per_model + time.perf_counter() - t0, scores)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_gradient_baselines(cmp: Comparison, models: list, masks: np.ndarray, data: tuple, ensemble_sizes: list[int],
                           dampings: list[float], last_layer: list[str], cg_iters: int = 30) -> None:
    """Gradient dot product and cosine (averaged over M models), representation similarity,
    and influence functions (explicit Hessian over the last layer; CG over all parameters),
    with damping chosen on validation models."""
    x_tr, y_tr, x_te, y_te = data
    for M in ensemble_sizes:
        for name, fn in (("grad_dot", attribution.grad_dot), ("grad_cosine", attribution.grad_cosine)):
            t0 = time.perf_counter()
            s = sum(fn(m, x_tr, y_tr, x_te, y_te) for m in models[:M]) / M
            cmp.add(name, M, M * cmp.seconds_per_model + time.perf_counter() - t0, s)
    s, sec = _timed(attribution.representation_similarity, models[0], x_tr, x_te)
    cmp.add("representation_similarity", 1, cmp.seconds_per_model + sec, s)
    t0 = time.perf_counter()
    candidates = attribution.influence_explicit(models[0], x_tr, y_tr, masks[0], x_te, y_te, damping=list(dampings), param_names=last_layer)
    best, _ = trak.select_by_lds(candidates, cmp.ground.val_masks, cmp.ground.val_margins)
    cmp.add("influence_explicit", 1, cmp.seconds_per_model + time.perf_counter() - t0, candidates[best], damping=best, params="last layer")
    # CG over all parameters, from the largest damping down: stop at the first indefinite system
    t0 = time.perf_counter()
    candidates = {}
    for d in sorted(dampings, reverse=True):
        try:
            candidates[d] = attribution.influence_cg(models[0], x_tr, y_tr, masks[0], x_te, y_te, damping=d, iters=cg_iters)
        except ValueError:
            break
    if candidates:
        best, _ = trak.select_by_lds(candidates, cmp.ground.val_masks, cmp.ground.val_margins)
        cmp.add("influence_cg", 1, cmp.seconds_per_model + time.perf_counter() - t0, candidates[best], damping=best, params="all")


def run_tracin(cmp: Comparison, run, mask: np.ndarray, data: tuple, snapshot_epochs: list[int]) -> None:
    """TracIn over snapshots of one model's training (one trained model)."""
    from datalens.training import cached_dataset, init_models, model_seed, train_models
    x_tr, y_tr, x_te, y_te = data
    ds = cached_dataset(run.dataset, run.data_root)
    t0 = time.perf_counter()
    seeds = [model_seed(run.seed, 0, 0, run.stream)]
    models = init_models(lambda: run.build_model(ds), seeds)
    trained = train_models(models, x_tr, y_tr, mask[None], seeds, run.settings, snapshot_epochs=snapshot_epochs)
    checkpoints = []
    for state in trained.snapshots[0]:
        m = run.build_model(ds)
        m.load_state_dict(state)
        checkpoints.append(m)
    scores = attribution.tracin(checkpoints, [run.settings.lr] * len(checkpoints), x_tr, y_tr, x_te, y_te)
    cmp.add("tracin", 1, time.perf_counter() - t0, scores, checkpoints=len(checkpoints))


def measure_seconds_per_model(run, count: int = 16) -> float:
    from datalens.training import train_range
    train_range(run, 0, 1)  # warm up
    t0 = time.perf_counter()
    train_range(run, 0, count)
    return (time.perf_counter() - t0) / count

