import io
import pickle
import tarfile

import numpy as np
import pytest

from datalens.core.data import CIFAR_FETCH_COMMAND, dataset_sizes, load_cifar, load_dataset, load_digits


def test_digits_split_is_fixed_stratified_and_standardised():
    a, b = load_digits(), load_digits()
    assert (a.n_train, a.n_test) == (1347, 450)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    train_freq = np.bincount(a.y_train) / a.n_train
    test_freq = np.bincount(a.y_test) / a.n_test
    assert np.abs(train_freq - test_freq).max() < 0.01
    nonconstant = a.x_train.std(0) > 0
    np.testing.assert_allclose(a.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(a.x_train.std(0)[nonconstant], 1, atol=1e-4)


def _tiny_cifar_tarball(path, per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        names = [f"class{i}".encode() for i in range(10)]
        add("batches.meta", {b"label_names": names})
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            y = list(rng.integers(0, 10, per_batch))
            data[name] = (x, y)
            add(name, {b"data": x, b"labels": y})
    return data


def test_cifar_reader_on_a_tarball_of_the_official_format(tmp_path):
    raw = _tiny_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    ds = load_cifar(tmp_path)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    x0, y0 = raw["data_batch_1"]
    # channel-major rows of 1024 pixels: red plane first
    np.testing.assert_allclose(ds.images_train[0, :, :, 0], x0[0, :1024].reshape(32, 32) / 255.0)
    np.testing.assert_array_equal(ds.y_train[:6], y0)
    two = load_dataset("cifar2", tmp_path)
    all_labels = np.concatenate([raw[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert two.n_train == int(np.isin(all_labels, [3, 5]).sum())
    assert set(np.unique(two.y_train)) <= {0, 1} and two.class_names == ("class3", "class5")


def test_missing_cifar_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=CIFAR_FETCH_COMMAND.replace(".", r"\.")):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="data.dataset='mnist'.*digits"):
        load_dataset("mnist")


def test_data_dvc_imports_the_official_tarball_with_its_checksum(root):
    import yaml
    spec = yaml.safe_load((root / "data.dvc").read_text())
    assert spec["deps"][0]["path"] == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    out = spec["outs"][0]
    assert (out["md5"], out["size"], out["path"]) == ("c58f30108f718f92721af3b95e74349a", 170498071, "data/cifar-10-python.tar.gz")


def test_sizes_come_from_the_data(tmp_path):
    assert dataset_sizes("digits") == (1347, 450)
    assert dataset_sizes("cifar10", str(tmp_path)) == (50000, 10000)  # before the tarball is fetched: the published sizes
    _tiny_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    dataset_sizes.cache_clear()  # sizes are cached per process
    assert dataset_sizes("cifar10", str(tmp_path)) == (30, 6)  # then the data's own
