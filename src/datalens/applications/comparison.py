"""The LDS-versus-compute comparison (the analogue of the TRAK paper's Figure 1): every
attribution method at a grid of compute budgets, each scored by LDS on the held-out
evaluation models.

**Accounting, the same for every method** (also in the figure's caption and the README):

* *models*: every trained model a method uses is charged: the subset models it fits on
  or the checkpoints it differentiates, plus, for a method that chooses a hyperparameter
  (TRAK's ridge and soft-threshold, the damping of influence functions and EK-FAC), the
  ``attribution.selection_models`` validation models it chooses on. Datamodels choose
  lambda on a split of their own N models, so they pay out of N.
* *seconds*: charged models x the measured seconds to train one model (a median over
  repeats), plus the method's own wall time, timed the same way for all: reading the
  store (masks, margins, checkpoints or features), featurising (each k charged its own
  gradient and projection time, although one pass computes them all), fitting and
  selection. TracIn is charged one model at the same per-model rate, plus its scoring.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from datalens.attribution import baselines, datamodels, projection
from datalens.core.config import resolve_location
from datalens.training.engine import init_models, interval_lrs, resolve_device, train_models
from datalens.evaluation.metrics import heldout_arrays, linear_datamodeling_score, select_by_lds
from datalens.training.runs import SubsetRun
from datalens.core.store import SubsetStore
from datalens.attribution.trak import FeatureJob, FeatureStore, ModelFeatures, featurize_checkpoints, kernel_terms, soft_threshold

ACCOUNTING = ("Charged to every method: each trained model it uses (subset models, checkpoints, and the {s} "
              "validation models on which it chooses a hyperparameter) at {rate:.1f} ms per model, plus its own "
              "wall time (store reads, featurisation per k, fitting, selection).")


@dataclass
class Ground:
    """LDS ground truth on t targets: evaluation masks (m, n) with mean and single-model margins
    (m, t); the selection (validation) masks (s, n) and margins (s, t) from the training store; and
    ``targets`` (t,), the test examples they are (None: every test example, in order); ``groups``
    {name: columns} of the targets whose LDS is also reported apart (validation images and
    generated samples)."""

    masks: np.ndarray
    actual_mean: np.ndarray
    actual_single: np.ndarray
    val_masks: np.ndarray
    val_margins: np.ndarray
    targets: np.ndarray | None = None
    groups: dict[str, np.ndarray] | None = None

    @property
    def cols(self):
        """Indexes the test set's columns (or examples) down to the targets."""
        return slice(None) if self.targets is None else self.targets


def ground_truth(train_store: SubsetStore, eval_store: SubsetStore, repeats: int, selection_models: int,
                 targets: np.ndarray | None) -> Ground:
    """The LDS ground truth on ``targets`` (None: every test example): the held-out evaluation
    models (``repeats`` per mask) and, for choosing hyperparameters, the last
    ``selection_models`` completed models of the training store."""
    masks, actual_mean, actual_single = heldout_arrays(eval_store, repeats)
    val_rows = np.flatnonzero(train_store.completed())[-selection_models:]
    cols = slice(None) if targets is None else targets
    return Ground(masks, actual_mean[:, cols], actual_single[:, cols], train_store.read("masks", val_rows),
                  train_store.read("test_outputs", val_rows)[:, cols], targets)


def seeded_sample(population: int, count: int, seed: int, salt: int) -> np.ndarray:
    """``count`` of ``range(population)`` drawn without replacement from ``[seed, salt]``, sorted."""
    return np.sort(np.random.default_rng([seed, salt]).choice(population, count, replace=False))


def comparison_targets(num_test: int, num_targets: int, seed: int) -> np.ndarray | None:
    """The test examples the comparison scores: all of them for ``num_targets`` 0 (None), else a
    seeded sample of that many, in test-set order. Every method's (n, t) scores are held while it
    is chosen and scored, so t is what stage attribution_comparison's host memory grows by."""
    if num_targets == 0 or num_targets >= num_test:
        return None
    return seeded_sample(num_test, num_targets, seed, 23)


