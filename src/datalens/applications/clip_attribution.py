"""Stage clip: the TRAK paper's contrastive (CLIP) case on the digits with captions.

The ``clip`` section of the params is a run of its own (``clip.data``, ``clip.model``,
``clip.train``, ``clip.evaluation``, ...; the device and executor are shared), checked key by key
as its top-level counterpart (:data:`datalens.core.config.SECTIONS`). Its subset models are
two-tower models (:mod:`datalens.core.two_tower`) trained by InfoNCE, and every model records the
CLIP output of each test pair against that pair's fixed negatives
(:class:`datalens.tasks.contrastive.ContrastiveTask`): the LDS ground truth. The methods are
scored by :mod:`datalens.applications.comparison` under stage 05's accounting; the counterfactual
(:func:`datalens.applications.counterfactuals.removal_effects`) measures the pair's cosine
similarity after removing each method's top examples.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np

from datalens.applications import comparison
from datalens.attribution import projection, trak
from datalens.attribution.datamodels import Datamodels, fit_from_store
from datalens.core.config import resolve_location
from datalens.core.store import SubsetStore
from datalens.training.engine import resolve_device
from datalens.training.runs import SubsetRun, eval_run, train_on_masks


def section_params(p: dict) -> dict:
    """The ``clip`` section as a run's params: its own data, model, train, ... beside the shared
    ``device``, ``execution`` and repo root."""
    return {**p["clip"], "device": p["device"], "execution": p["execution"], "_root": p["_root"]}


def clip_runs(p: dict) -> tuple[SubsetRun, SubsetRun]:
    """The subset run and the held-out evaluation run of stage params ``p``."""
    cp = section_params(p)
    return SubsetRun.from_params(cp, task="contrastive"), eval_run(cp, task="contrastive")


def datamodel_fits(store, counts: list[int], d: dict, seed: int, device: str) -> Iterator[tuple[int, Datamodels, float]]:
    """Datamodels on the first N models of ``store`` for each N of ``counts`` (lambda chosen on a
    ``d["val_fraction"]`` split of those N), each with the wall seconds its fit took."""
    for n in counts:
        t0 = time.perf_counter()
        dm, _ = fit_from_store(store, num_models=n, val_fraction=d["val_fraction"], seed=seed, num_lambdas=d["num_lambdas"],
                               eps=d["eps"], max_iter=d["max_iter"], tol=d["tol"], device=device, progress=False)
        yield n, dm, time.perf_counter() - t0


def run_methods(cmp: comparison.Comparison, run: SubsetRun, store: SubsetStore, cp: dict, executor=None) -> None:
    """Every method of the stage into ``cmp``, under stage 05's accounting: TRAK at every (M, k) of
    ``cp["trak"]`` (features of the run's checkpoints, resumable), datamodels at
    ``cp["datamodels"]["model_counts"]`` and on every model (when the section has ``datamodels``),
    empirical influence at those counts, gradient dot product and cosine and embedding similarity
    averaged over ``ensemble_sizes`` checkpoints, and TracIn over ``tracin_epochs``."""
    tp, ap, d = cp["trak"], cp["attribution"], cp.get("datamodels")
    device = resolve_device(run.device)
    job = trak.FeatureJob(run, resolve_location(cp, tp["store"]), tuple(tp["proj_dims"]), tp["proj_type"], run.seed,
                          backend=projection.projector_backend(device))
    features = trak.featurize_checkpoints(job, max(tp["num_models"]), executor=executor)
    comparison.run_trak(cmp, features, tp["num_models"], tp["proj_dims"], tp["ridge_grid"])
    done = int(store.completed().sum())
    counts = sorted({n for n in (d["model_counts"] if d else []) if n <= done} | {done})
    if d:
        comparison.run_datamodels(cmp, datamodel_fits(store, counts, d, run.seed, str(device)))
    comparison.run_empirical_influence(cmp, store, counts)
    models, load = comparison.load_checkpoints(run, store, max(ap["ensemble_sizes"]))
    comparison.run_gradient_similarity(cmp, run, models, load, ap["ensemble_sizes"])
    comparison.run_embedding_similarity(cmp, run, models, load, ap["ensemble_sizes"])
    comparison.run_tracin(cmp, run, store.read("masks", np.arange(1))[0], ap["tracin_epochs"])


def cosine_retrain(run: SubsetRun, repeats: int, cols: slice | np.ndarray = slice(None)):
    """``retrain(masks (m, n)) -> (repeats, m, t)``: the cosine similarity of the test pairs ``cols``
    (the comparison's targets) under models trained on each mask, repeat r with one seed for
    every mask."""
    task = run.make_task()
    return lambda masks: train_on_masks(run, masks, repeats, measure=lambda raw, y: task.cosine(raw), average=False)[..., cols]


def counterfactual_targets(num_scored: int, num_targets: int, seed: int) -> np.ndarray:
    """Seeded sample of ``num_targets`` of the comparison's score columns, in order."""
    return np.sort(np.random.default_rng([seed, 29]).choice(num_scored, num_targets, replace=False))


def captioner(run: SubsetRun) -> Callable[[np.ndarray], str]:
    """``caption(targets (L + K,)) -> str``: a pair's caption from its token ids (the pairs dataset's
    class names are its vocabulary, id 0 the pad; the K negatives' indices are not words)."""
    ds, length = run.dataset_(), run.make_task().length
    return lambda targets: " ".join(ds.class_names[i] for i in np.asarray(targets)[:length] if i > 0)
