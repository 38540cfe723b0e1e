"""Tests force the CPU and tiny sizes through the same config path users take."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_run(store: Path | str, **changes):
    """A small digits run: 12 models in blocks of 4, a 16-unit MLP, 5 full-batch epochs, CPU."""
    from datalens.training.engine import TrainSettings
    from datalens.training.runs import SubsetRun

    run = SubsetRun(
        dataset="digits", data_root=str(ROOT / "data"), model="mlp", model_kwargs={"hidden": [16]},
        settings=TrainSettings(epochs=5, lr=1e-2, weight_decay=1e-3), alpha=0.5, seed=0, num_models=12,
        block_size=4, store=str(store), num_checkpoints=2, device="cpu",
    )
    return replace(run, **changes)


@pytest.fixture
def root() -> Path:
    return ROOT
