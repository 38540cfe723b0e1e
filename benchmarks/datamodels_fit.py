"""Fitting every target's datamodel on the embedded profile: our all-targets FISTA solver
vs scikit-learn's ``lasso_path`` per target with the same grid, the same split and the
same validation selection and refit, in the same run.

scikit-learn fits targets independently, so its time is linear in the number of targets;
``--sklearn-targets`` fits an evenly spaced sample and scales its time to all targets
(say 0 to fit them all). Needs the `train_subsets` stage's store (`make repro`).

    python benchmarks/datamodels_fit.py [--sklearn-targets 45]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import Lasso, lasso_path

from _common import ROOT, write_result
from datalens.config import stage_params
from datalens.datamodels import Moments, fit_datamodels, lambda_grid, split_models, store_blocks
from datalens.store import open_existing


def sklearn_fit(x_tr, y_tr, x_va, y_va, grid_t, t):
    """One target the scikit-learn way: standardise, lasso_path on the grid, pick by validation MSE, refit."""
    mu, sd = x_tr.mean(0), x_tr.std(0)
    sd[sd == 0] = 1
    z = (x_tr - mu) / sd
    ybar = y_tr[:, t].mean()
    alphas, coefs, _ = lasso_path(z, y_tr[:, t] - ybar, alphas=grid_t, max_iter=300, tol=1e-4)
    pred = ybar + ((x_va - mu) / sd) @ coefs  # (m_val, k)
    mse = ((pred - y_va[:, t][:, None]) ** 2).mean(0)
    best = alphas[int(np.argmin(mse))]
    x_all, y_all = np.vstack([x_tr, x_va]), np.concatenate([y_tr[:, t], y_va[:, t]])
    mu2, sd2 = x_all.mean(0), x_all.std(0)
    sd2[sd2 == 0] = 1
    model = Lasso(alpha=best, max_iter=600, tol=1e-4).fit((x_all - mu2) / sd2, y_all)
    return float(mse.min()), model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sklearn-targets", type=int, default=45)
    args = ap.parse_args()
    p = stage_params("fit_datamodels", ROOT / "params.yaml")
    d = p["datamodels"]
    store = open_existing(str(ROOT / p["train"]["store"]))
    done = np.flatnonzero(store.completed())
    tr, va = split_models(len(done), d["val_fraction"], p["train"]["seed"])
    x_tr, y_tr = store.read("masks", done[tr]).astype(np.float64), store.read("test_margins", done[tr]).astype(np.float64)
    x_va, y_va = store.read("masks", done[va]).astype(np.float64), store.read("test_margins", done[va]).astype(np.float64)

    t0 = time.perf_counter()
    train_m, val_m = Moments.from_blocks(store_blocks(store, done[tr])), Moments.from_blocks(store_blocks(store, done[va]))
    dm, diag = fit_datamodels(train_m, val_m, num_lambdas=d["num_lambdas"], eps=d["eps"], max_iter=d["max_iter"], tol=d["tol"], progress=False)
    t_ours = time.perf_counter() - t0
    ours_val_mse = np.nanmin(diag["val_mse_path"], axis=0)

    T = y_tr.shape[1]
    targets = np.arange(T) if args.sklearn_targets <= 0 else np.linspace(0, T - 1, args.sklearn_targets).astype(int)
    grid = lambda_grid(train_m.standardised()[4], d["num_lambdas"], d["eps"])
    t0 = time.perf_counter()
    sk_mse = np.array([sklearn_fit(x_tr, y_tr, x_va, y_va, grid[:, t], t)[0] for t in targets])
    t_sk = (time.perf_counter() - t0) * T / len(targets)
    write_result("datamodels_fit", {
        "ours": t_ours, "baseline": t_sk, "ratio": t_sk / t_ours, "unit": "seconds to fit all targets",
        "ours_val_mse_mean": float(ours_val_mse[targets].mean()), "baseline_val_mse_mean": float(sk_mse.mean()),
        "ours_val_mse_mean_all_targets": float(ours_val_mse.mean()),
        "baseline_timed_targets": int(len(targets)), "baseline_time_scaled_to_all": len(targets) < T,
        "settings": {"train_models": int(len(tr)), "val_models": int(len(va)), "n_train": int(x_tr.shape[1]), "targets": int(T),
                     "num_lambdas": d["num_lambdas"], "eps": d["eps"], "ours_early_stopping": True, "sklearn_full_path": True},
    })


if __name__ == "__main__":
    main()
