"""Unlearning: KLoM against scipy, the methods against closed forms and convex optima, and the
ridge datamodels behind DMM against an exactly linear learner."""
import copy
from dataclasses import replace

import numpy as np
import scipy.stats
import pytest
import torch
from scipy.stats import entropy
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from torch import nn

from datalens.attribution import datamodels
from datalens.applications import unlearning, unlearning_comparison
from datalens.core.config import ParamError, stage_params
from datalens.core.models import build_model
from datalens.tasks.classification import margins_from_logits
from datalens.training.engine import ModelStack
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
    budget = 3000 * (len(y) - len(forget)) / len(y)  # 3000 epochs over the retain set
    logits = unlearning.unlearn([_linear(base)], xt, yt, xt, "gd", 0.5, [budget], forget, settings)[budget][0]
    probs = torch.softmax(logits.double(), -1).numpy()
    start = np.abs(base.predict_proba(x) - oracle.predict_proba(x)).max()
    assert start > 0.02  # removing F moves the optimum
    np.testing.assert_allclose(probs, oracle.predict_proba(x), atol=2e-3)


def test_om_with_exact_oracle_targets_reaches_the_oracle_outputs():
    x, y, forget, base, oracle = _convex_problem()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    targets = torch.as_tensor(oracle.decision_function(x), dtype=torch.float32)  # the oracle's logits
    settings = unlearning.FineTuneSettings(batch_size=64, lr_decay=1.0, retain_ratio=3.0)
    budget = 400 * 4 * len(forget) / len(y)  # 400 epochs over F and 3|F| retain examples
    logits = unlearning.unlearn([_linear(base)], xt, yt, xt, "om", 0.01, [budget], forget, settings, targets)[budget][0]
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
    budget = 3 * len(forget) / len(y)  # three epochs over F
    logits = unlearning.unlearn([model], x, y, x, "ga", 0.01, [budget], forget, unlearning.FineTuneSettings(batch_size=8))[budget][0]
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
    retain_epochs = 4 * len(retain) / len(y)
    min_only = unlearning.unlearn([model], x, y, x, "scrub", 0.03, [retain_epochs], forget, settings)[retain_epochs][0]
    monkeypatch.undo()
    both = unlearning.unlearn([model], x, y, x, "scrub", 0.03, [4.0], forget, settings)[4.0][0]  # four epochs of both passes
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
    a = unlearning.unlearn(models, x, y, x, "gd", 0.01, [0.3, 1.0], forget, unlearning.FineTuneSettings(batch_size=16, stack_size=2))
    b = unlearning.unlearn(models, x, y, x, "gd", 0.01, [0.3, 1.0], forget, unlearning.FineTuneSettings(batch_size=16, stack_size=5))
    for e in (0.3, 1.0):
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


