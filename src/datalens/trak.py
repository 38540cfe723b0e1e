"""TRAK: attribution from a few models via randomly projected per-example gradients
(METHODS.md section 4; Park et al., 2023, Algorithm 1).

Per model m (a checkpoint of a subset model):

* ``g_i = d f(z_i) / d theta`` (per-example, ``torch.func.vmap(grad)``), over all
  parameters or a named subset (only the gradients asked for are computed);
* ``phi_i = P_m^T g_i`` with P_m a seeded d x k JL matrix, generated in fixed chunks of
  rows, so any projection block size gives the same P and the whole matrix is never
  held when it would not fit;
* ``Q_i = 1 - p_i`` (the out-to-loss term of the margin).

Scores: ``tau = diag(avg_m Q_m) * avg_m [ Phi_m (Phi_m^T Phi_m + lambda_m I)^{-1} phi_m(x) ]``
with ``lambda_m = ridge * trace(Phi_m^T Phi_m) / k``, a ridge relative to the kernel's
spectrum (without it the kernel is singular once k nears n). ``ridge`` is chosen on
validation subset models that the LDS evaluation never sees. Optional soft-thresholding
``S(tau, t) = sign(tau) max(|tau| - t, 0)``, with t also chosen on validation models
(the paper has it; the public library does not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from datalens.training import margins_from_logits

PROJECTION_CHUNK = 1024  # rows of P per seeded generator call; fixes P independently of block size
PROJECTOR_VERSION = 2  # bump whenever P's generation changes: feature stores record it and refuse a mismatch


class ModelOutput:
    """What the model outputs for attribution, and its out-to-loss term.

    Subclass for other tasks: ``output`` returns one scalar per example (the function
    attributed), ``out_to_loss`` the derivative factor Q of the loss in that output.
    """

    def output(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def out_to_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClassificationMargin(ModelOutput):
    """f = logit_y - logsumexp_{j != y} logit_j = log(p / (1 - p)); Q = 1 - p, so that
    dLoss/df = -Q for the cross-entropy loss."""

    def output(self, logits, y):
        return margins_from_logits(logits, y)

    def out_to_loss(self, logits, y):
        return 1.0 - torch.softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: ModelOutput | None = None,
                          param_names: Sequence[str] | None = None, chunk: int = 256,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gradients of ``task.output`` per example w.r.t. the named parameters (all by default).

    x: (n, *input_shape); y: (n,). Returns (n, d) with d the total size of those
    parameters, in ``named_parameters`` order. Only the asked-for gradients are
    computed: other parameters enter as constants.
    """
    task = task or ClassificationMargin()
    model = model.eval()
    all_params = dict(model.named_parameters())
    names = list(param_names) if param_names is not None else list(all_params)
    unknown = [n for n in names if n not in all_params]
    if unknown:
        raise ValueError(f"param_names {unknown} are not parameters of the model; it has: {', '.join(all_params)}")
    wrt = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in wrt}
    frozen.update(dict(model.named_buffers()))

    def f(p, xi, yi):
        logits = functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),))
        return task.output(logits, yi.unsqueeze(0))[0]

    g = vmap(grad(f), in_dims=(None, 0, 0))
    out = []
    for a in range(0, len(x), chunk):
        grads = g(wrt, x[a:a + chunk], y[a:a + chunk])
        out.append(torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1).to(dtype))
    return torch.cat(out)


def out_to_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: ModelOutput | None = None) -> torch.Tensor:
    task = task or ClassificationMargin()
    with torch.no_grad():
        return task.out_to_loss(model.eval()(x), y)


INT8_SLICES = 4  # 4 slices hold 29 bits of each gradient row: more than float32's 24
INT8_RADIX = 128
INT8_ROW_BLOCK = 512


