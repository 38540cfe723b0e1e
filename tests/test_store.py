import numpy as np
import pytest
import zarr

from conftest import tiny_run
from datalens.core.store import StoreError, open_existing
from datalens.training.runs import prepare_store, train_range, train_subset_models


def test_run_fills_the_store_and_matches_direct_training(tmp_path):
    run = tiny_run(tmp_path / "s.zarr")
    store = train_subset_models(run, progress=False)
    assert store.completed().all()
    direct = train_range(run, 4, 8)
    np.testing.assert_array_equal(store.read("masks", slice(4, 8)), direct["masks"])
    np.testing.assert_allclose(store.read("test_outputs", slice(4, 8)), direct["test_outputs"], rtol=1e-5, atol=1e-5)
    assert store.read("train_outputs").shape == (12, 1347)
    assert np.isfinite(store.checkpoint(1)).all()
    with pytest.raises(IndexError, match="num_checkpoints=2"):
        store.checkpoint(5)


def test_rerun_skips_completed_models_and_grows_when_asked(tmp_path, monkeypatch):
    run = tiny_run(tmp_path / "s.zarr")
    train_subset_models(run, progress=False)
    import datalens.training.runs as tr
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
    assert store.completed().all() and store.read("test_outputs").shape == (4, 450)


def test_identity_holds_every_result_param_and_nothing_else(tmp_path):
    from dataclasses import fields, replace
    from datalens.training.engine import TrainSettings
    run = tiny_run(tmp_path / "s.zarr")
    identity = run.identity()
    assert {f"train.{f.name}" for f in fields(TrainSettings)} <= set(identity)
    assert {"data.dataset", "model.name", "model.hidden", "train.alpha", "seed", "stream", "repeats"} <= set(identity)
    assert not {"train.block_size", "train.stack_size", "train.num_checkpoints", "train.store", "device"} & set(identity)
    # how models are grouped, kept or placed does not change the identity, so a store is reused across them
    same = [replace(run, stack_size=2), replace(run, block_size=6), replace(run, num_checkpoints=1), replace(run, device="auto")]
    assert all(r.identity() == identity for r in same)
    for f in fields(TrainSettings):  # every optimisation setting does
        value = getattr(run.settings, f.name)
        changed = {bool: lambda v: not v, str: lambda v: v + "x"}.get(type(value), lambda v: v + 1)(value)
        assert replace(run, settings=replace(run.settings, **{f.name: changed})).identity() != identity, f.name


def test_more_checkpoints_than_the_store_keeps_are_refused(tmp_path):
    train_subset_models(tiny_run(tmp_path / "s.zarr"), progress=False)
    with pytest.raises(StoreError, match="train.num_checkpoints=3"):
        prepare_store(tiny_run(tmp_path / "s.zarr", num_checkpoints=3))
    assert prepare_store(tiny_run(tmp_path / "s.zarr", num_checkpoints=1)).completed().all()  # fewer is fine


def test_feature_store_shares_the_resumable_store_and_featurizes_only_what_is_missing(tmp_path, monkeypatch):
    import datalens.attribution.trak as trak
    from datalens.core.store import ResumableStore
    run = tiny_run(tmp_path / "s.zarr", num_models=4, num_checkpoints=3)
    train_subset_models(run, progress=False)
    job = trak.FeatureJob(run, f"file://{tmp_path}/f.zarr", (8, 16))
    store = trak.featurize_checkpoints(job, 2, progress=False)
    assert isinstance(store, ResumableStore) and store.completed().all()
    done = []
    real = trak.featurize_checkpoint
    monkeypatch.setattr(trak, "featurize_checkpoint", lambda j, m: done.append(m) or real(j, m))
    grown = trak.featurize_checkpoints(job, 3, progress=False)
    assert done == [2] and grown.completed().all()
    # every k is charged its own projection beside the shared gradients
    assert (grown.read("seconds_projection_k16", slice(0, 3)) > 0).all()
    np.testing.assert_allclose(grown.seconds(3, 8) - grown.read("seconds_projection_k8", slice(0, 3)),
                               grown.seconds(3, 16) - grown.read("seconds_projection_k16", slice(0, 3)))


def test_a_store_folder_holds_one_store_per_identity_and_switching_back_trains_nothing(tmp_path, monkeypatch):
    import datalens.training.runs as tr
    first = tiny_run(tmp_path / "stores")  # a folder, not a .zarr path: the location follows the identity
    other = tiny_run(tmp_path / "stores", alpha=0.3)
    train_subset_models(first, progress=False)
    train_subset_models(other, progress=False)
    assert first.location != other.location and {first.location, other.location} == {str(p) for p in (tmp_path / "stores").glob("*.zarr")}
    calls = []
    real = tr.train_block
    monkeypatch.setattr(tr, "train_block", lambda r, b: calls.append(b) or real(r, b))
    back = train_subset_models(first, progress=False)
    assert calls == [] and back.completed().all()


def test_fewer_models_and_another_block_size_reuse_the_first_models(tmp_path, monkeypatch):
    import datalens.training.runs as tr
    full = tiny_run(tmp_path / "stores")  # 12 models in blocks of 4
    whole = train_subset_models(full, progress=False).read("test_outputs")
    calls = []
    real = tr.train_block
    monkeypatch.setattr(tr, "train_block", lambda r, b: calls.append(b) or real(r, b))
    fewer = tiny_run(tmp_path / "stores", num_models=5, block_size=5)  # the block size is layout: the store keeps 4
    assert fewer.location == full.location
    store = train_subset_models(fewer, progress=False)
    assert calls == [] and store.num_models == 5 and store.block_size == 4
    np.testing.assert_array_equal(fewer.open_store().read("test_outputs"), whole[:5])
    # more models than the store holds, with yet another block size: only the new ones train, in the store's blocks
    more = tiny_run(tmp_path / "stores", num_models=14, block_size=7)
    store = train_subset_models(more, progress=False)
    assert calls == [3] and store.completed().all() and store.read("test_outputs").shape[0] == 14
    np.testing.assert_array_equal(store.read("test_outputs", slice(0, 12)), whole)


def test_reading_more_models_than_the_store_holds_is_refused(tmp_path):
    run = tiny_run(tmp_path / "s.zarr")  # 12 models
    train_subset_models(run, progress=False)
    assert run.open_store().num_models == 12
    with pytest.raises(StoreError, match=r"holds 12 units, but the params ask for 20; rerun the stage"):
        tiny_run(tmp_path / "s.zarr", num_models=20).open_store()
