"""Counterfactual and brittleness code against brute-force retrains of a tiny problem whose
"training" is exact: a model's margin is a known linear function of its training set."""
import numpy as np
import pytest

from datalens.applications.counterfactuals import (
    agreement_by_kind, brittleness, counterfactual_removals, flipped_fraction, support_size, verify_support,
)
from datalens.attribution.datamodels import Moments, fit_datamodels

rng = np.random.default_rng(0)
N_TRAIN, TARGETS = 30, 5
TRUE_W = rng.normal(0, 0.3, (N_TRAIN, TARGETS)) * (rng.random((N_TRAIN, TARGETS)) < 0.4)
TRUE_B = rng.uniform(-0.5, 1.5, TARGETS)
calls = []


def retrain(masks):
    calls.append(len(masks))
    return masks.astype(float) @ TRUE_W + TRUE_B


def _fitted():
    x = (rng.random((3000, N_TRAIN)) < 0.5).astype(float)
    y = x @ TRUE_W + TRUE_B + 0.01 * rng.standard_normal((3000, TARGETS))
    dm, _ = fit_datamodels(Moments.from_blocks([(x[:2500], y[:2500])]), Moments.from_blocks([(x[2500:], y[2500:])]),
                           num_lambdas=30, eps=1e-4, progress=False)
    return dm


def test_counterfactual_prediction_matches_brute_force_retrain():
    dm = _fitted()
    res = counterfactual_removals(dm.weight, np.arange(TARGETS), [1, 3, 5], retrain)
    assert len(res["actual"]) == TARGETS * 3 * 3 and calls[-1] == 1 + TARGETS * 9  # one batched retrain
    np.testing.assert_allclose(res["predicted"], res["actual"], atol=0.02)
    # removing the top positive examples lowers the margin, the top negative ones raise it
    pos = res["kind"] == "top_positive"
    assert (res["actual"][pos] <= 1e-9).all() and (res["actual"][res["kind"] == "top_negative"] >= -1e-9).all()


def test_support_size_equals_brute_force_search():
    dm = _fitted()
    base = retrain(np.ones((1, N_TRAIN), bool))[0]
    k_star = support_size(base, dm.weight, N_TRAIN)
    for t in range(TARGETS):
        order = np.argsort(-TRUE_W[:, t])
        brute = 0 if base[t] <= 0 else -1
        for k in range(1, N_TRAIN + 1):
            if brute != -1:
                break
            mask = np.ones(N_TRAIN, bool)
            mask[order[:k]] = False
            if retrain(mask[None])[0, t] < 0:
                brute = k
        assert k_star[t] == brute, (t, k_star[t], brute)
    flippable = np.flatnonzero(k_star > 0)
    assert verify_support(dm.weight, k_star, flippable, retrain).all()
    frac = flipped_fraction(k_star, [1, 5, N_TRAIN])
    assert np.all(np.diff(frac) >= 0) and frac[-1] == ((k_star > 0).sum() / (k_star != 0).sum())


def test_agreement_is_reported_per_removal_kind_against_scipy():
    from scipy import stats
    dm = _fitted()
    res = counterfactual_removals(dm.weight, np.arange(TARGETS), [1, 3, 5], retrain)
    res["actual"] = res["actual"] + np.random.default_rng(3).normal(0, 0.05, len(res["actual"]))  # noisy retrains
    agree = agreement_by_kind(res)
    assert set(agree) == {"pooled", "top_positive", "top_negative", "random"}
    for kind in ("top_positive", "top_negative", "random"):
        sel = res["kind"] == kind
        assert agree[kind]["pearson"] == stats.pearsonr(res["predicted"][sel], res["actual"][sel])[0]
        assert agree[kind]["count"] == TARGETS * 3
        assert agree[kind]["mean_actual_change"]["5"] == res["actual"][sel & (res["k"] == 5)].mean()
    assert agree["pooled"]["pearson"] == stats.pearsonr(res["predicted"], res["actual"])[0]


def test_brittleness_reports_the_confirmed_fraction_beside_the_predicted_one():
    k_star = np.array([0, 2, 2, 5, -1, 3])
    sample = np.array([1, 2, 3, 5])
    flips = np.array([True, False, True, True])  # retraining confirms 3 of the 4 sampled predicted flips
    b = brittleness(k_star, [2, 5], sample, flips)
    predicted = flipped_fraction(k_star, [2, 5])
    assert b["fraction_flipped_predicted"] == {"2": predicted[0], "5": predicted[1]}
    assert b["fraction_flipped_confirmed"]["2"] == predicted[0] * 0.5  # of targets 1, 2 (k* <= 2), one confirmed
    assert b["fraction_flipped_confirmed"]["5"] == predicted[1] * 0.75
    assert b["confirmed_flip_rate"] == 0.75 and b["confirmed_sample_size"] == 4


def test_removal_effects_remove_each_methods_top_k_and_measure_against_the_same_repeats_full_data_model():
    """With a linear 'retrain' (output = mask @ W + repeat offset), removing a set changes target t by
    minus the sum of W over it exactly: the rows must be each method's top-k (or k random
    examples), measured against the same repeat's full-data output."""
    from datalens.applications.counterfactuals import removal_effects, removal_summary
    rng = np.random.default_rng(0)
    n, t = 30, 5
    w = rng.normal(size=(n, t))
    rankings = {"a": w, "b": -w}

    def retrain(masks):
        return np.stack([masks.astype(float) @ w + r for r in range(2)])  # two repeats, each shifted

    res = removal_effects(rankings, np.array([1, 3]), [2, 5], retrain, seed=4)
    assert res["methods"] == ["a", "b", "random"] and res["change"].shape == (2, 2 * 2 * 3)
    for row, (method, target, k) in enumerate(zip(res["method"], res["target"], res["k"])):
        if method != "random":
            top = np.argsort(-rankings[method][:, target])[:k]
            np.testing.assert_allclose(res["change"][:, row], -w[top, target].sum(), atol=1e-12)
    counted = removal_effects(rankings, np.array([1, 3]), [2, 5], lambda m: np.repeat(m.sum(1, keepdims=True)[None], t, 2).astype(float))
    np.testing.assert_array_equal(counted["change"][0], -counted["k"])  # every method, random too, removes k distinct examples
    summary = removal_summary(res, [2, 5])
    drops = -res["change"][:, (res["method"] == "a") & (res["k"] == 5)].ravel()
    assert summary["a"][1]["mean"] == pytest.approx(drops.mean())
    assert summary["a"][1]["high"] - summary["a"][1]["mean"] == pytest.approx(1.96 * drops.std(ddof=1) / np.sqrt(4))
    assert summary["a"][0]["mean"] > summary["random"][0]["mean"] > summary["b"][0]["mean"]  # the top helpers matter most
