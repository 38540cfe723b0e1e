"""The GPU smoke check (benchmarks/gpu_smoke.sh) on the CPU at tiny sizes, through the paper
profile's params, and the synthetic CIFAR-format data it trains on."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from datalens.core.data import load_cifar
from datalens.core.synthetic import learnable_images, write_cifar_tarball


def test_synthetic_cifar_data_reads_back_through_the_cifar_reader_and_a_linear_model_learns_it(tmp_path):
    train, test = learnable_images(300, seed=1), learnable_images(100, seed=2)
    write_cifar_tarball(tmp_path, train, test)
    ds = load_cifar(tmp_path)
    assert (ds.n_train, ds.n_test, ds.num_classes) == (300, 100, 10)
    np.testing.assert_array_equal(ds.y_train, train[1])
    # the official layout: channel-major rows of 1024 pixels, red plane first
    np.testing.assert_allclose(ds.images_train[5, :, :, 0], train[0][5, :1024].reshape(32, 32) / 255.0)
    np.testing.assert_allclose(ds.images_test[7, :, :, 2], test[0][7, 2048:].reshape(32, 32) / 255.0)
    clf = LogisticRegression(max_iter=500).fit(train[0] / 255.0, train[1])
    assert clf.score(test[0] / 255.0, test[1]) > 0.9  # class templates shared by both draws: learnable
    shuffled = LogisticRegression(max_iter=500).fit(train[0] / 255.0, np.random.default_rng(0).permutation(train[1]))
    assert shuffled.score(test[0] / 255.0, test[1]) < 0.4  # and it is the labels' templates that carry it


@pytest.mark.slow
def test_the_gpu_smoke_script_runs_the_paper_profile_on_the_cpu_at_tiny_sizes(root, tmp_path):
    args = ["--device", "cpu", "--models", "6", "--block-size", "3", "--n-train", "60", "--n-test", "20", "--epochs", "1",
            "--width", "4", "--trak-models", "2", "--proj-dim", "32", "--targets", "10", "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_smoke.sh"), *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_smoke.json").read_text())
    assert result["device"] == "cpu" and result["settings"]["model"] == "resnet9" and result["settings"]["augment"]
    assert result["settings"]["batch_size"] == 512 and result["settings"]["precision"] == "bfloat16"  # the profile's recipe
    assert result["train"]["models"] == 6 and result["trak"]["checkpoints"] == 2 and result["datamodels"]["targets"] == 10
    assert all(math.isfinite(result[step][key]) for step, key in
               [("train", "models_per_second"), ("train", "test_accuracy_mean"), ("trak", "seconds_per_checkpoint"),
                ("trak", "lds_on_the_training_models"), ("datamodels", "seconds")])
    refused = subprocess.run(["bash", str(root / "benchmarks" / "gpu_smoke.sh"), "--device", "cpu", "--targets", "30", "--n-test", "20"],
                             env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "--targets 30 is more than --n-test 20" in refused.stderr
