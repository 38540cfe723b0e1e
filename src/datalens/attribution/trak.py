"""TRAK: attribution from a few models via randomly projected per-example gradients
(Park et al., 2023, Algorithm 1; docs/methods.md).

Per model m (a checkpoint of a subset model):

* ``g_i = d f(z_i) / d theta`` for the task's output f (per-example, :func:`datalens.tasks.gradients.per_example_gradients`);
* ``phi_i = P_m^T g_i`` with P_m a seeded d x k JL matrix (:mod:`datalens.attribution.projection`);
* ``Q_i``, the task's out-to-loss term (``1 - p_i`` for the classification margin).

Scores: ``tau = diag(avg_m Q_m) * avg_m [ Phi_m (Phi_m^T Phi_m + lambda_m I)^{-1} phi_m(x) ]``
with ``lambda_m = ridge * trace(Phi_m^T Phi_m) / k``, a ridge relative to the kernel's
spectrum (without it the kernel is singular once k nears n). ``ridge`` is chosen on
validation subset models that the LDS evaluation never sees. Optional soft-thresholding
``S(tau, t) = sign(tau) max(|tau| - t, 0)``, with t also chosen on validation models
(the paper has it; the public library does not).

Features of stored checkpoints go to a :class:`~datalens.core.store.ResumableStore`, one unit
per checkpoint, with the seconds each step took, so a comparison can charge each k its
own featurisation cost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from datalens.training.engine import keep_freed_memory, resolve_device
from datalens.core.execution import LocalExecutor
from datalens.tasks.base import Task
from datalens.tasks.gradients import out_to_loss, per_example_gradients
from datalens.core.progress import progress_bar
from datalens.attribution.projection import PROJECTOR_VERSION, Projector
from datalens.training.runs import SubsetRun
from datalens.core.store import ArraySpec, ResumableStore, located, open_existing


@dataclass
class ModelFeatures:
    """One model's TRAK features: train (n, k), targets (t, k), Q (n,)."""

    train: torch.Tensor
    targets: torch.Tensor
    q: torch.Tensor


GRADIENT_CHUNK_BYTES = 4 << 30  # float32 per-example gradients held at once while featurising


