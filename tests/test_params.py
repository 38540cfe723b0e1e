import pytest
import yaml

from datalens.config import ParamError, declared_params, stage_params


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("data.dataset", "mnist", r"data.dataset='mnist'.*digits, cifar10, cifar2"),
        ("model.name", "vit", r"model.name='vit'.*mlp, cnn, resnet9"),
        ("train.alpha", 0.0, r"train.alpha=0.0.*\(0.0, 1.0\]"),
        ("train.alpha", 1.2, r"train.alpha=1.2"),
        ("train.num_models", 0, r"train.num_models=0.*integer >= 1"),
        ("train.num_models", -5, r"train.num_models=-5"),
        ("train.epochs", 0, r"train.epochs=0.*integer >= 1"),
        ("train.block_size", 0, r"train.block_size=0"),
        ("execution.backend", "slurm", r"execution.backend='slurm'.*local, ray"),
        ("train.precision", "float16", r"train.precision='float16'.*float32, bfloat16"),
    ],
)
def test_bad_params_are_refused_with_the_key_and_allowed_values(root, key, value, pattern):
    with pytest.raises(ParamError, match=pattern):
        stage_params("train_subsets", root / "params.yaml", {key: value})


def test_override_of_an_undeclared_key_is_refused(root):
    with pytest.raises(ParamError, match="not a param of stage 'train_subsets'"):
        stage_params("train_subsets", root / "params.yaml", {"datamodels.eps": 0.1})


def test_stage_gets_exactly_its_declared_params(root):
    p = stage_params("train_subsets", root / "params.yaml")
    declared = declared_params("train_subsets", root)
    assert "model" in declared and p["model"]["name"] == "mlp"
    assert set(p) - {"_root"} == {k.split(".")[0] for k in declared}
    assert set(p["train"]) == {k.split(".", 1)[1] for k in declared if k.startswith("train.")}


def test_every_declared_param_of_every_stage_exists_and_validates(root):
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        stage_params(stage, root / "params.yaml")  # raises if a key is missing or invalid


def test_the_cifar_profile_is_valid(root, tmp_path):
    # The paper-scale profile validates against the same schema (it cannot run here: no GPU, no data).
    import shutil
    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(root / "profiles" / "cifar10.yaml", tmp_path / "params.yaml")
    p = stage_params("train_subsets", tmp_path / "params.yaml", environment=False)  # it names a GPU this machine lacks
    assert p["model"]["name"] == "resnet9" and p["data"]["dataset"] == "cifar10"
