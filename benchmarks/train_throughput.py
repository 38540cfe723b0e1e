"""Models per second of the subset-training engine vs a naive per-model PyTorch loop,
same hyperparameters (params.yaml), same masks and initialisations, same run.

The baseline is the textbook float32 loop. When params.yaml trains in bfloat16 mixed
precision, the same loop under ``torch.autocast`` is timed too (``baseline_autocast``),
so the share of the speed-up that comes from precision alone is on record.

    python benchmarks/train_throughput.py [--models 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from _common import ROOT, write_result
from datalens.core.config import stage_params
from datalens.training.engine import init_models
from datalens.tasks.classification import margins_from_logits
from datalens.training.runs import SubsetRun, train_range


def naive_loop(run: SubsetRun, masks: np.ndarray, seeds: list[int], autocast: bool = False) -> tuple[np.ndarray, float]:
    """One model at a time, the textbook way: its own subset tensor, its own optimizer."""
    x, y, xt, yt = run.dataset_().tensors()
    s = run.settings
    out, correct = [], []
    for model, mask in zip(init_models(run.build_model, seeds), masks):
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
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    p = stage_params("train_subsets", ROOT / "params.yaml", {"device": "cpu"})
    run = SubsetRun.from_params(p, store="memory://bench", num_models=args.models)
    if run.settings.batch_size != 0 or run.settings.optimizer != "adam":
        raise SystemExit("this benchmark compares full-batch Adam, the embedded profile's setting")
    # Warm up both (data load, first-use imports, oneDNN's kernel per stack shape) on other
    # masks, so only training is timed; then the median of --repeats timings of each.
    warm = train_range(run, args.models, args.models + 2 * run.stack_size)
    naive_loop(run, warm["masks"][:1], run.model_seeds(args.models, args.models + 1))

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return out, float(np.median(times)), times

    ours, t_ours, ours_times = timed(lambda: train_range(run, 0, args.models))
    masks, seeds = ours["masks"], run.model_seeds(0, args.models)
    (base, acc_base), t_base, base_times = timed(lambda: naive_loop(run, masks, seeds))
    acc_ours = float(ours["test_metric"].mean())
    autocast = {}
    if run.settings.precision == "bfloat16":
        (_, acc_auto), t_auto, _ = timed(lambda: naive_loop(run, masks, seeds, autocast=True))
        autocast = {"baseline_autocast": args.models / t_auto, "ratio_vs_autocast": t_auto / t_ours,
                    "baseline_autocast_test_accuracy": acc_auto}
    write_result("train_throughput", {
        "ours": args.models / t_ours, "baseline": args.models / t_base, "ratio": t_base / t_ours,
        "unit": "models/s", "ours_seconds": t_ours, "baseline_seconds": t_base,
        "ours_seconds_each": ours_times, "baseline_seconds_each": base_times,
        "ours_test_accuracy": acc_ours, "baseline_test_accuracy": acc_base,
        **autocast,
        "max_abs_margin_difference": float(np.abs(ours["test_outputs"] - base).max()),
        "settings": {"models": args.models, "repeats": args.repeats, "stack_size": run.stack_size, "model": run.model, **run.model_kwargs, "epochs": run.settings.epochs,
                     "lr": run.settings.lr, "weight_decay": run.settings.weight_decay, "alpha": run.alpha,
                     "precision": run.settings.precision, "baseline_precision": "float32"},
    })


if __name__ == "__main__":
    main()