def gradient_chunk(num_params: int, most: int = 1024) -> int:
    """Examples per gradient chunk: ``most``, or fewer so that a chunk's float32 gradients stay within
    :data:`GRADIENT_CHUNK_BYTES` (vmap's intermediates add about four times that, as
    ``benchmarks/scale.py`` measures): 163 examples for ResNet-9's 6.6M parameters."""
    return max(1, min(most, GRADIENT_CHUNK_BYTES // (4 * num_params)))


def featurize(task: Task, model: nn.Module, x_train, y_train, x_targets, y_targets, proj_dim: int | Sequence[int] | None,
              seed: int, model_index: int, kind: str = "rademacher", param_names: Sequence[str] | None = None,
              chunk: int | None = None, dtype: torch.dtype = torch.float32, backend: str = "torch", timings: dict | None = None):
    """Projected per-example gradients of ``task``'s output for one model, for training and target examples.

    Gradients are computed and projected ``chunk`` examples at a time (train and targets
    in one stream), so at most (chunk, d) gradients are held (by default
    :func:`gradient_chunk`: 1024, or fewer where d is large); larger chunks make the
    projection GEMM more efficient. ``proj_dim=None`` keeps the raw gradients; a list of
    dimensions returns {k: ModelFeatures} from one gradient pass. ``timings``, when given,
    receives the seconds spent on gradients (with Q) and on each k's projection, so that
    each k can be charged its own cost.
    """
    if x_train.device.type == "cpu":
        keep_freed_memory()
    dims = list(proj_dim) if isinstance(proj_dim, (list, tuple)) else [proj_dim]
    params = dict(model.named_parameters())
    chunk = chunk or gradient_chunk(sum(params[n].numel() for n in (param_names or params)))
    x_all, y_all = torch.cat([x_train, x_targets]), torch.cat([y_train, y_targets])
    parts: dict = {k: [] for k in dims}
    projectors: dict = {}
    clock = {"gradients": 0.0, **{f"projection_k{k}": 0.0 for k in dims if k is not None}}
    for a in range(0, len(x_all), chunk):
        t0 = time.perf_counter()
        g = per_example_gradients(model, x_all[a:a + chunk], y_all[a:a + chunk], task, param_names, chunk, dtype)
        clock["gradients"] += time.perf_counter() - t0
        for k in dims:
            if k is None:  # no projection: the raw gradients (small models, tests)
                parts[k].append(g)
                continue
            t0 = time.perf_counter()
            projectors.setdefault(k, Projector(g.shape[1], k, seed, model_index, kind, backend=backend))
            parts[k].append(projectors[k].project(g))
            clock[f"projection_k{k}"] += time.perf_counter() - t0
    n = len(x_train)
    t0 = time.perf_counter()
    q = out_to_loss(model, x_train, y_train, task)
    clock["gradients"] += time.perf_counter() - t0
    if timings is not None:
        timings.update(clock)
    out = {k: ModelFeatures(torch.cat(p)[:n], torch.cat(p)[n:], q) for k, p in parts.items()}
    return out if isinstance(proj_dim, (list, tuple)) else out[proj_dim]


def kernel_terms(f: ModelFeatures, ridge: float | Sequence[float], target_block: int = 4096):
    """One model's ``Phi (Phi^T Phi + lambda I)^{-1} phi(x)``: (n, t), with lambda = ridge * trace / k.

    Given a list of ridges, returns {ridge: (n, t)}, forming Phi^T Phi once. Targets go in
    blocks, so the (k, t) solve never exceeds one block.
    """
    ridges = [ridge] if isinstance(ridge, (int, float)) else list(ridge)
    kern = _kernel(f)
    out = {}
    for r in ridges:
        fac = _factor(f, r, kern)
        out[r] = torch.cat([_solve(f, fac, a, a + target_block) for a in range(0, f.targets.shape[0], target_block)], 1)
    return out[ridges[0]] if isinstance(ridge, (int, float)) else out


def _kernel(f: ModelFeatures) -> torch.Tensor:
    # Phi (Phi^T Phi + lam I_k)^{-1} = (Phi Phi^T + lam I_n)^{-1} Phi: factor the smaller system.
    # The big products run in the features' precision; the factorisation in float64, where it matters.
    phi = f.train
    return (phi @ phi.T if phi.shape[1] > phi.shape[0] else phi.T @ phi).double()


def _factor(f: ModelFeatures, ridge: float, kern: torch.Tensor | None = None) -> torch.Tensor:
    """Cholesky factor of the kernel plus lambda I, lambda = ridge * trace / k."""
    kern = _kernel(f) if kern is None else kern
    eye = torch.eye(kern.shape[0], dtype=kern.dtype, device=kern.device)
    return torch.linalg.cholesky(kern + ridge * (torch.trace(kern) / f.train.shape[1]) * eye)


def _solve(f: ModelFeatures, chol: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """(n, b - a) float64: Phi (Phi^T Phi + lambda I)^{-1} phi(x) for targets a..b-1."""
    phi, tgt = f.train, f.targets[a:b]
    if phi.shape[1] > phi.shape[0]:
        return torch.cholesky_solve((phi @ tgt.T).double(), chol)
    return (phi @ torch.cholesky_solve(tgt.double().T, chol).to(phi.dtype)).double()


SCORE_BUDGET = 2 << 30  # bytes of float64 scores held in memory; larger score matrices go to a store


class ScoreStore(ResumableStore):
    """Attribution scores too large for memory, written by blocks of targets: ``scores`` (t, n)
    float32 (row x = every training example's score for target x), resumable per block."""

    kind = "datalens score store"

    def matrix(self, targets: slice | np.ndarray = slice(None)) -> np.ndarray:
        """(n, len(targets)) float64 scores of the asked-for targets."""
        return self.read("scores", targets).astype(np.float64).T


def score_blocks(features: Sequence[ModelFeatures], ridge: float, target_block: int = 4096, only: set[int] | None = None,
                 budget: int = SCORE_BUDGET):
    """Algorithm 1 without thresholding, a block of targets at a time: yields (start, (n, b) float64)
    = diag(mean Q) * mean_m Phi_m (Phi_m^T Phi_m + lambda_m I)^{-1} phi_m(x) for targets
    start..start+b-1; ``only`` restricts the work to those block numbers.

    Streams over models: blocks go in groups whose float64 scores fit ``budget`` bytes, and for
    each group every model is read once (``features`` may load lazily, as
    :meth:`FeatureStore.features` does), factored and dropped. So at most one model's features
    and factor and ``budget`` bytes of scores are held, whatever the number of models; a
    model is refactored once per group (one group whenever the scores fit)."""
    if not len(features):
        raise ValueError("TRAK needs at least one model (trak.num_models >= 1)")
    first = features[0]
    n, t = first.train.shape[0], first.targets.shape[0]
    del first
    blocks = [a for a in range(0, t, target_block) if only is None or a // target_block in only]
    per_group = max(1, budget // (8 * n * target_block))
    for g in range(0, len(blocks), per_group):
        group = blocks[g:g + per_group]
        acc, q_sum = {a: 0.0 for a in group}, 0.0
        for m in range(len(features)):
            f = features[m]
            fac = _factor(f, ridge)
            for a in group:
                acc[a] = acc[a] + _solve(f, fac, a, a + target_block)
            q_sum = q_sum + f.q.double()
            del f, fac
        q = q_sum / len(features)
        for a in group:
            yield a, (q[:, None] * (acc.pop(a) / len(features))).cpu().numpy()


def trak_scores(features: Sequence[ModelFeatures], ridge: float, store: str | None = None,
                budget: int = SCORE_BUDGET, target_block: int = 4096) -> np.ndarray | ScoreStore:
    """TRAK scores (n, t). Held in memory as float64 while they fit ``budget`` bytes; beyond it
    they are written, a block of targets at a time, to a :class:`ScoreStore` at ``store``
    (which is then required, and returned)."""
    if not len(features):
        raise ValueError("TRAK needs at least one model (trak.num_models >= 1)")
    first = features[0]
    n, t = first.train.shape[0], first.targets.shape[0]
    del first
    if n * t * 8 <= budget:
        return np.concatenate([block for _, block in score_blocks(features, ridge, target_block, budget=budget)], axis=1)
    if store is None:
        raise ValueError(f"TRAK scores of {n} training examples x {t} targets need {n * t * 8 / 2**30:.1f} GiB as float64, "
                         f"more than the budget of {budget / 2**30:.1f} GiB: give a store to write them to")
    out = ScoreStore.open(store, {"trak.ridge": ridge, "models": len(features), "n_train": n}, t, target_block,
                          {"scores": ArraySpec((n,))})
    for a, block in score_blocks(features, ridge, target_block, only=set(out.missing_blocks()), budget=budget):
        out.write_block(a // target_block, {"scores": block.T.astype(np.float32)})
    return out


def soft_threshold(scores: np.ndarray, threshold: float) -> np.ndarray:
    return np.sign(scores) * np.maximum(np.abs(scores) - threshold, 0.0)


# --- features of stored checkpoints: resumable per model, fanned out through the executor ---

@dataclass(frozen=True)
class FeatureJob:
    """Featurize checkpoints of a subset run for every projection dimension in ``proj_dims``."""

    run: SubsetRun  # whose store holds the checkpoints
    store: str  # the trak.store param: a folder of feature stores by identity, or one .zarr store (see ``location``)
    proj_dims: tuple[int, ...]
    proj_type: str = "rademacher"
    seed: int = 0
    param_names: tuple[str, ...] | None = None
    backend: str = "torch"  # see datalens.attribution.projection.projector_backend; recorded, since it changes P
    task_options: tuple[tuple[str, object], ...] = ()  # what the task attributes (SubsetRun.make_task), e.g. a diffusion output

    def identity(self) -> dict:
        """What the features depend on: the run's identity (through its checkpoints), P and the task's options."""
        options = {"trak.task_options": dict(self.task_options)} if self.task_options else {}  # absent when unused: older stores stay valid
        return {"projector_version": PROJECTOR_VERSION, "trak.proj_dims": list(self.proj_dims),
                "trak.proj_type": self.proj_type, "trak.seed": self.seed, "trak.backend": self.backend,
                "trak.param_names": list(self.param_names) if self.param_names else None, **options,
                **{f"run.{k}": v for k, v in self.run.identity().items()}}

    @property
    def location(self) -> str:
        """Where the features go: ``<store>/<identity hash>.zarr``, or ``store`` itself if it ends in ``.zarr``."""
        return located(self.store, self.identity())


class FeatureStore(ResumableStore):
    """TRAK features, one unit per checkpoint: ``train_k{k}`` (M, n, k), ``targets_k{k}`` (M, t, k),
    ``q`` (M, n), and seconds per step: ``seconds_load``, ``seconds_gradients``, ``seconds_projection_k{k}`` (M,)."""

    kind = "datalens TRAK feature store"

    @classmethod
    def for_job(cls, job: FeatureJob, num_models: int, n_train: int, n_targets: int) -> "FeatureStore":
        arrays = {"q": ArraySpec((n_train,)), "seconds_load": ArraySpec((), "float64"), "seconds_gradients": ArraySpec((), "float64")}
        for k in job.proj_dims:
            arrays.update({f"train_k{k}": ArraySpec((n_train, k)), f"targets_k{k}": ArraySpec((n_targets, k)),
                           f"seconds_projection_k{k}": ArraySpec((), "float64")})
        return cls.open(job.location, job.identity(), num_models, 1, arrays)

    def seconds(self, models: int, proj_dim: int) -> np.ndarray:
        """(models,) seconds it took to featurise each of the first ``models`` checkpoints at ``proj_dim`` alone."""
        rows = slice(0, models)
        return self.read("seconds_load", rows) + self.read("seconds_gradients", rows) + self.read(f"seconds_projection_k{proj_dim}", rows)

    def features(self, models: Sequence[int], proj_dim: int) -> "StoredFeatures":
        """The features of ``models`` at ``proj_dim``, each read from the store when indexed."""
        return StoredFeatures(self, list(models), proj_dim)


@dataclass(frozen=True)
class StoredFeatures(Sequence):
    """A lazy sequence of :class:`ModelFeatures`: item i is read from the store when asked for, so
    :func:`trak_scores` holds one model's (n + t, k) features at a time, not every model's."""

    store: FeatureStore
    models: list[int]
    proj_dim: int

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, i: int) -> ModelFeatures:
        m, g = self.models[i], self.store.group
        return ModelFeatures(torch.as_tensor(g[f"train_k{self.proj_dim}"][m]), torch.as_tensor(g[f"targets_k{self.proj_dim}"][m]),
                             torch.as_tensor(g["q"][m]))


def featurize_checkpoint(job: FeatureJob, model_index: int) -> dict:
    """Featurize checkpoint ``model_index`` at every k and write it; completed is set last."""
    t0 = time.perf_counter()
    run = job.run
    device = resolve_device(run.device)
    model = run.load_checkpoint(run.open_store(), model_index, device)
    load = time.perf_counter() - t0
    timings: dict = {}
    feats = featurize(run.make_task(**dict(job.task_options)), model, *run.dataset_().tensors(device), list(job.proj_dims), job.seed, model_index, job.proj_type,
                      job.param_names, backend=job.backend, timings=timings)
    store = open_existing(job.location, "r+", FeatureStore)
    values = {"q": next(iter(feats.values())).q.cpu().numpy()[None], "seconds_load": np.array([load]),
              "seconds_gradients": np.array([timings["gradients"]])}
    for k, f in feats.items():
        values.update({f"train_k{k}": f.train.cpu().numpy()[None], f"targets_k{k}": f.targets.cpu().numpy()[None],
                       f"seconds_projection_k{k}": np.array([timings[f"projection_k{k}"]])})
    store.write_block(model_index, values)
    return {"model": model_index, "seconds": time.perf_counter() - t0}


def target_features(job: FeatureJob, model_index: int, x: torch.Tensor, y: torch.Tensor, proj_dim: int, **task_options) -> torch.Tensor:
    """Features (t, k) of new targets (x, y) under checkpoint ``model_index`` of ``job``: their
    gradients projected by the same P as the job's stored features, so they pair with those
    training features (:func:`kernel_terms`) without featurising the training set again.
    ``task_options`` change the job's for these targets (e.g. targets that carry draws of their own)."""
    run = job.run
    device = resolve_device(run.device)
    model = run.load_checkpoint(run.open_store(), model_index, device)
    task = run.make_task(**{**dict(job.task_options), **task_options})
    g = per_example_gradients(model, x.to(device), y.to(device), task, job.param_names)
    return Projector(g.shape[1], proj_dim, job.seed, model_index, job.proj_type, backend=job.backend).project(g)


def featurize_checkpoints(job: FeatureJob, num_models: int, executor=None, progress: bool = True) -> FeatureStore:
    """Featurize checkpoints 0..num_models-1 that the feature store lacks."""
    if num_models > job.run.num_checkpoints:
        raise ValueError(f"TRAK asks for {num_models} models but train.num_checkpoints={job.run.num_checkpoints}; raise it")
    ds = job.run.dataset_()
    store = FeatureStore.for_job(job, num_models, ds.n_train, ds.n_test)
    todo = [b for b in store.missing_blocks() if b < num_models]
    executor = executor or LocalExecutor()
    with progress_bar(total=num_models, initial=num_models - len(todo), unit="model", desc="TRAK features", disable=not progress) as bar:
        for _ in executor.map_unordered(featurize_checkpoint, [(job, m) for m in todo], describe=lambda a: f"checkpoint {a[1]}"):
            bar.update(1)
    return store
