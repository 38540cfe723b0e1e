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


def paper_profile(root: Path, tmp_path: Path) -> Path:
    """The paper profile as a repo of its own in ``tmp_path`` (its dvc.yaml and params.yaml), with
    none of its data: returns the params file."""
    import shutil

    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(root / "profiles" / "cifar10.yaml", tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def run_profile_stage(root: Path, tmp_path: Path, notebook: str, section: str, overrides: dict) -> dict:
    """A section stage of the paper profile (``paper_profile``, its data already under
    ``tmp_path/data``) run on the CPU in-process with ``overrides`` of its ``section`` keys; returns
    its results. Outputs land in ``tmp_path/section``, stores beside the params file."""
    import json

    import papermill as pm

    shared = {"device": "cpu", "execution.backend": "local", "execution.num_gpus_per_task": 0}
    out = tmp_path / section
    pm.execute_notebook(str(root / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / f"{notebook}.out.ipynb"),
                        parameters={"params_file": str(tmp_path / "params.yaml"), "out_dir": str(out),
                                    "overrides": {**shared, **{f"{section}.{k}": v for k, v in overrides.items()}}},
                        cwd=str(root / "notebooks"), progress_bar=False, kernel_name="python3")
    return json.loads((out / "results.json").read_text())


def assert_gradients_match_autograd(model, x, y, task) -> None:
    """The per-example gradients of the task's output (float64) equal a loop of ``torch.autograd.grad``."""
    from datalens.tasks.gradients import per_example_gradients

    got = per_example_gradients(model, x, y, task, dtype=torch.float64)
    for i in range(len(x)):
        f = task.output(task.forward(model, x[i:i + 1], y[i:i + 1]), y[i:i + 1])[0]
        want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, list(model.parameters()))])
        assert torch.allclose(got[i], want, atol=1e-12), i
