"""Throughput of the Ray executor (local instance, 2 CPUs) against in-process execution,
on the same blocks of the embedded profile, in the same run: the overhead ratio.

    python benchmarks/scaling.py [--models 400]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import numpy as np

from _common import ROOT, write_result
from datalens.core.config import stage_params
from datalens.core.execution import LocalExecutor, RayExecutor
from datalens.training.runs import SubsetRun, train_subset_models
from datalens.core.store import open_existing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=400)
    ap.add_argument("--block-size", type=int, default=50)
    args = ap.parse_args()
    p = stage_params("train_subsets", ROOT / "params.yaml", {"device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        base = SubsetRun.from_params(p, num_models=args.models)
        base = replace(base, block_size=args.block_size, num_checkpoints=0)
        t0 = time.perf_counter()
        train_subset_models(replace(base, store=f"{tmp}/local.zarr"), executor=LocalExecutor(), progress=False)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        executor = RayExecutor("local", num_cpus_per_task=1, num_cpus=2)
        t_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray_store = train_subset_models(replace(base, store=f"{tmp}/ray.zarr"), executor=executor, progress=False)
        t_ray = time.perf_counter() - t0
        local_store = open_existing(f"{tmp}/local.zarr")
        diff = float(np.abs(local_store.read("test_outputs") - ray_store.read("test_outputs")).max())
    write_result("scaling", {
        "ours": args.models / t_ray, "baseline": args.models / t_local, "ratio": t_local / t_ray,
        "unit": "models/s (ours = ray with 2 one-CPU workers, baseline = local in-process)",
        "ray_startup_seconds": t_start, "ray_seconds": t_ray, "local_seconds": t_local,
        "seconds_per_model_local": t_local / args.models, "max_abs_margin_difference": diff,
        "settings": {"models": args.models, "block_size": args.block_size},
    })


if __name__ == "__main__":
    main()