@pytest.mark.parametrize("name,count,block", [("mlp", 3, 2 ** 20), ("mlp", 7, 16 * 256 * 2), ("resnet9", 3, 2 ** 20)])
def test_the_stacked_forward_equals_each_model_alone(name, count, block):
    shape = (64,) if name == "mlp" else (3, 8, 8)
    models = [build_model(name, shape, 10, hidden=[16], width=4).eval() for _ in range(count)]
    x = torch.randn(600 if name == "mlp" else 5, *shape)  # MLPs: three chunks of examples
    stacked = ModelStack(models).outputs(x, block=block)  # the second case: blocks of two models
    with torch.no_grad():
        alone = torch.stack([m(x) for m in models])
    torch.testing.assert_close(stacked, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,budget", [("gd", 0.25), ("gd", 1.6), ("ascent_descent", 0.5), ("om", 0.1)])
def test_a_budget_runs_partial_epochs_and_spends_what_its_label_says(method, budget):
    """Against a count made here: the examples of every batch, pass by pass, epoch by epoch,
    until the budget is reached."""
    n, forget = 120, np.arange(0, 120, 6)
    settings = unlearning.FineTuneSettings(batch_size=16)
    sets = unlearning.example_sets(n, forget, settings)
    (steps, spent), = unlearning.budget_steps(method, sets, [budget], settings, n).values()
    processed, count = 0, 0
    while processed < budget * n:
        epoch, k = divmod(count, len(unlearning.PASSES[method]))  # whole passes first...
        which = unlearning.PASSES[method][k][0]
        sizes = [len(b) for b in np.array_split(np.arange(len(sets[which])), -(-len(sets[which]) // 16))]
        if processed + sum(sizes) >= budget * n:  # ...then the batches of the pass that crosses the budget
            for size in sizes:
                processed += size
                if processed >= budget * n:
                    break
        else:
            processed += sum(sizes)
        count += 1
    assert spent == processed / n and budget <= spent < budget + 16 / n
    if method == "gd" and budget < 1:
        assert steps < -(-len(sets["retain"]) // 16)  # less than one epoch


def test_one_diverged_model_is_dropped_and_counted_and_the_others_are_unaffected():
    model, x, y, forget = _mlp_problem(3)
    models = [copy.deepcopy(model) for _ in range(3)]
    with torch.no_grad():
        models[1][0].weight[0, 0] = float("inf")  # this model's loss is non-finite from the first step
    settings = unlearning.FineTuneSettings(batch_size=16)
    together = unlearning.unlearn(models, x, y, x, "gd", 0.01, [1.0], forget, settings)[1.0]
    alone = unlearning.unlearn(models[:1], x, y, x, "gd", 0.01, [1.0], forget, settings)[1.0]
    assert torch.isnan(together[1]).all() and torch.isfinite(together[[0, 2]]).all()
    torch.testing.assert_close(together[[0, 2]], alone.expand(2, -1, -1), rtol=1e-5, atol=1e-5)
    oracle = np.random.default_rng(0).normal(size=(4, len(y)))
    splits = unlearning.split_indices(len(y) - 20, 20, forget[forget < len(y) - 20])  # the last 20 as validation
    kp = {"bins": 20, "clip": 100.0, "floor": 1e-5}
    record, values, margins = unlearning_comparison.score_point(together, y, oracle, splits, kp)
    expected, expected_values, _ = unlearning_comparison.score_point(together[[0, 2]], y, oracle, splits, kp)
    assert record["diverged"] == 1 and expected["diverged"] == 0 and margins.shape == (2, len(y))
    np.testing.assert_array_equal(values, expected_values)


def _synthetic_selection(optimum, diverge_above=np.inf, best_budget=None):
    """evaluate(plan, budgets) for widen_until_interior: every method's selection score is the
    squared log-distance of its learning rate to ``optimum`` (plus, with ``best_budget``, the
    squared log2-distance of the budget to it); above ``diverge_above`` the run diverges."""
    calls = []

    def evaluate(plan, budgets):
        calls.append({m: dict(v) for m, v in plan.items()})
        points = []
        for method, by_lr in plan.items():
            for lr, top in by_lr.items():
                for b in [b for b in budgets[method] if b <= top]:
                    score = np.log10(lr / optimum) ** 2 + (np.log2(b / best_budget) ** 2 if best_budget else 0.0)
                    score = score if lr <= diverge_above else float("nan")
                    points.append({"method": method, "lr": lr, "budget": b, "klom": {s: {"p95": score} for s in unlearning.SPLITS}})
        return {"select_r": {"points": points}}

    return evaluate, calls


SELECT = [unlearning.ForgetSet("select_r", "random", (1, 2), select=True)]


@pytest.mark.parametrize("optimum,diverge_above", [(0.2, np.inf), (10.0, 0.05), (0.005, np.inf)])
def test_learning_rate_grids_widen_until_the_choice_is_interior(optimum, diverge_above):
    evaluate, calls = _synthetic_selection(optimum, diverge_above)
    search = unlearning_comparison.widen_until_interior({"gd": [0.001, 0.003, 0.01]}, [0.5, 1.0], evaluate, SELECT, 6, 2)
    chosen = unlearning_comparison.choose(search.results, SELECT)["random"].per_budget["gd"]
    grid = search.grids["gd"]
    finite = [lr for lr in grid if lr <= diverge_above]
    best = min(finite, key=lambda lr: abs(np.log10(lr / optimum)))  # brute force over the final grid
    assert set(chosen.values()) == {best} and grid[0] < best < grid[-1] and search.lrs_on_edge == {}
    ran = [(lr, top) for c in calls for lr, top in c["gd"].items()]
    assert len(ran) == len(set(ran))  # nothing is run twice
    assert search.budgets == {"gd": [0.5, 1.0]} and search.budget_on_edge == {}  # the best budget (the smaller, a tie) is interior
    if optimum == 0.005:
        assert len(calls) == 1  # already interior: nothing more is run


def test_widening_stops_after_max_extensions_and_says_which_choices_remain_on_an_edge():
    evaluate, calls = _synthetic_selection(1e-9)
    search = unlearning_comparison.widen_until_interior({"gd": [0.001, 0.01]}, [0.5, 1.0], evaluate, SELECT, 2, 2)
    np.testing.assert_allclose(search.grids["gd"], [1e-5, 1e-4, 1e-3, 1e-2])
    assert search.lrs_on_edge == {"gd": [search.grids["gd"][0]]} and len(calls) == 3


@pytest.mark.parametrize("best_budget,extensions,budgets,on_edge", [(4.0, 3, [0.5, 1.0, 2.0, 4.0, 8.0], {}),
                                                                    (64.0, 2, [0.5, 1.0, 2.0, 4.0], {"gd": 4.0}),
                                                                    (1.0, 2, [0.5, 1.0, 2.0], {})])
def test_a_method_still_improving_at_its_largest_budget_gets_a_larger_one(best_budget, extensions, budgets, on_edge):
    evaluate, calls = _synthetic_selection(0.003, best_budget=best_budget)
    search = unlearning_comparison.widen_until_interior({"gd": [0.001, 0.003, 0.01, 0.03]}, [0.5, 1.0], evaluate, SELECT,
                                                        6, extensions)
    choice = unlearning_comparison.choose(search.results, SELECT)["random"]
    assert search.budgets["gd"] == budgets and search.budget_on_edge == on_edge
    assert choice.best["gd"] == (0.003, min(best_budget, budgets[-1]))
    assert set(choice.per_budget["gd"]) == set(budgets) and set(choice.per_budget["gd"].values()) == {0.003}
    for c in calls[1:]:  # a doubled budget runs the best rate and its two neighbours only
        assert sorted(c["gd"]) == [0.001, 0.003, 0.01] and len(set(c["gd"].values())) == 1


def test_resampled_scores_spread_like_the_asymptotic_standard_error_of_a_95th_percentile_and_pair_their_draws():
    n = 2000  # for one split, the score is the 95th percentile: SE ~ sqrt(p (1 - p) / n) / density at the quantile
    expected = np.sqrt(0.95 * 0.05 / n) / scipy.stats.norm.pdf(scipy.stats.norm.ppf(0.95))
    samples = [np.random.default_rng(k).standard_normal(n) for k in range(30)]  # one sample's bootstrap SE is itself noisy
    ses = [unlearning_comparison.resampled_scores(v, {"forget": np.arange(n)}, seed=0).std(ddof=1) for v in samples]
    assert abs(np.mean(ses) / expected - 1) < 0.1
    a = unlearning_comparison.resampled_scores(samples[0], {"forget": np.arange(n)}, seed=0)
    b = unlearning_comparison.resampled_scores(samples[0] + 1.0, {"forget": np.arange(n)}, seed=0)
    np.testing.assert_allclose(b - a, 1.0)  # the same draws for every point: a shift has no noise


def test_difference_ses_equal_a_direct_paired_bootstrap_of_the_two_points():
    rng = np.random.default_rng(1)
    splits = {"forget": np.arange(10), "retain": np.arange(10, 60), "validation": np.arange(60, 90)}
    a, b = rng.gamma(2.0, size=90), rng.gamma(2.0, size=90)
    res = {"select_r": {"_splits": splits, "points": [{"method": "gd", "lr": 0.1, "budget": 1.0, "_values": {"klom": a}},
                                                      {"method": "gd", "lr": 0.1, "budget": 2.0, "_values": {"klom": b}}]}}
    got = unlearning_comparison.difference_ses(res, ["select_r"], "gd", (0.1, 2.0), [(0.1, 1.0)], seed=5)[(0.1, 1.0)]
    draws = np.random.default_rng([5, 44])  # the same draws, made here: split by split, SE_DRAWS resamples each
    idx = [s[draws.integers(0, len(s), (unlearning_comparison.SE_DRAWS, len(s)))] for s in splits.values()]
    score = lambda v: np.max([np.percentile(v[i], 95, axis=1) for i in idx], axis=0)  # noqa: E731
    assert got == pytest.approx(np.std(score(a) - score(b), ddof=1))


@pytest.mark.parametrize("noise,flat", [(0.0, False), (100.0, True)])
def test_a_largest_budget_that_gained_only_noise_is_not_doubled(noise, flat):
    evaluate, _ = _synthetic_selection(0.003, best_budget=64.0)  # keeps improving with every budget
    rng = np.random.default_rng(0)

    def with_examples(plan, budgets):  # per-example KLoM: the point's score plus example noise of a given spread
        out = evaluate(plan, budgets)
        out["select_r"]["_splits"] = {s: np.arange(40) for s in unlearning.SPLITS}
        for pt in out["select_r"]["points"]:
            pt["_values"] = {"klom": pt["klom"]["forget"]["p95"] + noise * rng.standard_normal(40)}
        return out

    search = unlearning_comparison.widen_until_interior({"gd": [0.001, 0.003, 0.01]}, [0.5, 1.0], with_examples, SELECT, 6, 2)
    assert search.choice.best["gd"] == (0.003, 1.0 if flat else 4.0)  # the lowest score, as always
    if flat:  # 0.5 -> 1 gained 2 log2-units squared, far less than the noise: the curve is flat within it, not on an edge
        assert search.budgets["gd"] == [0.5, 1.0] and search.budget_on_edge == {} and set(search.budget_flat) == {"gd"}
        assert search.budget_flat["gd"]["gain"] <= search.budget_flat["gd"]["se"]
    else:
        assert search.budgets["gd"] == [0.5, 1.0, 2.0, 4.0] and search.budget_on_edge == {"gd": 4.0} and search.budget_flat == {}


def test_a_reported_set_runs_each_chosen_rate_only_as_far_as_the_largest_budget_it_is_chosen_for():
    choice = unlearning_comparison.Choice({"gd": {0.5: 0.1, 1.0: 0.03, 2.0: 0.03, 4.0: 0.01}}, {"gd": (0.03, 2.0)})
    assert choice.plan() == {"gd": {0.1: 0.5, 0.03: 2.0, 0.01: 4.0}}


def test_masks_and_logits_of_a_store_with_a_missing_block_are_the_same_models(root, tmp_path):
    from datalens.training.runs import train_block
    run = replace(unlearning.base_run(_tiny_unlearning_params(root, tmp_path)), num_models=12, block_size=4, num_checkpoints=0,
                  alpha=0.5)
    store = prepare_store(run)
    for block in (0, 2):  # block 1 never trained: its rows are zeros, not models
        train_block(run, block)
    store = run.open_store()
    done = np.flatnonzero(store.completed())
    assert list(done) == [0, 1, 2, 3, 8, 9, 10, 11]
    masks, logits = unlearning_comparison.StoreRows(store, "masks"), unlearning_comparison.StoreRows(store)
    assert masks.shape[0] == logits.shape[0] == 8
    sets = np.zeros((2, masks.shape[1]))
    sets[0, [1, 5, 9]] = sets[1, 20:30] = 1
    got = datamodels.ridge_set_contributions(masks, logits, sets, ridge=0.3, block=3)  # blocks of rows across the gap
    direct = np.concatenate([store.read("train_logits", done), store.read("test_logits", done)], axis=1).reshape(8, -1)
    want = sets @ datamodels.ridge_datamodels(store.read("masks", done), direct, 0.3).weight
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


KLOM_PARAMS = {"bins": 20, "clip": 100.0, "floor": 1e-5, "direction": "unlearned_oracle"}


def _scale_problem_setup(seed, m=30, n_train=40, n_test=10, c=4):
    """A seeded generator, base logits (m, n_train + n_test, c), labels and KLoM params for the tests
    of choosing DMM's datamodels."""
    rng = np.random.default_rng(seed)
    own = torch.as_tensor(rng.normal(size=(m, n_train + n_test, c)))
    return rng, own, torch.as_tensor(rng.integers(0, c, n_train + n_test)), KLOM_PARAMS


def test_the_datamodel_scale_is_chosen_per_kind_on_the_select_sets():
    # oracles whose logits are the base models' minus 2x (coherent set) or 1x (random set) the attributed
    # contribution: the scale that makes DM-direct match them is chosen, from the select sets alone
    rng, own, y_all, klom_params = _scale_problem_setup(0)
    n_train, n_test, c = 40, 10, 4

    def problem(name, kind, true_scale, select):
        forget = unlearning.ForgetSet(name, kind, tuple(range(5)), select)
        contribution = rng.normal(size=(n_train + n_test) * c) * 2.0
        oracle = unlearning.margins(unlearning.predicted_logits(own, true_scale * contribution), y_all)
        return unlearning_comparison.Problem(forget, oracle, oracle, torch.zeros(1), contribution,
                                             unlearning.split_indices(n_train, n_test, forget.array), {})

    probs = [problem("sel_pc", "component", 2.0, True), problem("sel_r", "random", 1.0, True),
             problem("pc", "component", 0.5, False)]  # a reported set that would prefer 0.5: never looked at
    data = {"y_all": y_all}
    got = unlearning_comparison.choose_dm_scale(own, data, [p for p in probs if p.forget.select], [0.5, 1.0, 2.0, 3.0], klom_params)
    assert got["component"]["chosen"] == 2.0 and got["random"]["chosen"] == 1.0
    scores = got["component"]["scores"]["None"]  # the problems' own datamodels, under no alpha
    assert not got["component"]["on_edge"] and scores["2.0"] < scores["1.0"]
    edge = unlearning_comparison.choose_dm_scale(own, data, probs[:1], [0.5, 1.0, 2.0], klom_params)
    assert edge["component"] == {**edge["component"], "chosen": 2.0, "on_edge": True}


def test_datamodels_of_another_alpha_are_chosen_where_they_predict_the_select_sets_better():
    # oracles = base logits minus a shift; the base run's datamodels see a coherent set's shift at half
    # its size and with noise, another alpha's see it whole: chosen there, and not for the random kind
    from datalens.applications.unlearning_comparison import choose_dm_scale
    rng, own, y_all, klom_params = _scale_problem_setup(1)
    n_train, n_test, c = 40, 10, 4
    size = (n_train + n_test) * c
    probs, by_alpha = [], {0.5: {}, 0.9: {}}
    for name, kind in (("sel_pc", "component"), ("sel_r", "random")):
        shift = rng.normal(size=size) * 2.0
        forget = unlearning.ForgetSet(name, kind, tuple(range(5)), True)
        oracle = unlearning.margins(unlearning.predicted_logits(own, shift), y_all)
        noisy = rng.normal(size=size)
        by_alpha[0.5][name], by_alpha[0.9][name] = (0.5 * shift + noisy, shift) if kind == "component" else (shift, 0.3 * shift + noisy)
        probs.append(unlearning_comparison.Problem(forget, oracle, oracle, torch.zeros(1), by_alpha[0.5][name],
                                                   unlearning.split_indices(n_train, n_test, forget.array), {}))
    got = choose_dm_scale(own, {"y_all": y_all}, probs, [0.5, 1.0, 2.0, 3.0], klom_params, by_alpha)
    assert (got["component"]["alpha"], got["component"]["chosen"]) == (0.9, 1.0)
    assert (got["random"]["alpha"], got["random"]["chosen"]) == (0.5, 1.0)
    assert got["component"]["scores"]["0.9"]["1.0"] < got["component"]["scores"]["0.5"]["2.0"]