@dataclass
class Comparison:
    seconds_per_model: float
    ground: Ground
    records: list[dict] = field(default_factory=list)
    keep: set = field(default_factory=set)  # the (method, models used, proj_dim) whose scores figures draw
    scores: dict = field(default_factory=dict)  # those of them recorded -> (n, t) scores; others are scored and dropped

    @property
    def selection_models(self) -> int:
        return len(self.ground.val_masks)

    def add(self, method: str, models: int, own_seconds: float, scores: np.ndarray, selects: bool, **knobs) -> dict:
        """Record one point: ``models`` trained models used (selection models are added when
        ``selects``), ``own_seconds`` the method's own wall time; charges per the module docstring."""
        charged = int(models) + (self.selection_models if selects else 0)
        g = self.ground
        rec = {"method": method, "models": charged, "models_used": int(models), "selects_on_validation": selects,
               "own_seconds": float(own_seconds), "seconds": charged * self.seconds_per_model + float(own_seconds),
               "lds": linear_datamodeling_score(scores, g.masks, g.actual_mean),
               "lds_single": linear_datamodeling_score(scores, g.masks, g.actual_single), **knobs}
        if g.groups:
            rec["lds_by_group"] = {name: linear_datamodeling_score(scores[:, cols], g.masks, g.actual_mean[:, cols])
                                   for name, cols in g.groups.items()}
        self.records.append(rec)
        key = (method, int(models), knobs.get("proj_dim"))
        if key in self.keep:  # at paper scale each (n, t) is 4 GB: keeping every method's would fill the host
            self.scores[key] = scores
        return rec

    def select(self, candidates: dict) -> tuple:
        return select_by_lds(candidates, self.ground.val_masks, self.ground.val_margins)

    def caption(self) -> str:
        return ACCOUNTING.format(s=self.selection_models, rate=1000 * self.seconds_per_model)


def run_trak(cmp: Comparison, features: FeatureStore, num_models: list[int], proj_dims: list[int], ridges: list[float],
             method: str = "trak", **knobs) -> None:
    """TRAK at every (M, k): ridge chosen on validation, then optional soft-thresholding with
    its threshold chosen on validation too. Per-model kernel terms are summed cumulatively,
    so all M share the work; each M is charged the featurisation of its M checkpoints at k.
    ``features``: a :class:`FeatureStore` or any view with its ``features(models, k)`` and
    ``seconds(M, k)``. ``method`` and ``knobs`` name the records (a variant's output, its timesteps)."""
    for k in proj_dims:
        sums = {r: 0.0 for r in ridges}
        q_sum, own = 0.0, 0.0
        for m in range(max(num_models)):
            t0 = time.perf_counter()
            f = features.features([m], k)[0]
            f = ModelFeatures(f.train, f.targets[cmp.ground.cols], f.q)
            for r, term in kernel_terms(f, ridges).items():
                sums[r] = sums[r] + term
            q_sum = q_sum + f.q.double()
            own += time.perf_counter() - t0
            M = m + 1
            if M not in num_models:
                continue
            t0 = time.perf_counter()
            candidates = {r: ((q_sum / M)[:, None] * sums[r] / M).numpy() for r in ridges}
            best, val = cmp.select(candidates)
            tau = candidates[best]
            thresholds = {float(t): soft_threshold(tau, t) for t in np.quantile(np.abs(tau), [0.5, 0.8, 0.9, 0.95])}
            t_best, _ = cmp.select({0.0: tau, **thresholds})
            seconds = own + time.perf_counter() - t0 + float(features.seconds(M, k).sum())
            rec = cmp.add(method, M, seconds, tau, True, proj_dim=k, ridge=best,
                          val_lds_by_ridge={str(r): v for r, v in val.items()}, **knobs)
            rec["lds_soft_threshold"] = linear_datamodeling_score({0.0: tau, **thresholds}[t_best], cmp.ground.masks,
                                                                  cmp.ground.actual_mean)
            rec["soft_threshold"] = t_best
            rec["eval_lds_by_ridge"] = {str(r): linear_datamodeling_score(c, cmp.ground.masks, cmp.ground.actual_mean)
                                        for r, c in candidates.items()}


