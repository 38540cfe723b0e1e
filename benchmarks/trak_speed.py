"""TRAK featurize + score on the embedded profile: ours vs the public reference
implementation (PyPI ``traker`` 0.3.2, a bench extra), on the same checkpoints, both
float32 on CPU, in the same run. Wall time and LDS on the held-out evaluation models.

traker gets the same ridge: ours is lambda = ridge * trace(Phi^T Phi) / k per model, and
trace(Phi^T Phi) ~ sum_i |g_i|^2 (our P preserves norms). traker's features are
g P / sqrt(d) with ±1 entries, so its trace ~ k sum_i |g_i|^2 / d and it gets
``lambda_reg = ridge * mean_m sum_i |g_i|^2 / d`` (computed outside the timing).

Our features are float32. On CPUs with VNNI the projection splits each gradient row into
four int8 slices and multiplies them exactly with P's ±1 signs (``trak.int8_slices``); the
JSON records its error and a float32 GEMM's, both against a float64 product.
Both sides are warmed up at the timed shapes first, and traker is imported outside the
timed region. Needs the stores of `make repro`.

    python benchmarks/trak_speed.py [--models 10] [--proj-dim 2048] [--ridge 1.0]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings

import numpy as np
import torch

from trak import TRAKer  # the reference, imported outside the timed region

from _common import ROOT, write_result
from datalens.attribution import trak
from datalens.core.config import stage_params
from datalens.evaluation.metrics import heldout_arrays, linear_datamodeling_score
from datalens.tasks.classification import ClassificationTask
from datalens.tasks.gradients import per_example_gradients
from datalens.attribution.projection import Projector
from datalens.training.runs import SubsetRun, eval_run

TASK = ClassificationTask()


def ours(models, ds, k, ridge, seed):
    feats = [trak.featurize(TASK, m, *ds.tensors(), k, seed, i) for i, m in enumerate(models)]
    return trak.trak_scores(feats, ridge)


def reference(models, ds, k, lambda_reg, seed):
    x_tr, y_tr, x_te, y_te = ds.tensors()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traker = TRAKer(model=models[0], task="image_classification", train_set_size=len(x_tr), save_dir=tmp,
                        device="cpu", proj_dim=k, use_half_precision=False, projector_seed=seed, logging_level=logging.ERROR,
                        lambda_reg=lambda_reg)
        for i, m in enumerate(models):
            traker.load_checkpoint(m.state_dict(), model_id=i)
            traker.featurize(batch=(x_tr, y_tr), num_samples=len(x_tr))
        traker.finalize_features()
        for i, m in enumerate(models):
            traker.start_scoring_checkpoint("bench", m.state_dict(), model_id=i, num_targets=len(x_te))
            traker.score(batch=(x_te, y_te), num_samples=len(x_te))
        return np.asarray(traker.finalize_scores(exp_name="bench"), dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--ridge", type=float, default=1.0)  # what validation picks at k = 2048 (stage 05)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    p = stage_params("attribution_comparison", ROOT / "params.yaml", {"device": "cpu"})
    run = SubsetRun.from_params(p)
    ds = run.dataset_()
    store = run.open_store()
    masks, actual_mean, actual_single = heldout_arrays(eval_run(p).open_store(), p["evaluation"]["repeats"])
    models = [run.load_checkpoint(store, m) for m in range(args.models)]
    x_tr, y_tr, _, _ = ds.tensors()
    d = sum(q.numel() for q in models[0].parameters())
    sq_norm = np.mean([float((per_example_gradients(m, x_tr, y_tr, TASK).double() ** 2).sum()) for m in models])
    # warm up both sides at the timed shapes (first-use costs: kernels, allocations, traker's setup)
    ours(models[:1], ds, args.proj_dim, args.ridge, p["train"]["seed"] + 1)
    reference(models[:1], ds, args.proj_dim, args.ridge * sq_norm / d, p["train"]["seed"] + 1)
    t0 = time.perf_counter()
    s_ours = ours(models, ds, args.proj_dim, args.ridge, p["train"]["seed"])
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_ref = reference(models, ds, args.proj_dim, args.ridge * sq_norm / d, p["train"]["seed"])
    t_ref = time.perf_counter() - t0
    # how exact our projection is (on CPUs with VNNI it takes the int8 route), vs a float32 GEMM
    g = per_example_gradients(models[0], x_tr, y_tr, TASK)
    proj = Projector(d, args.proj_dim, p["train"]["seed"], 0)
    exact = g.double() @ proj.matrix().double()
    rel_error = lambda out: float((out.double() - exact).norm() / exact.norm())  # noqa: E731
    lds = {name: linear_datamodeling_score(s, masks, actual_mean) for name, s in (("ours", s_ours), ("traker", s_ref))}
    write_result("trak_speed", {
        "ours": t_ours, "baseline": t_ref, "ratio": t_ref / t_ours, "unit": "seconds (featurize + score)",
        "ours_lds": lds["ours"], "baseline_lds": lds["traker"],
        "ours_lds_single": linear_datamodeling_score(s_ours, masks, actual_single),
        "baseline_lds_single": linear_datamodeling_score(s_ref, masks, actual_single),
        "projection_route": "int8 slices" if proj.uses_int8(g) else "float32 GEMM",
        "projection_rel_error": rel_error(proj.project(g)), "float32_gemm_rel_error": rel_error(g @ proj.matrix()),
        "settings": {"models": args.models, "proj_dim": args.proj_dim, "ridge": args.ridge, "traker_lambda_reg": args.ridge * sq_norm / d, "dtype": "float32", "device": "cpu",
                     "traker": "0.3.2", "lds_ground_truth": f"{len(masks)} held-out masks, mean of {p['evaluation']['repeats']} models"},
    })


if __name__ == "__main__":
    main()
