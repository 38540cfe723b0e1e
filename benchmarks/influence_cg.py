"""Influence by CG over all parameters for stage 05's grid of dampings: one multi-shift CG
run (every damping from one Krylov sequence) vs the grid run one damping at a time, from the
largest down to the first indefinite system (how stage 05 ran it before), in the same run,
on the embedded profile's first checkpoint and all its targets.

The two must agree (each damping's scores, up to rounding); the ratio is the speed-up.
Needs the `train_subsets` stage's store (`make repro`).

    python benchmarks/influence_cg.py
"""
from __future__ import annotations

import time

import numpy as np

from _common import ROOT, write_result
from datalens.attribution import baselines
from datalens.core.config import stage_params
from datalens.training.runs import SubsetRun

CG_ITERS = 30  # stage 05's (comparison.run_gradient_baselines)


def one_at_a_time(args, dampings) -> dict[float, np.ndarray]:
    out = {}
    for d in sorted(dampings, reverse=True):
        try:
            out[d] = baselines.influence_cg(*args, damping=d, iters=CG_ITERS)
        except ValueError:  # indefinite: so is every smaller damping
            break
    return out


def main() -> None:
    p = stage_params("attribution_comparison", ROOT / "params.yaml", {"device": "cpu"})
    run = SubsetRun.from_params(p)
    store = run.open_store()
    x_tr, y_tr, x_te, y_te = run.dataset_().tensors("cpu")
    args = (run.make_task(), run.load_checkpoint(store, 0, "cpu"), x_tr, y_tr, store.read("masks", np.arange(1))[0], x_te, y_te)
    dampings = [float(d) for d in p["attribution"]["dampings"]]
    t0 = time.perf_counter()
    ours = baselines.influence_cg(*args, damping=dampings, iters=CG_ITERS)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = one_at_a_time(args, dampings)
    t_base = time.perf_counter() - t0
    if sorted(ours) != sorted(base):
        raise SystemExit(f"the two keep different dampings: {sorted(ours)} vs {sorted(base)}")
    write_result("influence_cg", {
        "ours": t_ours, "baseline": t_base, "ratio": t_base / t_ours, "unit": "seconds for the damping grid",
        "dampings_tried": dampings, "dampings_kept": sorted(ours),
        "max_relative_difference": {str(d): float(np.abs(ours[d] - base[d]).max() / np.abs(base[d]).max()) for d in ours},
        "settings": {"cg_iters": CG_ITERS, "parameters": sum(t.numel() for t in args[1].parameters()),
                     "targets": len(y_te), "training_examples": int(args[4].sum())},
    })


if __name__ == "__main__":
    main()
