"""A model and dataset this repo does not ship (a logistic regression on scikit-learn's wine data,
defined in a file outside src/), attributed first through the Python API and then through
params.yaml and `dvc repro`, with no edit to src/ (docs/using-your-own-model.md)."""
import json
import shutil
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from dvc_project import make_project, sh

from datalens.attribution.trak import featurize, trak_scores
from datalens.core.config import ParamError, check_params_file
from datalens.core.data import resolve_callable
from datalens.evaluation.metrics import linear_datamodeling_score
from datalens.training.engine import TrainSettings
from datalens.training.runs import SubsetRun, train_subset_models

OWN = textwrap.dedent('''
    """The user's own data and model: nothing here is part of datalens."""
    import numpy as np
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from torch import nn

    from datalens.core.data import Dataset


    def wine(root):
        x, y = load_wine(return_X_y=True)
        tr, te = train_test_split(np.arange(len(y)), test_size=48, stratify=y, random_state=0)
        mu, sd = x[tr].mean(0), x[tr].std(0)
        return Dataset.from_arrays("wine", (x[tr] - mu) / sd, y[tr], (x[te] - mu) / sd, y[te])


    class LogisticRegression(nn.Module):
        def __init__(self, features, classes):
            super().__init__()
            self.linear = nn.Linear(features, classes)

        def forward(self, x):
            return self.linear(x)


    def logistic_regression(input_shape, num_outputs, **_):
        return LogisticRegression(input_shape[0], num_outputs)
''')


@pytest.fixture
def own(tmp_path) -> Path:
    (tmp_path / "own.py").write_text(OWN)
    return tmp_path


def test_the_python_api_attributes_a_model_of_ones_own(own):
    # the twelve lines of docs/using-your-own-model.md
    run = SubsetRun(dataset="own.py:wine", data_root=".", model="own.py:logistic_regression", model_kwargs={},
                    settings=TrainSettings(epochs=50, lr=0.05, weight_decay=1e-3), alpha=0.5, seed=0, num_models=100,
                    block_size=50, store=str(own / "train.zarr"), num_checkpoints=5, device="cpu", repo=str(own))
    store = train_subset_models(run, progress=False)
    held_out = train_subset_models(replace(run, store=str(own / "eval.zarr"), stream="eval", num_models=40, num_checkpoints=0),
                                   progress=False)
    task, data = run.make_task(), run.dataset_().tensors()
    features = [featurize(task, run.load_checkpoint(store, m), *data, 64, seed=0, model_index=m) for m in range(5)]
    scores = trak_scores(features, ridge=0.01)
    lds = linear_datamodeling_score(scores, held_out.read("masks"), held_out.read("test_outputs"))

    x_tr, y_tr, x_te, y_te = data
    assert scores.shape == (130, 48) and store.read("masks").shape == (100, 130)
    # the checkpoint is the user's class, and the recorded outputs are its margins, recomputed by hand
    model = run.load_checkpoint(store, 0)
    assert type(model).__name__ == "LogisticRegression" and type(model).__module__.startswith("datalens_user_")
    logits = model(x_te).detach().double().numpy()
    correct = logits[np.arange(48), y_te.numpy()]
    others = np.where(np.eye(3, dtype=bool)[y_te.numpy()], -np.inf, logits)
    np.testing.assert_allclose(store.read("test_outputs", np.arange(1))[0], correct - np.logaddexp.reduce(others, 1), rtol=1e-5,
                               atol=1e-5)
    # LDS recomputed with scipy from the same arrays
    pred = held_out.read("masks").astype(float) @ scores
    actual = held_out.read("test_outputs")
    by_hand = np.mean([stats.spearmanr(pred[:, j], actual[:, j])[0] for j in range(48)])
    assert lds == pytest.approx(by_hand, abs=1e-12)
    assert lds > 0.3  # a convex model: TRAK from 5 checkpoints predicts its counterfactuals (measured 0.5-0.6)


def test_editing_the_data_changes_the_store_identity(own):
    run = SubsetRun(dataset="own.py:wine", data_root=".", model="own.py:logistic_regression", model_kwargs={},
                    settings=TrainSettings(), alpha=0.5, seed=0, num_models=4, block_size=4, store="memory://x", repo=str(own))
    before = run.identity()["data.content_hash"]
    edited = own / "edited"
    edited.mkdir()
    (edited / "own.py").write_text(OWN.replace("test_size=48", "test_size=49"))
    after = replace(run, repo=str(edited)).identity()["data.content_hash"]
    assert before != after and len(before) == 16
    assert replace(run, repo=str(own)).identity() == run.identity()


def test_a_bad_import_path_is_one_line_naming_the_key(own, tmp_path):
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    for value, said in [("own.py:nothing", "has no function 'nothing'"), ("missing.py:wine", "no file"),
                        ("no_such_module_xyz:f", "importing no_such_module_xyz failed"), ("wine", "allowed values")]:
        params["data"]["dataset"] = value
        (own / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(ParamError) as err:
            check_params_file(own / "params.yaml")
        assert str(err.value).startswith(f"data.dataset={value!r} is not allowed") and said in str(err.value)
        assert "\n" not in str(err.value)
    assert resolve_callable("own.py:wine", "data.dataset", own)(None).n_train == 130


TINY = {"device": "cpu", "data.dataset": "own.py:wine", "model": {"name": "own.py:logistic_regression"},
        "train.epochs": 20, "train.lr": 0.05, "train.num_models": 60, "train.block_size": 30, "train.num_checkpoints": 4,
        "evaluation.num_masks": 20, "evaluation.repeats": 2, "datamodels.model_counts": [50],
        "attribution.selection_models": 20, "trak.num_models": [1, 2], "attribution.ensemble_sizes": [1, 2],
        "attribution.tracin_epochs": [10, 20], "modeldiff.num_models": 20, "modeldiff.num_checkpoints": 2,
        "modeldiff.trak_models": 2, "counterfactuals.ks": [2, 4],
        "unlearning.forget_sets": [{"name": "r5", "kind": "random", "size": 5},
                                   {"name": "s5", "kind": "random", "size": 5, "select": True}]}


@pytest.mark.slow
def test_params_and_dvc_repro_attribute_a_model_of_ones_own(own, root):
    proj = own / "proj"
    make_project(root, proj, TINY)
    shutil.copy(own / "own.py", proj / "own.py")
    sh(["git", "init", "-q"], proj)
    sh(["dvc", "init", "-q"], proj)
    sh(["dvc", "repro", "attribution_comparison"], proj)
    metrics = json.loads((proj / "reports" / "attribution_comparison" / "results.json").read_text())
    text = json.dumps(metrics)
    assert "trak" in text and "grad_dot" in text and "ekfac_influence" in text
    fit = json.loads((proj / "reports" / "fit_datamodels" / "results.json").read_text())
    assert fit["num_models"] == 60
    [store_path] = (proj / "stores" / "train_subsets").glob("*.zarr")
    store = zarr_identity(store_path)
    assert store["data.dataset"] == "own.py:wine" and store["model.name"] == "own.py:logistic_regression"


def zarr_identity(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]["identity"]