def int8_slices(g: torch.Tensor, slices: int = INT8_SLICES) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Split float rows into int8 slices: g = scale * sum_j q_j / 128^j, exact to within
    float32 rounding of each entry plus 0.5 / 128^(slices-1) of ``scale`` (= each row's
    max |g| / 127).

    g: (n, d) -> ([slices x (n, d) int8], scale (n, 1)). With an integer P, g P is then a
    few exact int8 GEMMs (int32 accumulation), which run ~8x faster than one float32 GEMM
    on CPUs with VNNI: the scheme of Ozaki et al. for emulating float GEMMs with integers.
    """
    scale = g.abs().amax(1, keepdim=True)
    if not torch.isfinite(scale).all():  # int8 would turn NaN into silent garbage
        bad = torch.nonzero(~torch.isfinite(scale.flatten())).flatten()[:5].tolist()
        raise FloatingPointError(f"non-finite per-example gradients (rows {bad}...); check the model's outputs")
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny) / 127
    r = g / scale
    out = []
    for j in range(slices):
        q = r.round()
        out.append(q.to(torch.int8))
        if j < slices - 1:  # |r - q| <= 1/2, so the next slice fits in [-64, 64]
            r.sub_(q).mul_(INT8_RADIX)
    return out, scale


@dataclass(frozen=True)
class Projector:
    """A seeded d x k Johnson-Lindenstrauss matrix, never materialised whole.

    Entries are ±1/sqrt(k) (rademacher) or N(0, 1/k) (gaussian), so E[P P^T] = I and
    inner products are preserved in expectation. Row chunk c of model m comes from a
    generator seeded by (seed, m, c).
    """

    dim: int  # d
    proj_dim: int  # k
    seed: int = 0
    model_index: int = 0
    kind: str = "rademacher"
    block_rows: int = 16 * PROJECTION_CHUNK  # rows of P held at once (a P this small is generated once and kept)
    backend: str = "torch"  # or "fast_jl": MadryLab's CUDA kernel (another P, same distribution and scale)

    def __post_init__(self):
        if self.kind not in ("rademacher", "gaussian"):
            raise ValueError(f"trak.proj_type={self.kind!r} is not allowed; allowed values: rademacher, gaussian")
        if self.backend not in ("torch", "fast_jl"):
            raise ValueError(f"projector backend {self.backend!r} is not allowed; allowed values: torch, fast_jl")
        if self.proj_dim < 1:
            raise ValueError(f"trak.proj_dims must be >= 1, got {self.proj_dim}")

    def _generator(self, c: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.model_index, c, 5]).generate_state(1)[0]))

    def _signs(self, c: int) -> torch.Tensor:
        """Row chunk ``c`` of sqrt(k) P for the rademacher kind: (rows, k) int8 of ±1."""
        rows = min(PROJECTION_CHUNK, self.dim - c * PROJECTION_CHUNK)
        size = rows * self.proj_dim
        # 8 fair signs per random byte: ~2.5x cheaper than drawing normals, ~3x than randint per entry
        words = torch.randint(0, 256, (-(-size // 8),), dtype=torch.uint8, generator=self._generator(c))
        bits = ((words.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(torch.int8)
        return bits.reshape(-1)[:size].view(rows, self.proj_dim).mul_(2).sub_(1)

    def _chunk(self, c: int, device, dtype) -> torch.Tensor:
        if self.kind == "gaussian":
            rows = min(PROJECTION_CHUNK, self.dim - c * PROJECTION_CHUNK)
            block = torch.randn(rows, self.proj_dim, generator=self._generator(c))
        else:
            block = self._signs(c).to(torch.float32)
        return (block / self.proj_dim ** 0.5).to(device=device, dtype=dtype)

    def _blocks(self, make: Callable[[int], torch.Tensor], key):
        """(first row, rows of P), concatenating ``make(c)`` over row chunks c: at most
        ``block_rows`` rows at a time, or, when P fits in that, the whole P made once per
        projector and cached under ``key``."""
        n_chunks = -(-self.dim // PROJECTION_CHUNK)
        if self.dim <= self.block_rows:
            cache = self.__dict__.setdefault("_cache", {})
            if key not in cache:
                cache[key] = torch.cat([make(c) for c in range(n_chunks)])
            yield 0, cache[key]
            return
        per_block = max(1, self.block_rows // PROJECTION_CHUNK)
        for c0 in range(0, n_chunks, per_block):
            yield c0 * PROJECTION_CHUNK, torch.cat([make(c) for c in range(c0, min(c0 + per_block, n_chunks))])

    def uses_int8(self, g: torch.Tensor) -> bool:
        """Whether ``project(g)`` takes the exact int8 route (see :func:`int8_slices`): float32
        gradients on a CPU with VNNI, a rademacher P and the torch backend."""
        vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
        return self.kind == "rademacher" and self.backend == "torch" and g.device.type == "cpu" and g.dtype == torch.float32 and vnni

    def _project_int8(self, g: torch.Tensor) -> torch.Tensor:
        """g P with P's ±1 exact in int8 and g split by :func:`int8_slices`: integer products
        accumulate exactly in int32, so the only rounding is the slices' (2^-29 of each row's
        max, on top of float32 rounding of each entry) and the float32 sum of the slice
        products: measured, a third of a float32 GEMM's error (tests/test_trak.py)."""
        cached = self.dim <= self.block_rows
        # cached: row blocks keep the slicing in cache; else each P block is made once, so all rows go at once
        rows = INT8_ROW_BLOCK if cached else len(g)
        # int32 cannot overflow: one product sums at most block_rows terms of size <= 127
        out = torch.zeros(g.shape[0], self.proj_dim, dtype=torch.float32)
        parts = [(a, *int8_slices(g[a:a + rows])) for a in range(0, len(g), rows)]
        for col, p8 in self._blocks(self._signs, "int8"):
            for a, slices, scale in parts:
                for j, q in enumerate(slices):
                    out[a:a + len(q)] += torch._int_mm(q[:, col:col + p8.shape[0]], p8).float().mul_(INT8_RADIX ** -j)
        for a, slices, scale in parts:
            out[a:a + len(slices[0])] *= scale / self.proj_dim ** 0.5
        return out

    def _project_fast_jl(self, g: torch.Tensor) -> torch.Tensor:
        if not g.is_cuda:
            raise ValueError("the fast_jl projector needs gradients on a CUDA device; use the torch backend on CPU")
        import fast_jl

        tile = 8 if len(g) <= 8 else 16 if len(g) <= 16 else 32
        fn = getattr(fast_jl, f"project_{'rademacher' if self.kind == 'rademacher' else 'normal'}_{tile}")
        seed = int(np.random.SeedSequence([self.seed, self.model_index, 5]).generate_state(1)[0] % 2**31)
        sms = torch.cuda.get_device_properties(g.device).multi_processor_count
        return fn(g.contiguous(), self.proj_dim, seed, sms).to(g.dtype) / self.proj_dim ** 0.5

    def matrix(self, rows: slice | None = None) -> torch.Tensor:
        """P (or some of its rows) as a dense tensor: for tests and small d only."""
        full = torch.cat([self._chunk(c, "cpu", torch.float32) for c in range(-(-self.dim // PROJECTION_CHUNK))])
        return full if rows is None else full[rows]

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, k), holding at most ``block_rows`` rows of P at a time."""
        if g.shape[1] != self.dim:
            raise ValueError(f"gradients have {g.shape[1]} columns, the projector expects d={self.dim}")
        if self.backend == "fast_jl":
            return self._project_fast_jl(g)
        if self.uses_int8(g):
            return self._project_int8(g)
        out = None
        for a, p in self._blocks(lambda c: self._chunk(c, g.device, g.dtype), (g.device, g.dtype)):
            part = g[:, a:a + p.shape[0]] @ p
            out = part if out is None else out.add_(part)
        return out


@dataclass
class ModelFeatures:
    """One model's TRAK features: train (n, k), targets (t, k), Q (n,)."""

    train: torch.Tensor
    targets: torch.Tensor
    q: torch.Tensor


def featurize(model: nn.Module, x_train, y_train, x_targets, y_targets, proj_dim: int | Sequence[int] | None, seed: int,
              model_index: int, kind: str = "rademacher", param_names: Sequence[str] | None = None,
              task: ModelOutput | None = None, chunk: int = 1024, dtype: torch.dtype = torch.float32,
              backend: str = "torch"):
    """Projected per-example gradients of one model, for training and target examples.

    Gradients are computed and projected ``chunk`` examples at a time (train and targets
    in one stream), so at most (chunk, d) gradients are held; larger chunks make the
    projection GEMM more efficient. ``proj_dim=None`` keeps the raw gradients; a list of
    dimensions returns {k: ModelFeatures} from one gradient pass.
    """
    from datalens.execution import keep_freed_memory

    if x_train.device.type == "cpu":
        keep_freed_memory()
    task = task or ClassificationMargin()
    dims = list(proj_dim) if isinstance(proj_dim, (list, tuple)) else [proj_dim]
    x_all, y_all = torch.cat([x_train, x_targets]), torch.cat([y_train, y_targets])
    parts: dict = {k: [] for k in dims}
    projectors: dict = {}
    for a in range(0, len(x_all), chunk):
        g = per_example_gradients(model, x_all[a:a + chunk], y_all[a:a + chunk], task, param_names, chunk, dtype)
        for k in dims:
            if k is None:  # no projection: the raw gradients (small models, tests)
                parts[k].append(g)
                continue
            projectors.setdefault(k, Projector(g.shape[1], k, seed, model_index, kind, backend=backend))
            parts[k].append(projectors[k].project(g))
    n = len(x_train)
    q = out_to_loss(model, x_train, y_train, task)
    out = {k: ModelFeatures(torch.cat(p)[:n], torch.cat(p)[n:], q) for k, p in parts.items()}
    return out if isinstance(proj_dim, (list, tuple)) else out[proj_dim]


def kernel_terms(f: ModelFeatures, ridge: float | Sequence[float], target_block: int = 4096):
    """One model's ``Phi (Phi^T Phi + lambda I)^{-1} phi(x)``: (n, t), with lambda = ridge * trace / k.

    Given a list of ridges, returns {ridge: (n, t)}, forming Phi^T Phi once. Targets go in
    blocks, so the (k, t) solve never exceeds one block.
    """
    ridges = [ridge] if isinstance(ridge, (int, float)) else list(ridge)
    # The big products run in the features' precision; the factorisation in float64, where it matters.
    phi = f.train
    n, k = phi.shape
    # Phi (Phi^T Phi + lam I_k)^{-1} = (Phi Phi^T + lam I_n)^{-1} Phi: solve the smaller system
    wide = k > n
    kern = (phi @ phi.T if wide else phi.T @ phi).double()
    eye = torch.eye(kern.shape[0], dtype=kern.dtype, device=kern.device)
    scale = torch.trace(kern) / k
    out = {}
    for r in ridges:
        chol = torch.linalg.cholesky(kern + r * scale * eye)
        res = torch.empty(n, f.targets.shape[0], dtype=torch.float64, device=phi.device)
        for a in range(0, f.targets.shape[0], target_block):
            tgt = f.targets[a:a + target_block]
            if wide:
                res[:, a:a + len(tgt)] = torch.cholesky_solve((phi @ tgt.T).double(), chol)
            else:
                res[:, a:a + len(tgt)] = phi @ torch.cholesky_solve(tgt.double().T, chol).to(phi.dtype)
        out[r] = res
    return out[ridges[0]] if isinstance(ridge, (int, float)) else out


def trak_scores(features: Sequence[ModelFeatures], ridge: float) -> np.ndarray:
    """Algorithm 1 without thresholding: (n, t) = diag(mean Q) * mean_m kernel_terms."""
    if not features:
        raise ValueError("TRAK needs at least one model (trak.num_models >= 1)")
    acc = sum(kernel_terms(f, ridge) for f in features) / len(features)
    q = sum(f.q.double() for f in features) / len(features)
    return (q[:, None] * acc).cpu().numpy()


def soft_threshold(scores: np.ndarray, threshold: float) -> np.ndarray:
    return np.sign(scores) * np.maximum(np.abs(scores) - threshold, 0.0)


def select_by_lds(candidates: dict, masks: np.ndarray, actual: np.ndarray) -> tuple:
    """The key of the candidate scores (n, t) with the best LDS on validation (masks, actual)."""
    from datalens.metrics import linear_datamodeling_score
    lds = {key: linear_datamodeling_score(s, masks, actual) for key, s in candidates.items()}
    best = max(lds, key=lambda k: -np.inf if np.isnan(lds[k]) else lds[k])
    return best, lds


# --- features of stored checkpoints: resumable per model, fanned out through the executor ---

def projector_backend(device: str) -> str:
    """``fast_jl`` when the device is CUDA and the kernel is installed, else ``torch``: never required."""
    import importlib.util
    from datalens.training import resolve_device
    cuda = resolve_device(device).type == "cuda"
    return "fast_jl" if cuda and importlib.util.find_spec("fast_jl") is not None else "torch"


@dataclass(frozen=True)
class FeatureJob:
    """Featurize checkpoints of a subset run for every projection dimension in ``proj_dims``."""

    run: object  # datalens.training.SubsetRun whose store holds the checkpoints
    store: str  # where the features go
    proj_dims: tuple[int, ...]
    proj_type: str = "rademacher"
    seed: int = 0
    param_names: tuple[str, ...] | None = None
    backend: str = "torch"  # see projector_backend(); recorded in the store, since it changes P


def open_feature_store(job: FeatureJob, num_models: int, n_train: int, n_targets: int):
    """Create or reopen the feature store; refuse one made by other params."""
    import zarr
    identity = {"projector_version": PROJECTOR_VERSION, "train_store": job.run.store, "proj_dims": list(job.proj_dims),
                "proj_type": job.proj_type, "seed": job.seed, "backend": job.backend,
                "param_names": list(job.param_names) if job.param_names else None, "run": job.run.identity()}
    try:
        group = zarr.open_group(job.store, mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        group = zarr.open_group(job.store, mode="w")
        for k in job.proj_dims:
            group.create_array(f"train_k{k}", shape=(num_models, n_train, k), chunks=(1, n_train, k), dtype="float32")
            group.create_array(f"targets_k{k}", shape=(num_models, n_targets, k), chunks=(1, n_targets, k), dtype="float32")
        group.create_array("q", shape=(num_models, n_train), chunks=(1, n_train), dtype="float32")
        group.create_array("seconds", shape=(num_models,), chunks=(1,), dtype="float64")
        group.create_array("completed", shape=(num_models,), chunks=(1,), dtype="bool", fill_value=False)
        group.attrs["identity"] = identity
        return group
    from datalens.store import StoreError, _jsonable
    if _jsonable(identity) != dict(group.attrs.get("identity", {})):
        raise StoreError(f"feature store {job.store} was made with other params ({dict(group.attrs.get('identity', {}))}); "
                         "delete it or point trak.store elsewhere")
    if group["completed"].shape[0] < num_models:
        for name in group.array_keys():
            group[name].resize((num_models, *group[name].shape[1:]))
    return group


def featurize_checkpoint(job: FeatureJob, model_index: int) -> dict:
    """Featurize checkpoint ``model_index`` at every k and write it; completed is set last."""
    import time
    import zarr
    from datalens.store import open_existing
    from datalens.training import cached_dataset, resolve_device

    t0 = time.perf_counter()
    run = job.run
    device = resolve_device(run.device)
    model = run.load_checkpoint(open_existing(run.store), model_index, device)
    feats = featurize(model, *cached_dataset(run.dataset, run.data_root).tensors(device), list(job.proj_dims), job.seed,
                      model_index, job.proj_type, job.param_names, backend=job.backend)
    group = zarr.open_group(job.store, mode="r+")
    for k, f in feats.items():
        group[f"train_k{k}"][model_index] = f.train.cpu().numpy()
        group[f"targets_k{k}"][model_index] = f.targets.cpu().numpy()
    group["q"][model_index] = next(iter(feats.values())).q.cpu().numpy()
    group["seconds"][model_index] = time.perf_counter() - t0
    group["completed"][model_index] = True
    return {"model": model_index, "seconds": time.perf_counter() - t0}


def featurize_checkpoints(job: FeatureJob, num_models: int, executor=None, progress: bool = True):
    """Featurize checkpoints 0..num_models-1 that the feature store lacks. Returns the zarr group."""
    from tqdm.auto import tqdm
    from datalens.execution import LocalExecutor
    from datalens.training import cached_dataset

    if num_models > job.run.num_checkpoints:
        raise ValueError(f"TRAK asks for {num_models} models but train.num_checkpoints={job.run.num_checkpoints}; raise it")
    ds = cached_dataset(job.run.dataset, job.run.data_root)
    group = open_feature_store(job, num_models, ds.n_train, ds.n_test)
    todo = [m for m in range(num_models) if not group["completed"][m]]
    executor = executor or LocalExecutor()
    with tqdm(total=num_models, initial=num_models - len(todo), unit="model", desc="TRAK features", disable=not progress) as bar:
        for _ in executor.map_unordered(featurize_checkpoint, [(job, m) for m in todo], describe=lambda a: f"checkpoint {a[1]}"):
            bar.update(1)
    return group


def load_features(group, models: Sequence[int], proj_dim: int) -> list[ModelFeatures]:
    return [ModelFeatures(torch.as_tensor(group[f"train_k{proj_dim}"][m]), torch.as_tensor(group[f"targets_k{proj_dim}"][m]),
                          torch.as_tensor(group["q"][m])) for m in models]
