"""What ``train.precision: bfloat16`` costs and buys on the embedded profile: the same
masks and seeds trained in float32 and in bfloat16 mixed precision, in the same run.

Each mask is trained with two seeds (the ``seed_agreement`` stream), so the JSON has, per
precision, speed, mean test accuracy and seed agreement (the noise ceiling every later
method lives under), plus how closely the same model agrees across the two precisions.
``ratio`` = bfloat16 speed / float32 speed.

    python benchmarks/train_precision.py [--masks 200]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from _common import ROOT, write_result
from datalens.core.config import stage_params
from datalens.evaluation.metrics import seed_agreement
from datalens.training.runs import SubsetRun, train_range


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--masks", type=int, default=200)
    args = ap.parse_args()
    p = stage_params("train_subsets", ROOT / "params.yaml", {"device": "cpu"})
    n = 2 * args.masks
    base = SubsetRun.from_params(p, store="memory://bench", num_models=n, repeats=2, stream="seed_agreement")
    out = {}
    for precision in ("float32", "bfloat16"):
        run = replace(base, settings=replace(base.settings, precision=precision))
        train_range(run, 0, 8)  # warm up: first-use kernel compilation is not training
        t0 = time.perf_counter()
        res = train_range(run, 0, n)
        seconds = time.perf_counter() - t0
        m = res["test_outputs"]
        out[precision] = {"models_per_second": n / seconds, "test_metric": float(res["test_metric"].mean()),
                          "seed_agreement": seed_agreement(m[0::2], m[1::2]), "margins": m}
    a, b = out["float32"].pop("margins"), out["bfloat16"].pop("margins")
    write_result("train_precision", {
        "ours": out["bfloat16"]["models_per_second"], "baseline": out["float32"]["models_per_second"],
        "ratio": out["bfloat16"]["models_per_second"] / out["float32"]["models_per_second"], "unit": "models/s",
        **{f"{prec}_{k}": v for prec, d in out.items() for k, v in d.items()},
        "same_model_margin_correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
        "same_model_max_abs_margin_difference": float(np.abs(a - b).max()),
        "settings": {"masks": args.masks, "seeds_per_mask": 2, "model": base.model, **base.model_kwargs,
                     "epochs": base.settings.epochs, "stack_size": base.stack_size},
    })


if __name__ == "__main__":
    main()
