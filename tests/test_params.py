import pytest
import yaml

from datalens.core.config import ParamError, check_params_file, declared_params, stage_params


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


def test_the_cifar_profile_is_valid_for_every_stage(root, tmp_path):
    # The paper-scale profile validates against the same schema and rules (it cannot run here: no GPU, no data).
    import shutil
    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(root / "profiles" / "cifar10.yaml", tmp_path / "params.yaml")
    check_params_file(tmp_path / "params.yaml")
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]:
        p = stage_params(stage, tmp_path / "params.yaml", environment=False)  # it names a GPU this machine lacks
        expected = {"clip": "datalens.core.coco:coco_captions", "fact_tracing": "datalens.core.ftrace:ftrace",
                    "text_classification": "datalens.core.qnli:qnli", "diffusion": "datalens.core.diffusion:cifar10_denoising"}
        assert (p[stage] if stage in expected else p)["data"]["dataset"] == expected.get(stage, "cifar10")
    assert stage_params("train_subsets", tmp_path / "params.yaml", environment=False)["model"]["name"] == "resnet9"


@pytest.mark.parametrize("overrides,keys", [
    ({"trak.num_models": [1, 60]}, ["trak.num_models", "train.num_checkpoints"]),
    ({"attribution.ensemble_sizes": [1, 51]}, ["attribution.ensemble_sizes", "train.num_checkpoints"]),
    ({"attribution.tracin_epochs": [50, 101]}, ["attribution.tracin_epochs", "train.epochs"]),
    ({"datamodels.model_counts": [250, 3001]}, ["datamodels.model_counts", "train.num_models"]),
    ({"datamodels.model_counts": [40, 250]}, ["datamodels.model_counts", "datamodels.val_fraction"]),
    ({"counterfactuals.num_targets": 451}, ["counterfactuals.num_targets", "data.dataset"]),
    ({"train.peak_epoch": 101}, ["train.peak_epoch", "train.epochs"]),
    ({"attribution.selection_models": 2960}, ["attribution.selection_models", "train.num_checkpoints", "train.num_models"]),
    ({"modeldiff.num_models": 3001}, ["modeldiff.num_models", "train.num_models"]),
    ({"modeldiff.num_checkpoints": 51}, ["modeldiff.num_checkpoints", "train.num_checkpoints"]),
    ({"modeldiff.trak_models": 51}, ["modeldiff.trak_models", "modeldiff.num_checkpoints"]),
    ({"unlearning.om_oracles": 101}, ["unlearning.om_oracles", "unlearning.num_models"]),
    ({"counterfactuals.ks": [5, 2000]}, ["counterfactuals.ks", "data.dataset"]),
    ({"modeldiff.patch": {"label": 0, "count": 2000, "test_count": 300, "size": 2, "row": 0, "col": 0, "value": 3.0, "seed": 0}},
     ["modeldiff.patch", "data.dataset"]),
    ({"unlearning.forget_sets": [{"name": "all", "kind": "random", "size": 1797},
                                 {"name": "s", "kind": "random", "size": 5, "select": True}]}, ["unlearning.forget_sets", "data.dataset"]),
])
def test_params_that_do_not_fit_together_are_refused_in_one_line_naming_the_keys(root, tmp_path, overrides, keys):
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamError) as err:
        check_params_file(tmp_path / "params.yaml")
    message = str(err.value)
    assert "\n" not in message and all(k in message for k in keys), message


@pytest.mark.parametrize("key,value", [
    ("datamodels.eps", 1), ("train.momentum", 1.0), ("train.label_smoothing", 1.0), ("train.lr", float("nan")),
    ("train.lr", float("inf")), ("train.weight_decay", float("inf")), ("attribution.selection_models", 2),
    ("evaluation.num_masks", 3), ("trak.ridge_grid", [1.0, float("nan")]),
])
def test_degenerate_values_are_refused(root, key, value):
    stage = {"datamodels": "fit_datamodels", "evaluation": "eval_models", "trak": "attribution_comparison",
             "attribution": "attribution_comparison"}.get(key.split(".")[0], "train_subsets")
    with pytest.raises(ParamError, match=key.replace(".", r"\.")):
        stage_params(stage, root / "params.yaml", {key: value})


def test_every_problem_is_named_at_once_one_line_each(root, tmp_path):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["alpha"] = 1.5
    params["trak"]["proj_type"] = "sparse"
    params["counterfactuals"]["ks"] = [5, 5000]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamError) as err:
        check_params_file(tmp_path / "params.yaml")
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and [l.split("=")[0] for l in lines] == ["train.alpha", "trak.proj_type", "counterfactuals.ks"], lines


def test_a_yaml_syntax_error_is_one_line_with_its_line_number(root, tmp_path):
    import subprocess
    import sys
    text = (root / "params.yaml").read_text().splitlines()
    at = next(i for i, l in enumerate(text) if l.startswith("train:")) + 2
    text.insert(at, "  alpha: [0.5")  # an unclosed list
    (tmp_path / "params.yaml").write_text("\n".join(text) + "\n")
    done = subprocess.run([sys.executable, "-m", "datalens.core.config", str(tmp_path / "params.yaml")], capture_output=True, text=True)
    said = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0 and len(said) == 1 and "YAML syntax error" in said[0], said
    line = int(said[0].split(" line ")[1].split(",")[0])
    assert at + 1 <= line <= at + 2, said  # the unclosed list, or the line where YAML noticed it


