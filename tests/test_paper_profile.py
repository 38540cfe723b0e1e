"""The paper-scale profile (profiles/cifar10.yaml) runs end to end, through the same notebooks
and params path, on tiny CIFAR-format data: ResNet-9 subset models, then ModelDiff's two SGD
noise levels and the planted patch, and unlearning (ResNet-9 base models, oracles, every method).
Only sizes are overridden, never the recipe."""
import json
import shutil

import papermill as pm
import pytest

from test_data import _tiny_cifar_tarball

TINY = {"device": "cpu", "model.width": 4, "train.num_models": 24, "train.block_size": 12, "train.epochs": 1,
        "train.batch_size": 50, "train.num_checkpoints": 4, "train.peak_epoch": 1, "execution.backend": "local",
        "execution.num_gpus_per_task": 0}
MODELDIFF = {"modeldiff.num_models": 20, "modeldiff.num_checkpoints": 3, "modeldiff.trak_models": 2,
             "modeldiff.patch": {"label": 0, "count": 3, "test_count": 0, "size": 3, "row": 0, "col": 0, "value": 2.0, "seed": 0},
             "modeldiff.natural_b": {"train.lr": 0.1, "train.batch_size": 25}}


@pytest.mark.slow
def test_the_cifar_profile_runs_end_to_end_on_tiny_cifar_data(root, tmp_path):
    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(root / "profiles" / "cifar10.yaml", tmp_path / "params.yaml")
    (tmp_path / "data").mkdir()
    labels = _tiny_cifar_tarball(tmp_path / "data" / "cifar-10-python.tar.gz", per_batch=20)
    assert sum(y.count(0) for name, (_, y) in labels.items() if name != "test_batch") >= 3
    common = {**TINY, "data.root": str(tmp_path / "data")}
    unlearn = {"unlearning.num_models": 5, "unlearning.om_oracles": 2, "unlearning.budgets": [0.5], "unlearning.lasso_targets": 10,
               "unlearning.forget_sets": [{"name": "r", "kind": "random", "size": 3}, {"name": "pc", "kind": "component", "component": 1, "size": 3},
                                          {"name": "s", "kind": "random", "size": 3, "select": True},
                                          {"name": "spc", "kind": "component", "component": 2, "size": 3, "select": True}],
               "datamodels.num_lambdas": 5, "datamodels.max_iter": 20}
    runs = [("01_train_subsets", common), ("07_unlearning", {**common, **unlearn}),  # 07 reads the base run's store
            ("06_modeldiff_train", {**common, **MODELDIFF}),
            ("06_modeldiff", {**common, **MODELDIFF, "modeldiff.num_components": 2, "datamodels.num_lambdas": 5,
                              "datamodels.max_iter": 20})]
    for name, overrides in runs:
        out = tmp_path / name
        pm.execute_notebook(str(root / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.out.ipynb"),
                            parameters={"params_file": str(tmp_path / "params.yaml"), "overrides": overrides, "out_dir": str(out)},
                            cwd=str(root / "notebooks"), progress_bar=False, kernel_name="python3")
    trained = json.loads((tmp_path / "06_modeldiff_train" / "results.json").read_text())
    assert trained["natural_a"]["model"] == "resnet9" and trained["natural_b"]["models"] == 20
    result = json.loads((tmp_path / "06_modeldiff" / "results.json").read_text())
    assert set(result["accuracy"]) == {"planted_a", "planted_b", "natural_a", "natural_b", "control"}
    assert len(result["planted"]["intervention"]["planted_b"]) == 3  # one record per patch intensity
    assert len(list((tmp_path / "stores" / "modeldiff" / "planted_b").glob("*.zarr"))) == 1  # stores land beside the params file
    unlearned = json.loads((tmp_path / "07_unlearning" / "results.json").read_text())
    assert set(unlearned["verdict"]) == {"r", "pc"} and unlearned["num_models"] == 5  # ResNet-9s unlearned as one stack
