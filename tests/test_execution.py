"""The Ray executor on a real local Ray instance (num_cpus=2)."""
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_run
from datalens.core.execution import BlockJobError, RayExecutor, make_executor
from datalens.core.store import open_existing
from datalens.training.engine import TrainSettings
from datalens.training.runs import prepare_store, train_subset_models

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_instance():
    import ray
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _assert_equal_stores(a, b):
    assert a.completed().all() and b.completed().all()
    np.testing.assert_array_equal(a.read("masks"), b.read("masks"))
    for name in ("test_outputs", "train_outputs"):
        np.testing.assert_allclose(a.read(name), b.read(name), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.checkpoint(1), b.checkpoint(1), rtol=1e-5, atol=1e-5)


def test_unreachable_cluster_address_fails_fast_with_the_param_named():
    with pytest.raises(ConnectionError, match=r"execution.address='127.0.0.1:1'.*ray start --head"):
        RayExecutor(address="127.0.0.1:1", connect_timeout=2)
    with pytest.raises(ValueError, match="execution.address='nowhere'"):
        RayExecutor(address="nowhere")


def test_local_and_ray_give_equal_stores(tmp_path, ray_instance):
    local = train_subset_models(tiny_run(tmp_path / "local.zarr"), progress=False)
    executor = make_executor({"backend": "ray", "address": "local", "num_cpus_per_task": 1, "num_gpus_per_task": 0, "max_retries": 1})
    distributed = train_subset_models(tiny_run(tmp_path / "ray.zarr"), executor=executor, progress=False)
    _assert_equal_stores(local, distributed)


def test_killed_worker_is_retried_and_the_store_completes(tmp_path, ray_instance):
    from ray_helpers import die_once_then_train
    run = tiny_run(tmp_path / "ray.zarr")
    store = prepare_store(run)
    marker = tmp_path / "died_once"
    jobs = [(str(marker), run, b) for b in range(store.num_blocks)]
    done = list(RayExecutor(max_retries=2).map_unordered(die_once_then_train, jobs))
    assert marker.exists() and sorted(d["block"] for d in done) == [0, 1, 2]
    _assert_equal_stores(open_existing(run.store), train_subset_models(tiny_run(tmp_path / "local.zarr"), progress=False))


def test_task_error_names_the_models(tmp_path, ray_instance):
    from ray_helpers import fail
    run = tiny_run(tmp_path / "s.zarr")
    prepare_store(run)
    with pytest.raises(BlockJobError, match=r"models 4\.\.7.*boom"):
        list(RayExecutor(max_retries=0).map_unordered(fail, [(run, 1)], describe=lambda a: "models 4..7"))


def test_driver_killed_mid_stage_then_rerun_trains_only_the_missing_models(tmp_path, monkeypatch):
    store_url = tmp_path / "s.zarr"
    proc = subprocess.Popen([sys.executable, str(TESTS / "driver_child.py"), str(store_url)])
    deadline = time.monotonic() + 600  # a hang guard, not a speed bound
    while True:
        assert proc.poll() is None, "driver finished before it could be killed"
        assert time.monotonic() < deadline, "driver never completed a block"
        try:
            if open_existing(str(store_url)).completed().any():
                break
        except Exception:
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # the driver's Ray instance notices its owner is gone and stops its workers
    partial = open_existing(str(store_url)).completed()

    import datalens.training.runs as tr
    trained = []
    real = tr.train_block
    monkeypatch.setattr(tr, "train_block", lambda r, b: trained.append(b) or real(r, b))
    run = tiny_run(store_url, num_models=24, settings=TrainSettings(epochs=60))
    store = train_subset_models(run, progress=False)
    done_before = {b for b in range(6) if partial.reshape(6, -1)[b].all()}
    assert done_before and set(trained).isdisjoint(done_before)  # finished models are never retrained
    assert set(trained) | done_before == set(range(6))
    assert store.completed().all()
    reference = train_subset_models(replace(run, store=str(tmp_path / "ref.zarr")), progress=False)
    for name in ("masks", "test_outputs"):
        np.testing.assert_allclose(store.read(name), reference.read(name), rtol=1e-5, atol=1e-5)
