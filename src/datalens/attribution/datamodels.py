"""Datamodels: for every target, a sparse linear model from a 0/1 training mask to the
margin of a model trained on that subset (Ilyas et al., 2022; docs/methods.md).

The solver fits many targets at once (in blocks sized to a memory budget). It minimises, per target t,

    1/(2N) * || y_t - ybar_t - Z w_t ||^2 + lambda_t * ||w_t||_1

with Z the masks standardised by the training models' mean and std (scikit-learn's
``Lasso`` objective on standardised features). It runs FISTA on the centred, standardised
Gram matrix, so its cost per iteration is independent of the number of models. The
Gram matrix is built by streaming blocks of models, so a store larger than memory fits,
on the device the fit runs on; the host never holds an (n, n) array, and the device holds
the masks' Gram as exact float32 counts, the standardised Gram, the (n, T) path solutions at
the chosen lambdas and one block of targets' iterates.

The path: per-target ``lambda_max = max_i |Z^T (y - ybar)|_i / N``, then a geometric
grid of ``num_lambdas`` values down to ``eps * lambda_max``, with warm starts. Each
target stops early once its validation MSE rises (after at least 10 lambdas and more
than one non-zero weight). The best lambda is the one with the lowest validation MSE,
then the fit is redone on train + validation models at that lambda.
:class:`Datamodels` holds raw-space weights, so ``predict(masks)`` takes raw 0/1 masks.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from datalens.core.progress import progress_bar


EXACT_COUNTS = 2 ** 24  # float32 holds every integer below this: the Gram of 0/1 masks is a matrix of counts


@dataclass
class Moments:
    """Sufficient statistics of (masks X (N, n), margins Y (N, T)) for least squares, as torch
    tensors on the device they were accumulated on: sx (n,), sy (T,), sxx (n, n), sxy (n, T), syy (T,).

    sxx is float32 when X is boolean and N < 2^24: its entries are then counts, which float32 holds
    exactly, so it is the float64 Gram at half the memory (10 GB instead of 20 at n = 50,000).
    Everything else is float64."""

    count: int
    sx: torch.Tensor
    sy: torch.Tensor
    sxx: torch.Tensor
    sxy: torch.Tensor
    syy: torch.Tensor

    @classmethod
    def from_blocks(cls, blocks: Iterable[tuple[np.ndarray, np.ndarray]], device: str = "cpu") -> "Moments":
        acc = None
        for x, y in blocks:
            x = np.asarray(x)
            x64 = torch.as_tensor(x, device=device).double()
            yt = torch.as_tensor(np.asarray(y, dtype=np.float64), device=device)
            counted = (acc[0] if acc else 0) + len(x)
            xs = x64.float() if x.dtype == np.bool_ and counted < EXACT_COUNTS else x64
            part = [len(x), x64.sum(0), yt.sum(0), xs.T @ xs, x64.T @ yt, (yt * yt).sum(0)]
            if acc is None:
                acc = part
                continue
            if acc[3].dtype != part[3].dtype:  # past 2^24 models, or a non-boolean block: float64 from here on
                acc[3], part[3] = acc[3].double(), part[3].double()
            acc[0] += part[0]
            for a, b in zip(acc[1:], part[1:]):
                a.add_(b)  # in place: no second (n, n) array
        if acc is None or acc[0] == 0:
            raise ValueError("no models to fit datamodels on (zero rows)")
        return cls(*acc)

    def to(self, device) -> "Moments":
        return Moments(self.count, *(getattr(self, f).to(device) for f in ("sx", "sy", "sxx", "sxy", "syy")))

    def _with(self, plus: "Moments | None") -> list["Moments"]:
        return [self] if plus is None else [self, plus]

    def scaling(self, plus: "Moments | None" = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Of these models (or of these and ``plus`` together, without forming the sum): the masks'
        mean mu (n,) and std sigma (n,) and the mean margin ybar (T,), float64 on their device."""
        parts = self._with(plus)
        n = sum(p.count for p in parts)
        mu = sum(p.sx for p in parts) / n
        var = sum(torch.diagonal(p.sxx).double() for p in parts) / n - mu * mu
        sigma = torch.sqrt(torch.clamp(var, min=0.0))
        sigma[sigma < 1e-12] = 1.0  # an example in every (or no) mask carries no signal
        return mu, sigma, sum(p.sy for p in parts) / n

    def gram(self, mu: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype = torch.float64, plus: "Moments | None" = None,
             block: int | None = None) -> torch.Tensor:
        """C = Z^T Z / N (n, n) in ``dtype``, built ``block`` rows at a time (default: 2^20 entries'
        worth), so besides the moments only C itself is (n, n)."""
        parts = self._with(plus)
        n, size = sum(p.count for p in parts), len(mu)
        block = block or max(1, 2 ** 20 // size)
        gram = torch.empty((size, size), dtype=dtype, device=mu.device)
        for a in range(0, size, block):
            rows = sum(p.sxx[a:a + block].double() for p in parts)
            gram[a:a + block] = (rows / n - mu[a:a + block, None] * mu[None]) / (sigma[a:a + block, None] * sigma[None])
        return gram

    def cross(self, mu: torch.Tensor, sigma: torch.Tensor, ybar: torch.Tensor, dtype: torch.dtype = torch.float64,
              plus: "Moments | None" = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """c = Z^T (y - ybar) / N (n, len(cols)) in ``dtype``, for targets ``cols`` (default all)."""
        parts = self._with(plus)
        n = sum(p.count for p in parts)
        pick = (lambda a: a) if cols is None else (lambda a: a[..., cols])
        sxy = sum(pick(p.sxy) for p in parts)
        return ((sxy / n - mu[:, None] * pick(ybar)[None]) / sigma[:, None]).to(dtype)

    def standardised(self, dtype: torch.dtype = torch.float64, plus: "Moments | None" = None, block: int | None = None):
        """mu (n,), sigma (n,), ybar (T,) float64; C (n, n) and c (n, T) in ``dtype``: :meth:`scaling`,
        :meth:`gram` and :meth:`cross` in one call."""
        mu, sigma, ybar = self.scaling(plus)
        return mu, sigma, ybar, self.gram(mu, sigma, dtype, plus, block), self.cross(mu, sigma, ybar, dtype, plus)

    def mse(self, weights: torch.Tensor, bias: torch.Tensor, cols: np.ndarray | None = None, block: int | None = None) -> np.ndarray:
        """Mean squared error of raw-space predictions ``X @ weights + bias`` on these models,
        for targets ``cols`` (default all): weights (n, len(cols)), bias (len(cols),)."""
        device = self.sy.device
        cols = torch.arange(len(self.sy), device=device) if cols is None else torch.as_tensor(cols, device=device)
        a = torch.as_tensor(weights, dtype=torch.float64, device=device)
        b = torch.as_tensor(bias, dtype=torch.float64, device=device)
        s_yhat = (a * self.sxy[:, cols]).sum(0) + b * self.sy[cols]
        block = block or max(1, 2 ** 22 // len(a))  # rows of sxx turned to float64 at a time
        sxx_a = torch.cat([self.sxx[r:r + block].double() @ a for r in range(0, len(a), block)])
        s_hat2 = (a * sxx_a).sum(0) + 2 * b * (self.sx @ a) + self.count * b * b
        return ((self.syy[cols] - 2 * s_yhat + s_hat2) / self.count).cpu().numpy()


@dataclass
class Datamodels:
    """Fitted datamodels for T targets over n training examples.

    weight: (n, T) raw-space weights; bias: (T,); lam: (T,) chosen lambda;
    weight_std: (n, T) weights in standardised space; mu, sigma: (n,) the standardisation;
    ybar: (T,) mean margin of the fitting models.
    """

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    weight_std: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    ybar: np.ndarray

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Predicted margins (m, T) for raw 0/1 masks (m, n)."""
        return np.asarray(masks, dtype=np.float64) @ self.weight + self.bias

    def save(self, path) -> None:
        np.savez_compressed(path, **self.__dict__)

    @classmethod
    def load(cls, path) -> "Datamodels":
        with np.load(path) as f:
            return cls(**{k: f[k] for k in f.files})


def soft_threshold(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


def _lipschitz(gram: torch.Tensor, iters: int = 100) -> float:
    """A power-iteration estimate of the largest eigenvalue of ``gram`` (from below, so
    :func:`lasso_fista` checks every step against it and raises it where it falls short)."""
    v = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(iters):
        v = gram @ v
        v = v / v.norm().clamp_min(1e-300)
    return max(float(v @ (gram @ v)), 1e-300) * 1.01


def lasso_objective(gram: torch.Tensor, cross: torch.Tensor, lam: torch.Tensor, w: torch.Tensor,
                    gram_w: torch.Tensor | None = None) -> torch.Tensor:
    """Per column: 1/2 w^T C w - c^T w + lam ||w||_1, shape (T,)."""
    gw = gram @ w if gram_w is None else gram_w
    return 0.5 * (w * gw).sum(0) - (cross * w).sum(0) + lam * w.abs().sum(0)


def lasso_fista(gram: torch.Tensor, cross: torch.Tensor, lam: torch.Tensor, w0: torch.Tensor | None = None,
                max_iter: int = 500, tol: float = 1e-6, lipschitz: float | None = None, return_info: bool = False):
    """Solve min_w 1/2 w^T C w - c^T w + lam ||w||_1 for every column at once.

    gram C: (n, n); cross c: (n, T); lam: (T,); returns w: (n, T), and with ``return_info``
    also {iterations, column_iterations (T,), restarts, converged (every column), lipschitz
    (the step constant used at the end), objective (per iteration, summed over columns)}.

    FISTA with function-value restart (O'Donoghue & Candes, 2015), per column: a step
    that would raise a column's objective is rejected and that column's momentum reset,
    so its next step is a plain proximal-gradient step, which cannot raise it. The
    objective therefore never increases. C w is carried along (C v follows by linearity),
    so each iteration costs one (n, n) x (n, T_active) product.

    Step size: the objective is quadratic, so a step d from v with constant L obeys the
    descent lemma exactly when d^T C d <= L ||d||^2; C d is known from the carried products, so
    every step is checked at no cost and, where the estimate ``lipschitz`` (a power iteration by
    default) falls short, L is raised and the step redone (backtracking, Beck & Teboulle 2009).

    Each column stops on its own, when its largest coordinate change is below ``tol`` times
    its own largest weight, and leaves the product: a small-weight target is judged on its
    own scale, not on the largest target's.
    """
    L = lipschitz or _lipschitz(gram)
    n, num = cross.shape
    out = torch.zeros_like(cross) if w0 is None else w0.clone()
    gw_all = gram @ out
    f_all = lasso_objective(gram, cross, lam, out, gw_all)
    column_iterations = torch.zeros(num, dtype=torch.long)
    idx = torch.arange(num, device=cross.device)
    w, gw, f_w, c, lam_a = out.clone(), gw_all, f_all.clone(), cross, lam
    v, gv = w.clone(), gw.clone()
    t = torch.ones(num, dtype=cross.dtype, device=cross.device)
    restarts, trace, it = 0, [], 0
    for it in range(1, max_iter + 1):
        while True:
            w_next = soft_threshold(v - (gv - c) / L, (lam_a / L).unsqueeze(0))
            gw_next = gram @ w_next
            step = w_next - v
            curvature = (step * (gw_next - gv)).sum(0)  # d^T C d
            length = (step * step).sum(0)
            short = curvature > L * length * (1 + 1e-9)
            if not bool(short.any()):
                break
            L = 1.1 * max(L, float((curvature[short] / length[short]).max()))
        f_next = lasso_objective(gram, c, lam_a, w_next, gw_next)
        up = f_next > f_w + 1e-12 * f_w.abs().clamp_min(1.0)
        if bool(up.any()):  # reject the step in those columns and drop their momentum
            restarts += int(up.sum())
            w_next[:, up], gw_next[:, up], f_next[up] = w[:, up], gw[:, up], f_w[up]
        t_next = torch.where(up, torch.ones_like(t), (1 + torch.sqrt(1 + 4 * t * t)) / 2)
        beta = torch.where(up, torch.zeros_like(t), (t - 1) / t_next)
        delta = w_next - w
        v = w_next + beta * delta
        gv = gw_next + beta * (gw_next - gw)
        w, gw, f_w, t = w_next, gw_next, f_next, t_next
        f_all[idx] = f_w
        if return_info:
            trace.append(float(f_all.sum()))
        done = ~up & (delta.abs().amax(0) <= tol * w.abs().amax(0).clamp_min(1e-12))
        column_iterations[idx.cpu()] = it
        if bool(done.any()):  # converged columns leave the product
            out[:, idx[done]] = w[:, done]
            keep = ~done
            idx, w, gw, f_w, c, lam_a, v, gv, t = (idx[keep], w[:, keep], gw[:, keep], f_w[keep], c[:, keep], lam_a[keep],
                                                   v[:, keep], gv[:, keep], t[keep])
            if len(idx) == 0:
                break
    out[:, idx] = w
    if return_info:
        return out, {"iterations": it, "column_iterations": column_iterations.numpy(), "restarts": restarts,
                     "converged": len(idx) == 0, "lipschitz": L, "objective": trace}
    return out


def lambda_grid(cross: np.ndarray, num: int, eps: float) -> np.ndarray:
    """(num, T) geometric grids from each target's lambda_max = max_i |c_i| down to eps * lambda_max."""
    lam_max = torch.as_tensor(cross).abs().amax(0).cpu().numpy()
    return lam_max[None, :] * np.geomspace(1.0, eps, num)[:, None]


# Arrays of (n, targets) the solver holds per target it fits at once: FISTA's iterates, carried products
# and their temporaries (about 20), the path's warm start and the block of the cross term.
WORKING_ARRAYS = 24
FIT_BUDGET = 2 ** 31  # bytes of that working set: targets are fitted in blocks that fit it


def target_block(n: int, dtype: torch.dtype, budget: int = FIT_BUDGET) -> int:
    """Targets fitted at once over ``n`` training examples: as many as keep the solver's
    :data:`WORKING_ARRAYS` (n, block) arrays within ``budget`` bytes (at least one)."""
    return max(1, budget // (WORKING_ARRAYS * n * torch.finfo(dtype).bits // 8))


def fit_datamodels(train: Moments, val: Moments, num_lambdas: int = 50, eps: float = 1e-3, max_iter: int = 300,
                   tol: float = 1e-5, device: str = "cpu", progress: bool = True, dtype: torch.dtype | None = None,
                   block: int | None = None) -> tuple[Datamodels, dict]:
    """Fit along the path on ``train``, select each target's lambda on ``val``, refit on both.

    The solves run in ``dtype`` (default float64 on the CPU, float32 on a GPU) and take the
    targets ``block`` at a time (default :func:`target_block`), so besides the moments the
    device holds one (n, n) Gram, the (n, T) path solutions at the chosen lambdas and one
    block's working set. Targets are independent: a block's solutions are those of the whole
    (up to the step constant, which one block may raise for the next).

    Returns the datamodels and a diagnostics dict: val MSE path (num_lambdas, T), chosen index (T,),
    the lambda grid (num_lambdas, T), the number of solves stopped by ``max_iter``, and the refit's
    starting point (n, T): each target's path solution at its chosen lambda.
    """
    dtype = dtype or (torch.float64 if device == "cpu" else torch.float32)
    train, val = train.to(device), val.to(device)
    mu, sigma, ybar = train.scaling()
    gram = train.gram(mu, sigma, dtype)
    n, T = gram.shape[0], len(ybar)
    block = block or target_block(n, dtype)
    blocks = [np.arange(a, min(a + block, T)) for a in range(0, T, block)]  # target indices (host); cols on the device
    L = _lipschitz(gram)
    path = _PathState(val, mu, sigma, ybar, np.empty((num_lambdas, T)), np.full((num_lambdas, T), np.nan), np.zeros(T, dtype=int),
                      torch.zeros((n, T), dtype=dtype, device=device))
    unconverged = 0
    bar = progress_bar(total=len(blocks) * num_lambdas, desc="lasso path", disable=not progress)
    for idx in blocks:
        cross = train.cross(mu, sigma, ybar, dtype, cols=torch.as_tensor(idx, device=device))
        path.grid[:, idx] = lambda_grid(cross, num_lambdas, eps)
        L, solves = _path(gram, cross, idx, path, L, max_iter, tol, bar)
        unconverged += solves
        del cross
    bar.close()
    del gram  # the refit's Gram takes its place
    grid, val_mse, best_idx, w_best = path.grid, path.val_mse, path.best_idx, path.w_best
    lam_train = grid[best_idx, np.arange(T)]
    # refit on train + val at each target's chosen lambda; lambda is on the same 1/N scale
    mu, sigma, ybar = train.scaling(plus=val)
    gram = train.gram(mu, sigma, dtype, plus=val)
    L = _lipschitz(gram)
    w_std = np.empty((n, T))
    for idx in blocks:
        cols = torch.as_tensor(idx, device=device)
        # warm start from each target's solution at its chosen lambda (not the path's last one)
        solved, info = lasso_fista(gram, train.cross(mu, sigma, ybar, dtype, plus=val, cols=cols),
                                   torch.as_tensor(lam_train[idx], dtype=dtype, device=device), w_best[:, cols],
                                   max_iter * 2, tol, L, return_info=True)
        w_std[:, idx] = solved.cpu().numpy()
        L = info["lipschitz"]
        unconverged += not info["converged"]
    mu, sigma, ybar = mu.cpu().numpy(), sigma.cpu().numpy(), ybar.cpu().numpy()
    if unconverged:
        warnings.warn(f"the lasso solver reached datamodels.max_iter={max_iter} before datamodels.tol={tol} in {unconverged} "
                      f"of its solves; raise max_iter (or tol) for a fit that is closer to the optimum", stacklevel=2)
    weight = w_std / sigma[:, None]
    dm = Datamodels(weight=weight, bias=ybar - mu @ weight, lam=lam_train, weight_std=w_std, mu=mu, sigma=sigma, ybar=ybar)
    return dm, {"val_mse_path": val_mse, "best_index": best_idx, "lambda_grid": grid, "unconverged_solves": unconverged,
                "refit_start": w_best.cpu().numpy()}


@dataclass
class _PathState:
    """What one fit's lasso paths read and fill, block by block: the validation moments and the
    training scaling (mu, sigma, ybar), and per target (columns) the lambda grid (num_lambdas, T),
    validation MSEs (num_lambdas, T), the index of the lowest (T,) and the solution there (n, T)."""

    val: Moments
    mu: torch.Tensor
    sigma: torch.Tensor
    ybar: torch.Tensor
    grid: np.ndarray
    val_mse: np.ndarray
    best_idx: np.ndarray
    w_best: torch.Tensor


def _path(gram, cross, targets: np.ndarray, state: _PathState, L: float, max_iter: int, tol: float, bar) -> tuple[float, int]:
    """The lasso path of one block of ``targets`` (their cross term (n, block)), warm-started down
    their grid; fills their columns of ``state`` (each target's solution at its lowest
    validation MSE). Returns the step constant and the solves stopped by ``max_iter``."""
    grid, val, mu, sigma, ybar = state.grid, state.val, state.mu, state.sigma, state.ybar
    val_mse, best_idx, w_best = state.val_mse, state.best_idx, state.w_best
    device, num_lambdas = cross.device, len(grid)
    w = torch.zeros_like(cross)
    best = np.full(len(targets), np.inf)
    active = np.ones(len(targets), dtype=bool)
    unconverged = 0
    for k in range(num_lambdas):
        local = np.flatnonzero(active)
        if len(local) == 0:
            bar.update(num_lambdas - k)
            break
        cols, local_t = targets[local], torch.as_tensor(local, device=device)
        lam_k = torch.as_tensor(grid[k, cols], dtype=cross.dtype, device=device)
        w_cols, info = lasso_fista(gram, cross[:, local_t], lam_k, w[:, local_t], max_iter, tol, L, return_info=True)
        L = info["lipschitz"]  # raised where a step showed the estimate short
        unconverged += not info["converged"]
        w[:, local_t] = w_cols
        raw = w_cols.double() / sigma[:, None]
        cols_t = torch.as_tensor(cols, device=device)
        mse = val.mse(raw, ybar[cols_t] - mu @ raw, cols)
        val_mse[k, cols] = mse
        improved = mse < best[local]
        best[local[improved]] = mse[improved]
        best_idx[cols[improved]] = k
        improved_t = torch.as_tensor(improved, device=device)
        w_best[:, cols_t[improved_t]] = w_cols[:, improved_t]
        nonzero = (w_cols != 0).sum(0).cpu().numpy()
        rising = (mse > best[local]) & (k >= 10) & (nonzero > 1)
        active[local[rising]] = False
        bar.update(1)
    return L, unconverged


def save_fit(directory, num_models: int, dm: Datamodels, seconds: float) -> None:
    """Datamodels fit on the first ``num_models`` models, with the fit's wall seconds:
    ``directory/N.npz`` and an entry of ``directory/seconds.json`` (stage fit_datamodels writes one
    per model count as it fits them, so no two are held at once; the method comparison charges
    those seconds instead of fitting again)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dm.save(directory / f"{num_models}.npz")
    index = directory / "seconds.json"
    seconds_by_count = json.loads(index.read_text()) if index.exists() else {}
    seconds_by_count[str(num_models)] = seconds
    index.write_text(json.dumps(dict(sorted(seconds_by_count.items(), key=lambda kv: int(kv[0]))), indent=1))


def load_fits(directory, counts: Sequence[int]) -> Iterator[tuple[int, Datamodels, float]]:
    """The fits :func:`save_fit` wrote, for ``counts`` in increasing order: (N, datamodels, seconds),
    read one at a time (at paper scale each is two (n, T) float64 arrays, 8 GB). A missing count is
    an error that says which, raised before any is read."""
    directory = Path(directory)
    seconds = json.loads((directory / "seconds.json").read_text()) if (directory / "seconds.json").exists() else {}
    missing = [n for n in counts if str(n) not in seconds or not (directory / f"{n}.npz").exists()]
    if missing:
        raise FileNotFoundError(f"no datamodels fit on {missing} models in {directory}; run stage fit_datamodels with "
                                f"datamodels.model_counts covering them first")
    return ((n, Datamodels.load(directory / f"{n}.npz"), float(seconds[str(n)])) for n in sorted(counts))


def split_models(num_models: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of model indices into (train, val)."""
    perm = np.random.default_rng([seed, 11]).permutation(num_models)
    n_val = max(1, int(round(val_fraction * num_models)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def store_blocks(store, rows: np.ndarray, target: str = "test_outputs", block: int = 1000,
                 measure: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (masks, outputs) for ``rows`` of a store, ``block`` models at a time; ``measure``
    maps a block of ``target`` to the (block, T) outputs fitted (default: ``target`` as it is)."""
    for a in range(0, len(rows), block):
        idx = rows[a:a + block]
        values = store.read(target, idx)
        yield store.read("masks", idx), values if measure is None else measure(values)


def fit_from_store(store, num_models: int | None = None, val_fraction: float = 0.1, seed: int = 0, target: str = "test_outputs",
                   measure: Callable[[np.ndarray], np.ndarray] | None = None, **kwargs) -> tuple[Datamodels, dict]:
    """Fit datamodels on the first ``num_models`` completed models of a store (all by default),
    to ``target`` or to ``measure`` of it (see :func:`store_blocks`)."""
    done = np.flatnonzero(store.completed())
    if num_models is not None:
        if num_models > len(done):
            raise ValueError(f"num_models={num_models} but the store holds only {len(done)} completed models")
        done = done[:num_models]
    tr, va = split_models(len(done), val_fraction, seed)
    device = kwargs.get("device", "cpu")  # the moments are accumulated where the fit runs: no (n, n) array on the host
    train = Moments.from_blocks(store_blocks(store, done[tr], target, measure=measure), device)
    val = Moments.from_blocks(store_blocks(store, done[va], target, measure=measure), device)
    return fit_datamodels(train, val, **kwargs)


def timed_fits(store, counts: Sequence[int], val_fraction: float, seed: int, solver: dict,
               progress: bool = False) -> Iterator[tuple[int, Datamodels, dict, float]]:
    """For each N of ``counts``, in order: datamodels on the first N completed models of ``store``
    (lambda chosen on a ``val_fraction`` split of those N), their diagnostics and the wall seconds
    the fit took. One fit is made at a time, so a caller that drops each keeps one in memory."""
    for n in counts:
        t0 = time.perf_counter()
        dm, diag = fit_from_store(store, num_models=n, val_fraction=val_fraction, seed=seed, progress=progress, **solver)
        yield n, dm, diag, time.perf_counter() - t0


# -- ridge datamodels: many targets at once ------------------------------------------------
# Unlearning needs a datamodel per class logit of every train and test example (n_train x
# (n_train + n_test) x C weights). Ridge has a closed form that serves them all from one
# factorisation of the masks' Gram matrix; the lasso path above is kept for the margins.


def _ridge_fits(moments: Moments, ridges: Sequence[float], device: str = "cpu") -> list[Datamodels]:
    """Ridge datamodels of every target of ``moments`` at each ridge, from one standardisation:
    minimise ||y - ybar - Z w||^2 / N + ridge ||w||^2 (standardised like the lasso, so a ridge is
    relative to a unit-variance feature)."""
    mu, sigma, ybar, gram, cross = moments.to(device).standardised()
    mu, sigma, ybar = mu.cpu().numpy(), sigma.cpu().numpy(), ybar.cpu().numpy()
    fits = []
    for ridge in ridges:
        shifted = gram.clone()
        shifted.diagonal().add_(ridge)
        w_std = torch.linalg.solve(shifted, cross).cpu().numpy()
        del shifted
        weight = w_std / sigma[:, None]
        fits.append(Datamodels(weight=weight, bias=ybar - mu @ weight, lam=np.full(len(ybar), ridge), weight_std=w_std,
                               mu=mu, sigma=sigma, ybar=ybar))
    return fits


def ridge_datamodels(masks: np.ndarray, outputs: np.ndarray, ridge: float, device: str = "cpu") -> Datamodels:
    """Ridge datamodels of every column of ``outputs`` (N, T) on ``masks`` (N, n), in one solve
    (``lam`` = ridge); see :func:`_ridge_fits`."""
    return _ridge_fits(Moments.from_blocks([(masks, outputs)], device), [ridge], device)[0]


def select_ridge(masks: np.ndarray, outputs: np.ndarray, ridges: Sequence[float], val_fraction: float, seed: int,
                 device: str = "cpu") -> tuple[float, np.ndarray]:
    """The ridge in ``ridges`` with the lowest mean squared error on held-out models
    (a seeded ``val_fraction`` of the rows), pooled over the columns of ``outputs`` (N, T).
    Returns (ridge, validation MSE per ridge)."""
    tr, va = split_models(len(masks), val_fraction, seed)
    fits = _ridge_fits(Moments.from_blocks([(masks[tr], outputs[tr])], device), ridges, device)
    mse = np.array([np.mean((dm.predict(masks[va]) - outputs[va]) ** 2) for dm in fits])
    return float(ridges[int(np.argmin(mse))]), mse


def ridge_set_contributions(masks, outputs, sets: np.ndarray, ridge: float, device: str = "cpu", block: int = 1000) -> np.ndarray:
    """sum_{i in F} w_i for each set F: the attributed contribution of F to every column of
    ``outputs`` (N, T), without forming the (n, T) weights.

    masks (N, n) and outputs (N, T) may be any arrays that slice by rows (numpy, zarr, or a
    reader of a store): both are read ``block`` models at a time, so only the (n, n) Gram
    matrix (and the solver's factor of it) is ever held whole. sets: (S, n) 0/1 indicators. With w = (G + ridge I)^-1 Z^T (y -
    ybar) / N in raw units (w / sigma), sum_{i in F} w_i = v_F^T y / N with v_F = Z (G + ridge
    I)^-1 (1_F / sigma) (the centring of y drops out: the columns of Z sum to zero). Returns
    (S, T), equal to ``sets @ ridge_datamodels(...).weight`` (a test checks it)."""
    num = masks.shape[0]
    rows = [slice(a, min(a + block, num)) for a in range(0, num, block)]
    no_targets = ((masks[r], np.zeros((r.stop - r.start, 0))) for r in rows)  # only the masks' moments are needed
    mu, sigma, _, gram, _ = Moments.from_blocks(no_targets, device).standardised()  # the moments go once this returns
    gram.diagonal().add_(ridge)  # in place: G + ridge I without a second (n, n) array
    rhs = torch.as_tensor(np.asarray(sets, dtype=np.float64), device=device).T / sigma[:, None]
    g = torch.linalg.solve(gram, rhs)  # (n, S)
    del gram
    out = torch.zeros((len(sets), outputs.shape[1]), dtype=torch.float64, device=device)
    for r in rows:
        z = (torch.as_tensor(np.asarray(masks[r], dtype=np.float64), device=device) - mu) / sigma
        v = (z @ g).T / num  # (S, rows)
        out += v @ torch.as_tensor(np.asarray(outputs[r], dtype=np.float64), device=device)
    return out.cpu().numpy()
