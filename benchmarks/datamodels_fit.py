"""Fitting every target's datamodel on the embedded profile: our all-targets FISTA solver
vs scikit-learn, in the same run, with everything that can be made equal made equal:

* the same standardised masks, split, lambda grid, validation selection and refit;
* scikit-learn gets the precomputed Gram matrix and ``Xy`` (``lasso_path(precompute=G,
  Xy=...)``, computed inside its timing once for all targets, as ours computes its
  streamed statistics inside its timing), warm starts along the path, and our path's
  early stopping (a target stops once its validation MSE rises, after at least 10
  lambdas and more than one non-zero weight), ``max_iter = datamodels.max_iter`` and
  ``tol = datamodels.tol``;
* both sides are warmed up first on a few targets.

scikit-learn fits targets independently, so its time is linear in the number of targets;
``--sklearn-targets`` fits an evenly spaced sample and scales its time to all targets
(say 0 to fit them all). Needs the `train_subsets` stage's store (`make repro`).

    python benchmarks/datamodels_fit.py [--sklearn-targets 45]
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso, lasso_path

from _common import ROOT, write_result
from datalens.core.config import stage_params
from datalens.attribution.datamodels import Moments, fit_datamodels, lambda_grid, split_models, store_blocks
from datalens.training.runs import SubsetRun


def standardise(x):
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1
    return (x - mu) / sd, mu, sd


def sklearn_fit_all(x_tr, y_tr, x_va, y_va, grid, targets, max_iter, tol):
    """Every target in ``targets`` the scikit-learn way, with our path's early stopping; validation MSE per target."""
    z, mu, sd = standardise(x_tr)
    gram = z.T @ z
    x_all = np.vstack([x_tr, x_va])
    z_all, mu2, sd2 = standardise(x_all)
    gram_all = z_all.T @ z_all
    zv = (x_va - mu) / sd
    best_mse = []
    for t in targets:
        ybar = y_tr[:, t].mean()
        yc = y_tr[:, t] - ybar
        xy = z.T @ yc
        coef, best, best_alpha = np.zeros(z.shape[1]), np.inf, grid[0, t]
        for k, alpha in enumerate(grid[:, t]):
            _, coefs, _ = lasso_path(z, yc, alphas=[alpha], precompute=gram, Xy=xy, coef_init=coef, max_iter=max_iter, tol=tol)
            coef = coefs[:, 0]
            mse = float(((zv @ coef + ybar - y_va[:, t]) ** 2).mean())
            if mse < best:
                best, best_alpha = mse, alpha
            elif k >= 10 and (coef != 0).sum() > 1:
                break
        y_all = np.concatenate([y_tr[:, t], y_va[:, t]])
        Lasso(alpha=best_alpha, precompute=gram_all, max_iter=2 * max_iter, tol=tol).fit(z_all, y_all)
        best_mse.append(best)
    return np.array(best_mse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sklearn-targets", type=int, default=45)
    args = ap.parse_args()
    p = stage_params("fit_datamodels", ROOT / "params.yaml")
    d = p["datamodels"]
    store = SubsetRun.from_params(p).open_store()  # the store the pipeline's params locate
    done = np.flatnonzero(store.completed())
    tr, va = split_models(len(done), d["val_fraction"], p["train"]["seed"])
    x_tr, y_tr = store.read("masks", done[tr]).astype(np.float64), store.read("test_outputs", done[tr]).astype(np.float64)
    x_va, y_va = store.read("masks", done[va]).astype(np.float64), store.read("test_outputs", done[va]).astype(np.float64)
    solver = dict(num_lambdas=d["num_lambdas"], eps=d["eps"], max_iter=d["max_iter"], tol=d["tol"], progress=False)

    def ours():
        train_m, val_m = Moments.from_blocks(store_blocks(store, done[tr])), Moments.from_blocks(store_blocks(store, done[va]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a max_iter warning is a result here, not noise: counted below
            dm, diag = fit_datamodels(train_m, val_m, **solver)
        return train_m, diag

    T = y_tr.shape[1]
    targets = np.arange(T) if args.sklearn_targets <= 0 else np.linspace(0, T - 1, args.sklearn_targets).astype(int)
    ours()  # warm up
    t0 = time.perf_counter()
    train_m, diag = ours()
    t_ours = time.perf_counter() - t0
    ours_val_mse = np.nanmin(diag["val_mse_path"], axis=0)
    grid = lambda_grid(train_m.standardised()[4], d["num_lambdas"], d["eps"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sklearn_fit_all(x_tr, y_tr, x_va, y_va, grid, targets[:2], d["max_iter"], d["tol"])  # warm up
        t0 = time.perf_counter()
        sk_mse = sklearn_fit_all(x_tr, y_tr, x_va, y_va, grid, targets, d["max_iter"], d["tol"])
        t_sk_sample = time.perf_counter() - t0
    # the Gram matrices are computed once for all targets: scale only the per-target part
    t0 = time.perf_counter()
    sklearn_fit_all(x_tr, y_tr, x_va, y_va, grid, targets[:0], d["max_iter"], d["tol"])
    t_shared = time.perf_counter() - t0
    t_sk = t_shared + (t_sk_sample - t_shared) * T / len(targets)
    write_result("datamodels_fit", {
        "ours": t_ours, "baseline": t_sk, "ratio": t_sk / t_ours, "unit": "seconds to fit all targets",
        "ours_val_mse_mean": float(ours_val_mse[targets].mean()), "baseline_val_mse_mean": float(sk_mse.mean()),
        "ours_val_mse_mean_all_targets": float(ours_val_mse.mean()), "ours_unconverged_solves": int(diag["unconverged_solves"]),
        "baseline_timed_targets": int(len(targets)), "baseline_time_scaled_to_all": len(targets) < T,
        "baseline_shared_seconds": t_shared,
        "settings": {"train_models": int(len(tr)), "val_models": int(len(va)), "n_train": int(x_tr.shape[1]), "targets": int(T),
                     "num_lambdas": d["num_lambdas"], "eps": d["eps"], "max_iter": d["max_iter"], "tol": d["tol"],
                     "sklearn": "lasso_path per lambda with precompute=Gram, Xy, coef_init warm start; same early stopping"},
    })


if __name__ == "__main__":
    main()
