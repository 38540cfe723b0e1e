"""Unlearning: KLoM against scipy, the methods against closed forms and convex optima, and the
ridge datamodels behind DMM against an exactly linear learner."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.func import stack_module_state

from datalens.attribution import datamodels
from datalens.applications import unlearning, unlearning_comparison
from datalens.core.config import ParamError, stage_params
from datalens.core.models import build_model
from datalens.tasks.classification import margins_from_logits
from datalens.training.runs import prepare_store, train_subset_models
from datalens.core.store import StoreError


def _reference_klom(a, b, bins=20, clip=100.0, floor=1e-5):
    out = []
    for j in range(a.shape[1]):
        x, y = np.clip(a[:, j], -clip, clip), np.clip(b[:, j], -clip, clip)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        p = np.histogram(x, bins=bins, range=(lo, hi))[0] / len(x)
        q = np.histogram(y, bins=bins, range=(lo, hi))[0] / len(y)
        out.append(entropy(np.where(p == 0, floor, p), np.where(q == 0, floor, q)))
    return np.array(out)


def test_klom_matches_scipy_entropy_of_floored_histograms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100, 40)) * rng.uniform(0.5, 3, 40)
    b = rng.normal(0.7, 1.0, size=(80, 40))
    b[:, 0] = 500.0  # beyond the clip
    np.testing.assert_allclose(unlearning.klom(a, b), _reference_klom(a, b), rtol=1e-10, atol=1e-12)


def test_klom_is_zero_for_identical_samples_and_the_direction_swaps_the_arguments():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 10)), rng.normal(1.0, 2.0, size=(50, 10))
    assert np.all(unlearning.klom(a, a) == 0)
    assert np.all(unlearning.klom(np.ones((5, 3)), np.ones((5, 3))) == 0)  # a single value: one bin
    np.testing.assert_allclose(unlearning.klom(a, b, direction="oracle_unlearned"), unlearning.klom(b, a))
    assert not np.allclose(unlearning.klom(a, b), unlearning.klom(b, a))
    with pytest.raises(ParamError, match="unlearning.klom.direction"):
        unlearning.klom(a, b, direction="both")


def test_ridge_set_contributions_equal_the_summed_weights_and_dmm_is_exact_on_a_linear_learner():
    """A learner whose logits are exactly additive in the training examples: the ridge datamodels
    (tiny ridge, more models than examples) recover it, and DM-direct's predicted logits equal
    the oracle's (the learner retrained without F)."""
    rng = np.random.default_rng(2)
    n, t, c = 30, 7, 3
    effect = rng.normal(size=(n, t * c))
    bias = rng.normal(size=t * c)

    def learner(mask):
        return bias + mask.astype(float) @ effect  # (t * c,) logits of every target

    masks = rng.random((400, n)) < 0.5
    outputs = np.stack([learner(m) for m in masks])
    sets = np.zeros((2, n))
    sets[0, [1, 5, 7]] = 1
    sets[1, 10:20] = 1
    contrib = datamodels.ridge_set_contributions(masks, outputs, sets, ridge=1e-9)
    weights = datamodels.ridge_datamodels(masks, outputs, ridge=1e-9).weight
    np.testing.assert_allclose(contrib, sets @ weights, atol=1e-8)
    full = torch.as_tensor(learner(np.ones(n, bool)).reshape(1, t, c))
    for s in range(2):
        oracle = learner(sets[s] == 0).reshape(t, c)
        np.testing.assert_allclose(unlearning.predicted_logits(full, contrib[s])[0].numpy(), oracle, atol=1e-6)


def _convex_problem():
    """Multinomial logistic regression on overlapping classes (so its optimum is finite):
    base weights fit on S, the oracle on S minus F, both by sklearn to a tight tolerance."""
    x, y = make_classification(n_samples=160, n_features=5, n_informative=4, n_redundant=0, n_classes=3, flip_y=0.2,
                               class_sep=0.7, random_state=0)
    x = x.astype(np.float32)
    forget = np.arange(0, 160, 8)
    keep = np.setdiff1d(np.arange(160), forget)
    fit = lambda idx: LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(x[idx], y[idx])  # noqa: E731
    return x, y, forget, fit(np.arange(160)), fit(keep)