def run_datamodels(cmp: Comparison, fits: Iterable[tuple[int, datamodels.Datamodels, float]]) -> None:
    """Datamodels from the first N models, for each N: the fits of stage fit_datamodels
    (``datamodels.load_fits``, read one at a time; lambda chosen on each fit's own validation
    split), each charged the wall seconds its fit took there."""
    for n, dm, seconds in fits:
        cmp.add("datamodels", n, seconds, dm.weight[:, cmp.ground.cols], False)


def run_empirical_influence(cmp: Comparison, store: SubsetStore, counts: list[int]) -> None:
    done = np.flatnonzero(store.completed())
    for n in counts:
        t0 = time.perf_counter()
        scores = baselines.empirical_influence(store.read("masks", done[:n]), store.read("test_outputs", done[:n])[:, cmp.ground.cols])
        cmp.add("empirical_influence", n, time.perf_counter() - t0, scores, False)


def load_checkpoints(run: SubsetRun, store: SubsetStore, count: int) -> tuple[list, list[float]]:
    """The first ``count`` checkpoints of ``run`` on the device every method is timed on, and the
    seconds each took to load (charged to the methods that use it)."""
    device = resolve_device(run.device)
    models, load = [], []
    for m in range(count):
        t0 = time.perf_counter()
        models.append(run.load_checkpoint(store, m, device))
        load.append(time.perf_counter() - t0)
    return models, load


def _test_tensors(cmp: Comparison, run: SubsetRun) -> tuple:
    x_tr, y_tr, x_te, y_te = run.dataset_().tensors(resolve_device(run.device))
    return x_tr, y_tr, x_te[cmp.ground.cols], y_te[cmp.ground.cols]


def _checkpoint_averages(cmp: Comparison, method: str, score, models: list, load: list[float], ensemble_sizes: list[int],
                         **knobs) -> None:
    """Record ``method`` at each M of ``ensemble_sizes``: ``score(model) -> (n, t)`` averaged over the
    first M of ``models``, charged their load seconds and its own time."""
    total, own = 0.0, 0.0
    for m in range(max(ensemble_sizes)):
        t0 = time.perf_counter()
        total = total + score(models[m])
        own += load[m] + time.perf_counter() - t0
        if m + 1 in ensemble_sizes:
            cmp.add(method, m + 1, own, total / (m + 1), False, **knobs)


def run_gradient_similarity(cmp: Comparison, run: SubsetRun, models: list, load: list[float], ensemble_sizes: list[int]) -> tuple:
    """Gradient dot product and cosine averaged over the first M of ``models``, for each M in
    ``ensemble_sizes``, over every parameter or the trailing layers whose per-example gradients
    fit :data:`~datalens.attribution.baselines.GRADIENT_BUDGET` (the records' ``params``).
    Returns those parameter names and their description."""
    x_tr, y_tr, x_te, y_te = _test_tensors(cmp, run)
    task = run.make_task()
    names, params = baselines.params_within(models[0], len(x_tr) + len(x_te))
    for name, fn in (("grad_dot", baselines.grad_dot), ("grad_cosine", baselines.grad_cosine)):
        _checkpoint_averages(cmp, name, lambda model: fn(task, model, x_tr, y_tr, x_te, y_te, names), models, load, ensemble_sizes,
                             params=params)
    return names, params


def run_embedding_similarity(cmp: Comparison, run: SubsetRun, models: list, load: list[float], ensemble_sizes: list[int]) -> None:
    """The model's own embedding similarity (:func:`~datalens.attribution.baselines.embedding_similarity`),
    averaged over the first M of ``models`` for each M in ``ensemble_sizes``."""
    x_tr, y_tr, x_te, y_te = _test_tensors(cmp, run)
    task = run.make_task()
    _checkpoint_averages(cmp, "embedding_similarity", lambda model: baselines.embedding_similarity(task, model, x_tr, y_tr, x_te, y_te),
                         models, load, ensemble_sizes)


