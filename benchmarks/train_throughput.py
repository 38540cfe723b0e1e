"""Models per second of the subset-training engine vs a naive per-model PyTorch loop,
same hyperparameters (params.yaml), same masks and initialisations, same run.

The baseline is the textbook float32 loop. When params.yaml trains in bfloat16 mixed
precision, the same loop under ``torch.autocast`` is timed too (``baseline_autocast``),
so the share of the speed-up that comes from precision alone is on record.

    python benchmarks/train_throughput.py [--models 100]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import ROOT, write_result
from datalens.config import stage_params
from datalens.training import SubsetRun, cached_dataset, init_models, margins_from_logits, train_range


def naive_loop(run: SubsetRun, masks: np.ndarray, seeds: list[int], autocast: bool = False) -> tuple[np.ndarray, float]:
    """One model at a time, the textbook way: its own subset tensor, its own optimizer."""
    ds = cached_dataset(run.dataset, run.data_root)
    x, y, xt, yt = ds.tensors()
    s = run.settings
    out, correct = [], []
    for model, mask in zip(init_models(lambda: run.build_model(ds), seeds), masks):
        xs, ys = x[torch.tensor(mask)], y[torch.tensor(mask)]
        opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        for _ in range(s.epochs):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(xs)
            loss = F.cross_entropy(logits.float(), ys)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = model(xt)
            out.append(margins_from_logits(logits, yt))
            correct.append((logits.argmax(1) == yt).float().mean())
    return torch.stack(out).numpy(), float(torch.stack(correct).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=200)
    args = ap.parse_args()
    p = stage_params("train_subsets", ROOT / "params.yaml", {"device": "cpu"})
    run = SubsetRun.from_params(p, store="memory://bench", num_models=args.models)
    if run.settings.batch_size != 0 or run.settings.optimizer != "adam":
        raise SystemExit("this benchmark compares full-batch Adam, the embedded profile's setting")
    # warm up both (data load, first-use imports inside torch) so only training is timed
    train_range(run, 0, 1)
    naive_loop(SubsetRun.from_params(p, store="memory://bench", num_models=1), train_range(run, 0, 1)["masks"], run.model_seeds(0, 1))
    t0 = time.perf_counter()
    ours = train_range(run, 0, args.models)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base, acc_base = naive_loop(run, ours["masks"], run.model_seeds(0, args.models))
    t_base = time.perf_counter() - t0
    acc_ours = float(ours["test_accuracy"].mean())
    autocast = {}
    if run.settings.precision == "bfloat16":
        t0 = time.perf_counter()
        _, acc_auto = naive_loop(run, ours["masks"], run.model_seeds(0, args.models), autocast=True)
        t_auto = time.perf_counter() - t0
        autocast = {"baseline_autocast": args.models / t_auto, "ratio_vs_autocast": t_auto / t_ours,
                    "baseline_autocast_test_accuracy": acc_auto}
    write_result("train_throughput", {
        "ours": args.models / t_ours, "baseline": args.models / t_base, "ratio": t_base / t_ours,
        "unit": "models/s", "ours_seconds": t_ours, "baseline_seconds": t_base,
        "ours_test_accuracy": acc_ours, "baseline_test_accuracy": acc_base,
        **autocast,
        "max_abs_margin_difference": float(np.abs(ours["test_margins"] - base).max()),
        "settings": {"models": args.models, "model": run.model, **run.model_kwargs, "epochs": run.settings.epochs,
                     "lr": run.settings.lr, "weight_decay": run.settings.weight_decay, "alpha": run.alpha,
                     "precision": run.settings.precision, "baseline_precision": "float32"},
    })


if __name__ == "__main__":
    main()