def _linear(clf) -> nn.Module:
    layer = nn.Sequential(nn.Linear(clf.coef_.shape[1], clf.coef_.shape[0]))
    with torch.no_grad():
        layer[0].weight.copy_(torch.as_tensor(clf.coef_))
        layer[0].bias.copy_(torch.as_tensor(clf.intercept_))
    return layer


def test_gd_on_the_retain_set_reaches_the_retrained_optimum_of_a_convex_learner():
    x, y, forget, base, oracle = _convex_problem()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    settings = unlearning.FineTuneSettings(batch_size=1000, lr_decay=1.0, momentum=0.9)
    logits = unlearning.unlearn([_linear(base)], xt, yt, xt, "gd", 0.5, [3000], forget, settings)[3000][0]
    probs = torch.softmax(logits.double(), -1).numpy()
    start = np.abs(base.predict_proba(x) - oracle.predict_proba(x)).max()
    assert start > 0.02  # removing F moves the optimum
    np.testing.assert_allclose(probs, oracle.predict_proba(x), atol=2e-3)


def test_om_with_exact_oracle_targets_reaches_the_oracle_outputs():
    x, y, forget, base, oracle = _convex_problem()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    targets = torch.as_tensor(oracle.decision_function(x), dtype=torch.float32)  # the oracle's logits
    settings = unlearning.FineTuneSettings(batch_size=64, lr_decay=1.0, retain_ratio=3.0)
    logits = unlearning.unlearn([_linear(base)], xt, yt, xt, "om", 0.01, [400], forget, settings, targets)[400][0]
    # matching on F and 3|F| retain examples fixes the linear map, so every example reaches the oracle
    np.testing.assert_allclose(logits.numpy(), targets.numpy(), atol=1e-3)