def run_section_methods(cmp: Comparison, run: SubsetRun, store: SubsetStore, cp: dict, executor=None) -> None:
    """Every method of a section run (``clip``, ``fact_tracing``, ``text_classification``) into
    ``cmp``, under stage 05's accounting: TRAK at every (M, k) of ``cp["trak"]`` (features of the
    run's checkpoints, resumable), datamodels at ``cp["datamodels"]["model_counts"]`` and on every
    model (when the section has ``datamodels``), empirical influence at those counts, gradient dot
    product and cosine, EK-FAC influence (when the section gives ``attribution.ekfac_dampings``)
    and the model's embedding similarity averaged over ``ensemble_sizes`` checkpoints, and TracIn
    over ``tracin_epochs``."""
    tp, ap, d = cp["trak"], cp["attribution"], cp.get("datamodels")
    device = resolve_device(run.device)
    job = FeatureJob(run, resolve_location(cp, tp["store"]), tuple(tp["proj_dims"]), tp["proj_type"], run.seed,
                     backend=projection.projector_backend(device))
    run_trak(cmp, featurize_checkpoints(job, max(tp["num_models"]), executor=executor), tp["num_models"], tp["proj_dims"], tp["ridge_grid"])
    done = int(store.completed().sum())
    counts = sorted({n for n in (d["model_counts"] if d else []) if n <= done} | {done})
    if d:
        solver = dict(num_lambdas=d["num_lambdas"], eps=d["eps"], max_iter=d["max_iter"], tol=d["tol"], device=str(device))
        run_datamodels(cmp, ((n, dm, seconds) for n, dm, _, seconds in datamodels.timed_fits(store, counts, d["val_fraction"], run.seed,
                                                                                               solver)))
    run_empirical_influence(cmp, store, counts)
    models, load = load_checkpoints(run, store, max(ap["ensemble_sizes"]))
    run_gradient_similarity(cmp, run, models, load, ap["ensemble_sizes"])
    if ap.get("ekfac_dampings"):  # where kronfluence applies (a predictive distribution and linear layers to factor)
        run_ekfac(cmp, run, models, load, ap["ensemble_sizes"], ap["ekfac_dampings"])
    run_embedding_similarity(cmp, run, models, load, ap["ensemble_sizes"])
    run_tracin(cmp, run, store.read("masks", np.arange(1))[0], ap["tracin_epochs"])


def run_gradient_baselines(cmp: Comparison, run: SubsetRun, store: SubsetStore, ensemble_sizes: list[int],
                           dampings: list[float], ekfac_dampings: list[float], cg_iters: int = 30) -> None:
    """Gradient dot product and cosine and EK-FAC influence (averaged over M checkpoints),
    representation similarity, influence functions (explicit Hessian over the last layer; CG
    over all parameters, or the trailing layers whose per-example gradients fit
    :data:`~datalens.attribution.baselines.GRADIENT_BUDGET`, as the records' ``params`` say).
    Dampings are chosen on validation models. Checkpoint loading is timed."""
    x_tr, y_tr, x_te, y_te = _test_tensors(cmp, run)
    task = run.make_task()
    models, load = load_checkpoints(run, store, max(ensemble_sizes))
    names, params = run_gradient_similarity(cmp, run, models, load, ensemble_sizes)
    run_ekfac(cmp, run, models, load, ensemble_sizes, ekfac_dampings)
    t0 = time.perf_counter()
    cmp.add("representation_similarity", 1, load[0] + time.perf_counter() - t0,
            baselines.representation_similarity(models[0], x_tr, x_te), False)
    mask = store.read("masks", np.arange(1))[0]
    t0 = time.perf_counter()
    candidates = baselines.influence_explicit(task, models[0], x_tr, y_tr, mask, x_te, y_te, damping=list(dampings),
                                                param_names=baselines.last_layer_params(models[0]))
    best, _ = cmp.select(candidates)
    cmp.add("influence_explicit", 1, load[0] + time.perf_counter() - t0, candidates[best], True, damping=best, params="last layer")
    # CG over all parameters: every damping from one Krylov sequence; those whose system is indefinite drop out
    t0 = time.perf_counter()
    candidates = baselines.influence_cg(task, models[0], x_tr, y_tr, mask, x_te, y_te, damping=list(dampings), iters=cg_iters,
                                        param_names=names)
    if candidates:
        best, _ = cmp.select(candidates)
        cmp.add("influence_cg", 1, load[0] + time.perf_counter() - t0, candidates[best], True, damping=best, params=params)