def test_the_paper_profile_on_a_bare_machine_names_every_lack_at_once(root, tmp_path):
    """No GPU, no Ray cluster, no CIFAR tarball (for the base run and for diffusion), no COCO captions, FTRACE or QNLI:
    `python -m datalens.core.config` names every lack, one line each."""
    import os
    import shutil
    import subprocess
    import sys
    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(root / "profiles" / "cifar10.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}  # no GPU, and no `ray start` cluster file
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "datalens.core.config", "params.yaml"], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    said = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0 and all(l.startswith("params: ") for l in said), said
    keys = [l.split("params: ")[1].split("=")[0] for l in said]
    assert keys == ["device", "execution.num_gpus_per_task", "execution.address", "data.root", "clip.data.root", "fact_tracing.data.root",
                    "text_classification.data.root", "diffusion.data.root"], said
    assert "dvc update data.dvc" in said[3] and "dvc update data.dvc" in said[7]


def test_a_gpu_asked_for_where_none_is_visible_is_refused(root):
    with pytest.raises(ParamError, match="execution.num_gpus_per_task=0.5 is not allowed here"):
        stage_params("train_subsets", root / "params.yaml", {"execution.num_gpus_per_task": 0.5})


def test_a_declared_key_missing_from_the_file_is_an_error(root, tmp_path):
    import shutil
    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    del params["train"]["stack_size"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamError, match="'train.stack_size'.*missing"):
        stage_params("train_subsets", tmp_path / "params.yaml")


def test_make_repro_checks_the_whole_file_before_dvc_runs(root):
    makefile = (root / "Makefile").read_text()
    recipe = makefile.split("\nrepro:")[1].split("\n\n")[0]
    assert recipe.index("datalens.core.config params.yaml") < recipe.index("dvc repro")


@pytest.mark.parametrize("value,pattern", [
    ([{"name": "a", "kind": "random", "size": 5}], r"needs at least one set to report and one with select: true"),
    ([{"name": "a", "kind": "random", "size": 5}, {"name": "a", "kind": "random", "size": 5, "select": True}], r"names must be unique"),
    ([{"name": "a", "kind": "cluster", "size": 5}], r"forget_sets\[0\].kind='cluster'.*random, component"),
    ([{"name": "a", "kind": "component", "size": 5}], r"forget_sets\[0\].*component forget set has the fields"),
    ([{"name": "a", "kind": "random", "size": 0}], r"forget_sets\[0\].size=0"),
])
def test_bad_forget_sets_are_refused_naming_the_entry(root, value, pattern):
    with pytest.raises(ParamError, match=pattern):
        stage_params("unlearning", root / "params.yaml", {"unlearning.forget_sets": value}, environment=False)


def test_unlearning_learning_rates_must_cover_every_method(root):
    with pytest.raises(ParamError, match="unlearning.lrs.*each of gd, ga, ascent_descent, scrub, om, dmm"):
        stage_params("unlearning", root / "params.yaml", {"unlearning.lrs": {"om": [0.01]}}, environment=False)
    with pytest.raises(ParamError, match="unlearning.klom.direction='both'"):
        stage_params("unlearning", root / "params.yaml", {"unlearning.klom": {"bins": 20, "clip": 100.0, "floor": 1e-5,
                                                                             "direction": "both"}}, environment=False)


def test_a_step_whose_largest_arrays_exceed_the_memory_is_refused_naming_the_param(root, monkeypatch):
    """With the machine's memory taken as 50 MiB: TRAK at k = 2048 (about 110 MiB) is refused, in one
    line naming trak.proj_dims, before any work; at k <= 512 it passes, and a sample of 50 targets
    brings the comparison's score arrays within it."""
    monkeypatch.setenv("DATALENS_MEMORY_LIMIT_GIB", str(50 / 1024))
    with pytest.raises(ParamError) as refused:
        stage_params("attribution_comparison", root / "params.yaml")
    lines = str(refused.value).splitlines()
    assert [line.split("=")[0] for line in lines] == ["trak.proj_dims", "attribution.num_targets"], lines
    assert "110 MiB" in lines[0] and "50 MiB of the host" in lines[0]
    stage_params("attribution_comparison", root / "params.yaml", {"trak.proj_dims": [128, 512], "attribution.num_targets": 50})
    monkeypatch.setenv("DATALENS_MEMORY_LIMIT_GIB", str(20 / 1024))
    with pytest.raises(ParamError, match=r"^data.dataset='digits' is not allowed here: the datamodels fit over n = 1,347"):
        stage_params("fit_datamodels", root / "params.yaml")


def test_the_clip_section_is_checked_key_by_key_and_by_the_same_rules_named_with_its_prefix(root):
    """A section that is a run of its own: each key as its top-level counterpart, the rules between
    keys, and keys of sections it does not have, all named with the prefix."""
    with pytest.raises(ParamError, match=r"clip.train.epochs=0.*integer >= 1"):
        stage_params("clip", root / "params.yaml", {"clip.train.epochs": 0})
    with pytest.raises(ParamError, match=r"clip.trak.num_models=\[1, 40\], clip.train.num_checkpoints=20 do not fit together; "
                                         r"every clip.trak.num_models must be <= clip.train.num_checkpoints"):
        stage_params("clip", root / "params.yaml", {"clip.trak.num_models": [1, 40]})
    with pytest.raises(ParamError, match=r"clip.data.dataset='datalens.core.captions:nowhere'"):
        stage_params("clip", root / "params.yaml", {"clip.data.dataset": "datalens.core.captions:nowhere"})
    with pytest.raises(ParamError, match=r"param 'clip.unlearning.seed' is not allowed in section 'clip'"):
        from datalens.core.config import validate
        validate({"clip.unlearning.seed": 0})
    p = stage_params("clip", root / "params.yaml")
    assert set(p) == {"device", "execution", "clip", "_root"} and p["clip"]["model"]["image_hidden"] == 64