def _mlp_problem(seed=0):
    torch.manual_seed(seed)
    x, y = make_classification(n_samples=120, n_features=6, n_informative=5, n_redundant=0, n_classes=3, random_state=seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(30):  # partly trained: its retain loss can still fall
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model, xt, yt, np.arange(0, 120, 6)


def _ce(logits, y, idx):
    return float(nn.functional.cross_entropy(logits[idx], y[idx]))


def test_gradient_ascent_raises_the_forget_loss():
    model, x, y, forget = _mlp_problem()
    logits = unlearning.unlearn([model], x, y, x, "ga", 0.01, [3], forget, unlearning.FineTuneSettings(batch_size=8))[3][0]
    with torch.no_grad():
        before = model(x)
    assert _ce(logits, y, forget) > _ce(before, y, forget) + 0.05


def test_scrub_max_steps_raise_the_forget_loss_and_min_steps_lower_the_retain_loss(monkeypatch):
    model, x, y, forget = _mlp_problem(1)
    retain = np.setdiff1d(np.arange(len(y)), forget)
    settings = unlearning.FineTuneSettings(batch_size=8)
    with torch.no_grad():
        before = model(x)
    monkeypatch.setitem(unlearning.PASSES, "scrub", (("retain", "ce_kl"),))
    min_only = unlearning.unlearn([model], x, y, x, "scrub", 0.03, [4], forget, settings)[4][0]
    monkeypatch.undo()
    both = unlearning.unlearn([model], x, y, x, "scrub", 0.03, [4], forget, settings)[4][0]
    assert _ce(min_only, y, retain) < _ce(before, y, retain) - 0.01

    def forget_kl(logits):  # SCRUB's forget loss: the divergence from the teacher (the original model) on F
        return float(unlearning._per_model_kl(logits[None, forget], before[None, forget], 4.0)[0])

    assert forget_kl(both) > 2 * forget_kl(min_only)
    assert _ce(both, y, forget) > _ce(min_only, y, forget)


def test_unlearning_does_not_depend_on_the_stack_size_and_leaves_the_models_alone():
    model, x, y, forget = _mlp_problem(2)
    models = [copy.deepcopy(model) for _ in range(5)]
    for i, m in enumerate(models):
        with torch.no_grad():
            m[0].bias.add_(0.1 * i)  # five different models
    state = copy.deepcopy(models[3].state_dict())
    a = unlearning.unlearn(models, x, y, x, "gd", 0.01, [1, 2], forget, unlearning.FineTuneSettings(batch_size=16, stack_size=2))
    b = unlearning.unlearn(models, x, y, x, "gd", 0.01, [1, 2], forget, unlearning.FineTuneSettings(batch_size=16, stack_size=5))
    for e in (1, 2):
        torch.testing.assert_close(a[e], b[e], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(state[k], v) for k, v in models[3].state_dict().items())


def test_a_diverged_run_is_never_chosen():
    scores = {(0.1, 1.0): float("nan"), (0.01, 1.0): 3.0, (0.1, 2.0): 1.0, (0.01, 2.0): 2.0}
    assert unlearning_comparison.choose_per_budget(scores) == {1.0: 0.01, 2.0: 0.1}
    assert unlearning_comparison.best_setting(scores) == (0.1, 2.0)


def test_forget_sets_are_seeded_and_coherent_ones_follow_their_component():
    specs = [{"name": "r", "kind": "random", "size": 5}, {"name": "c", "kind": "component", "component": 2, "size": 3}]
    scores = np.zeros((40, 2))
    scores[[4, 9, 30], 1] = [3.0, 2.0, 1.0]
    sets = unlearning.make_forget_sets(specs, 40, seed=0, component_scores=scores)
    assert sets[1].indices == (4, 9, 30)
    assert sets[0].indices == unlearning.make_forget_sets(specs, 40, 0, scores)[0].indices
    assert sets[0].indices != unlearning.make_forget_sets(specs, 40, 1, scores)[0].indices
    with pytest.raises(ParamError, match=r"forget_sets\[0\].size"):
        unlearning.make_forget_sets([{"name": "r", "kind": "random", "size": 40}], 40, 0)


def _tiny_unlearning_params(root, tmp_path):
    return stage_params("unlearning", root / "params.yaml", {
        "device": "cpu", "model.hidden": [8], "train.epochs": 5, "unlearning.num_models": 5, "unlearning.om_oracles": 2,
        "unlearning.store_dir": str(tmp_path / "unlearning")}, environment=False)


def test_oracles_train_without_the_forget_set_and_record_every_logit(root, tmp_path):
    p = _tiny_unlearning_params(root, tmp_path)
    base = unlearning.base_run(p)
    assert base.alpha == 1.0 and base.num_checkpoints == base.num_models == 5 and base.record_logits
    forget = unlearning.ForgetSet("f", "random", (3, 17, 40))
    run = unlearning.oracle_run(p, forget)
    assert run.num_models == 10 and run.identity()["exclude"] == [3, 17, 40]
    store = train_subset_models(run, progress=False)
    masks = store.read("masks")
    assert not masks[:, [3, 17, 40]].any() and masks.sum() == 10 * (masks.shape[1] - 3)
    logits = store.read("train_logits")
    assert logits.dtype == np.float16 and logits.shape == (10, masks.shape[1], 10)
    margins = margins_from_logits(torch.as_tensor(logits.astype(np.float32)), torch.as_tensor(base.dataset_().y_train))
    np.testing.assert_allclose(margins.numpy(), store.read("train_outputs"), atol=0.02)


def test_a_store_without_logits_is_refused_when_logits_are_asked_for(root, tmp_path):
    run = replace(unlearning.base_run(_tiny_unlearning_params(root, tmp_path)), record_logits=False)
    prepare_store(run)
    with pytest.raises(StoreError, match="train.record_logits"):
        prepare_store(replace(run, record_logits=True))


@pytest.mark.parametrize("name", ["mlp", "resnet9"])
def test_the_stacked_forward_equals_each_model_alone(name):
    shape = (64,) if name == "mlp" else (3, 8, 8)
    models = [build_model(name, shape, 10, hidden=[16], width=4).eval() for _ in range(3)]
    x = torch.randn(5, *shape)
    params, buffers = stack_module_state(models)
    with torch.no_grad():
        stacked = unlearning.stacked_forward(models[0], buffers)(params, x)
        alone = torch.stack([m(x) for m in models])
    torch.testing.assert_close(stacked, alone, rtol=1e-5, atol=1e-5)