def run_ekfac(cmp: Comparison, run: SubsetRun, models: list, load: list[float], ensemble_sizes: list[int],
              dampings: list[float]) -> None:
    """EK-FAC influence (kronfluence) averaged over the first M of ``models`` for each M in
    ``ensemble_sizes``, the damping chosen on validation models at each M; each checkpoint's
    Fisher labels seeded from the run's seed and its index."""
    x_tr, y_tr, x_te, y_te = _test_tensors(cmp, run)
    task = run.make_task()
    sums, own = {d: 0.0 for d in dampings}, 0.0
    for m in range(max(ensemble_sizes)):
        t0 = time.perf_counter()
        for d, s in baselines.ekfac_influence(task, models[m], x_tr, y_tr, x_te, y_te, dampings, seed=run.seed + m).items():
            sums[d] = sums[d] + s
        own += load[m] + time.perf_counter() - t0
        if m + 1 in ensemble_sizes:
            t0 = time.perf_counter()
            best, _ = cmp.select({d: s / (m + 1) for d, s in sums.items()})
            cmp.add("ekfac_influence", m + 1, own + time.perf_counter() - t0, sums[best] / (m + 1), True, damping=best)


def run_tracin(cmp: Comparison, run: SubsetRun, mask: np.ndarray, snapshot_epochs: list[int]) -> None:
    """TracIn over snapshots of one model's training. The model is retrained here only because
    the store keeps final weights; it is charged as one model at the common per-model rate."""
    device = resolve_device(run.device)
    x_tr, y_tr, x_te, y_te = _test_tensors(cmp, run)
    seeds, task = run.model_seeds(0, 1), run.make_task()
    trained = train_models(task, [m.to(device) for m in init_models(run.build_model, seeds)], x_tr, y_tr, mask[None], seeds,
                           run.settings, snapshot_epochs=snapshot_epochs)
    t0 = time.perf_counter()
    checkpoints = []
    for state in trained.snapshots[0]:
        m = run.build_model().to(device)
        m.load_state_dict(state)
        checkpoints.append(m)
    lrs = interval_lrs(run.settings, snapshot_epochs, run.settings.steps_per_epoch(int(mask.sum())))  # under the schedule
    names, params = baselines.params_within(checkpoints[0], len(x_tr) + len(x_te))
    scores = baselines.tracin(task, checkpoints, lrs, x_tr, y_tr, x_te, y_te, names)
    cmp.add("tracin", 1, time.perf_counter() - t0, scores, False, checkpoints=len(checkpoints), params=params)


def overtaking_point(records: list[dict], method: str = "datamodels", rival: str = "trak", proj_dim: int | None = None) -> dict:
    """The cheapest point of ``method`` whose LDS beats the rival's best LDS at any budget, with
    both budgets; ``{}`` when it never does."""
    rivals = [r for r in records if r["method"] == rival and (proj_dim is None or r.get("proj_dim") == proj_dim)]
    if not rivals:
        return {}
    top = max(rivals, key=lambda r: r["lds"])
    better = sorted((r for r in records if r["method"] == method and r["lds"] > top["lds"]), key=lambda r: r["seconds"])
    if not better:
        return {}
    first = better[0]
    return {"models": first["models"], "seconds": first["seconds"], "lds": first["lds"], f"{rival}_best_lds": top["lds"],
            f"{rival}_best_models": top["models"], f"{rival}_best_seconds": top["seconds"]}


def stage_summary(cmp: Comparison, proj_dim: int) -> dict:
    """What stage attribution_comparison writes: the rate and accounting, every record, each
    method's best LDS and where datamodels overtake TRAK at projection dimension ``proj_dim``."""
    recs = cmp.records
    return {"seconds_per_model": cmp.seconds_per_model, "selection_models": cmp.selection_models, "accounting": cmp.caption(),
            "records": recs, "best_lds": {m: max(r["lds"] for r in recs if r["method"] == m) for m in sorted({r["method"] for r in recs})},
            "datamodels_overtake_trak": overtaking_point(recs, proj_dim=proj_dim)}
