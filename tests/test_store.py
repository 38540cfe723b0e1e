import numpy as np
import pytest
import zarr

from conftest import tiny_run
from datalens.store import StoreError, open_existing
from datalens.runs import prepare_store, train_range, train_subset_models


def test_run_fills_the_store_and_matches_direct_training(tmp_path):
    run = tiny_run(tmp_path / "s.zarr")
    store = train_subset_models(run, progress=False)
    assert store.completed().all()
    direct = train_range(run, 4, 8)
    np.testing.assert_array_equal(store.read("masks", slice(4, 8)), direct["masks"])
    np.testing.assert_allclose(store.read("test_margins", slice(4, 8)), direct["test_margins"], rtol=1e-5, atol=1e-5)
    assert store.read("train_margins").shape == (12, 1347)
    assert np.isfinite(store.checkpoint(1)).all()
    with pytest.raises(IndexError, match="num_checkpoints=2"):
        store.checkpoint(5)


def test_rerun_skips_completed_models_and_grows_when_asked(tmp_path, monkeypatch):
    run = tiny_run(tmp_path / "s.zarr")
    train_subset_models(run, progress=False)
    import datalens.runs as tr
    calls = []
    real = tr.train_block
    monkeypatch.setattr(tr, "train_block", lambda r, b: calls.append(b) or real(r, b))
    train_subset_models(run, progress=False)
    assert calls == []
    bigger = tiny_run(tmp_path / "s.zarr", num_models=20)
    store = train_subset_models(bigger, progress=False)
    assert calls == [3, 4] and store.completed().all() and store.num_models == 20


@pytest.mark.parametrize("change,key", [({"alpha": 0.3}, "train.alpha"), ({"seed": 1}, "seed"), ({"model_kwargs": {"hidden": [8]}}, "model.hidden")])
def test_store_made_under_other_params_is_refused(tmp_path, change, key):
    train_subset_models(tiny_run(tmp_path / "s.zarr"), progress=False)
    with pytest.raises(StoreError, match=rf"made with {key}=.*now say {key}="):
        prepare_store(tiny_run(tmp_path / "s.zarr", **change))
    # nothing already computed was lost
    assert open_existing(str(tmp_path / "s.zarr")).completed().all()


def test_corrupted_store_is_named_and_left_in_place(tmp_path):
    url = tmp_path / "s.zarr"
    train_subset_models(tiny_run(url), progress=False)
    group = zarr.open_group(str(url), mode="r+")
    del group["completed"]
    with pytest.raises(StoreError, match="corrupted or not a datalens subset store"):
        prepare_store(tiny_run(url))
    assert (url / "masks").exists()


def test_store_works_on_an_fsspec_url():
    run = tiny_run("memory://datalens-test/s.zarr", num_models=4)
    store = train_subset_models(run, progress=False)
    assert store.completed().all() and store.read("test_margins").shape == (4, 450)
