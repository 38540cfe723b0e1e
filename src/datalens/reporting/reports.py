"""Figures and metrics of finished stages, drawn from stores and results (never inside a method)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datalens.reporting import plots
from datalens.core.store import SubsetStore


def report_subset_run(store: SubsetStore, fig_dir) -> dict:
    """Figures and metrics of a finished run: accuracy across models, margin distributions,
    and the mean margin of a target with and without the training example whose inclusion
    moves it most."""
    fig_dir = Path(fig_dir)
    test = store.read("test_outputs")
    masks = store.read("masks")
    acc = store.read("test_metric")
    target = int(np.argmin(np.abs(np.median(test, 0))))  # the least certain target shows effects best
    counts_in = masks.sum(0)
    mean_in = masks.T.astype(np.float64) @ test[:, target] / np.maximum(counts_in, 1)
    mean_out = (~masks).T.astype(np.float64) @ test[:, target] / np.maximum(len(masks) - counts_in, 1)
    train_index = int(np.argmax(np.abs(mean_in - mean_out)))
    plots.accuracy_histogram(acc, fig_dir / "test_accuracy.png")
    plots.margin_distributions(test, np.array([target, 0, 1]), fig_dir / "margin_distributions.png")
    plots.with_without(test[masks[:, train_index], target], test[~masks[:, train_index], target], target, train_index,
                       fig_dir / "with_without.png")
    return {
        "num_models": int(len(test)),
        "test_accuracy_mean": float(acc.mean()),
        "test_accuracy_std": float(acc.std()),
        "subset_size_mean": float(masks.sum(1).mean()),
        "example_target": target,
        "example_train_index": train_index,
        "example_margin_with": float(mean_in[train_index]),
        "example_margin_without": float(mean_out[train_index]),
        "n_train": int(masks.shape[1]),
        "n_test": int(test.shape[1]),
    }
