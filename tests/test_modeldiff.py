"""ModelDiff against direct numpy and scikit-learn computations, and on planted differences."""
import numpy as np
import pytest
from sklearn.decomposition import PCA

from datalens.applications.modeldiff import model_diff, per_target_cosine, principal_directions, residuals


def _shared(seed=0, n=80, t=60, rank=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, t)) + 0.05 * rng.normal(size=(n, t)), rng


def test_residuals_match_a_direct_computation_and_are_orthogonal_to_b():
    a, rng = _shared()
    b = a + 0.3 * rng.normal(size=a.shape)
    res = residuals(a, b).numpy()
    for x in range(a.shape[1]):
        ua, ub = a[:, x] / np.linalg.norm(a[:, x]), b[:, x] / np.linalg.norm(b[:, x])
        np.testing.assert_allclose(res[x], ua - (ua @ ub) * ub, atol=1e-12)
        assert abs(res[x] @ ub) < 1e-12


def test_principal_directions_match_sklearn_pca():
    rows = np.random.default_rng(1).normal(size=(50, 30)) @ np.diag(np.linspace(3, 0.1, 30))
    import torch
    comps, ratio = principal_directions(torch.tensor(rows), 4)
    sk = PCA(n_components=4).fit(rows)
    np.testing.assert_allclose(ratio.numpy(), sk.explained_variance_ratio_, rtol=1e-10)
    for c in range(4):  # equal up to sign
        assert abs(abs(comps[c].numpy() @ sk.components_[c]) - 1) < 1e-10


def test_a_planted_rank_one_difference_is_recovered_and_only_one_way():
    a, rng = _shared(seed=2)
    n, t = a.shape
    planted = np.zeros(n)
    planted[rng.choice(n, 8, replace=False)] = 1.0  # training examples only A uses
    uses = rng.random(t) < 0.5  # on half of the targets
    b = a.copy()
    a = a + 4.0 * np.outer(planted, uses * rng.uniform(0.5, 1.5, t))
    a_minus_b, b_minus_a = model_diff(a, b, num_components=3)
    v = a_minus_b.components[0]
    assert abs(v @ planted) / np.linalg.norm(planted) > 0.95
    assert set(np.argsort(-np.abs(v))[:8]) == set(np.flatnonzero(planted))
    assert a_minus_b.variance_ratio[0] > 5  # explains far more of A than of B
    assert b_minus_a.variance_ratio.max() < 2  # nothing B uses that A does not
    assert set(a_minus_b.top_targets(0, 10)) <= set(np.flatnonzero(uses))
    pos, neg = a_minus_b.top_training_examples(0, 8)
    assert set(pos) == set(np.flatnonzero(planted)) and len(neg) == 8


def test_no_difference_gives_no_asymmetric_direction():
    a, rng = _shared(seed=3)
    b = a + 0.05 * rng.normal(size=a.shape)  # the same algorithm, another seed
    c = a + 0.05 * rng.normal(size=a.shape)
    a_minus_b, b_minus_a = model_diff(b, c, num_components=5)
    for d in (a_minus_b, b_minus_a):
        assert np.all(d.variance_ratio < 2) and np.all(d.variance_ratio > 0.5)
    cos = per_target_cosine(b, c)
    direct = [b[:, x] @ c[:, x] / np.linalg.norm(b[:, x]) / np.linalg.norm(c[:, x]) for x in range(b.shape[1])]
    np.testing.assert_allclose(cos, direct, rtol=1e-12)
    assert np.median(cos) > 0.95


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="differ in shape"):
        model_diff(np.zeros((5, 3)), np.zeros((5, 4)))


def test_recovery_matches_sklearn_and_a_direct_count():
    from sklearn.metrics import roc_auc_score
    from datalens.applications.modeldiff import recovery
    rng = np.random.default_rng(5)
    w = rng.normal(size=100)
    planted = np.arange(10)
    w[planted[:7]] = 10 * np.sign(rng.normal(size=7))  # 7 of 10 planted examples stand out (either sign)
    r = recovery(w, planted)
    truth = np.isin(np.arange(100), planted)
    assert r["precision_at_planted"] == np.isin(np.argsort(-np.abs(w))[:10], planted).mean() == 0.7
    assert r["auroc"] == roc_auc_score(truth, np.abs(w))


def test_contrasted_classes_and_blend():
    from datalens.applications.modeldiff import Directions, blend_toward, contrasted_classes
    comps = np.array([[3.0, 2.5, -2.0, -2.2, 0.1, 0.0]])
    d = Directions(comps, np.ones(1), np.ones(1), np.ones(1), np.zeros((2, 1)))
    assert contrasted_classes(d, 0, np.array([6, 6, 0, 0, 1, 1]), count=2) == (6, 0)
    x, mean = np.ones((2, 3), np.float32), np.zeros(3, np.float32)
    np.testing.assert_allclose(blend_toward(mean)(x, 0.25), 0.75)


def test_planted_patch_and_blanking_on_the_data():
    from datalens.core.data import blank_region, load_digits, plant_patch
    ds = load_digits()
    planted = plant_patch(ds, label=3, count=12, test_count=4, size=2, row=0, col=0, value=4.0, seed=1)
    assert len(planted.planted) == 12 and (planted.y_train[planted.planted] == 3).all()
    assert len(planted.planted_test) == 4 and (planted.y_test[planted.planted_test] == 3).all()
    img = planted.x_train.reshape(-1, 8, 8)
    assert (img[planted.planted][:, :2, :2] == 4.0).all()
    assert (planted.x_test.reshape(-1, 8, 8)[planted.planted_test][:, :2, :2] == 4.0).all()
    others = np.setdiff1d(np.arange(ds.n_train), planted.planted)
    np.testing.assert_array_equal(planted.x_train[others], ds.x_train[others])  # nothing else changed
    others_test = np.setdiff1d(np.arange(ds.n_test), planted.planted_test)
    np.testing.assert_array_equal(planted.x_test[others_test], ds.x_test[others_test])
    blanked = blank_region(planted, size=2, row=0, col=0)
    assert (blanked.x_train.reshape(-1, 8, 8)[:, :2, :2] == 0).all() and (blanked.x_test.reshape(-1, 8, 8)[:, :2, :2] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        plant_patch(ds, label=3, count=2, test_count=0, size=3, row=6, col=0, value=1.0)
    with pytest.raises(ValueError, match="cannot plant"):
        plant_patch(ds, label=3, count=10_000, test_count=0, size=2, row=0, col=0, value=1.0)


def test_algorithms_share_masks_and_an_unchanged_algorithm_reuses_the_base_store(root):
    from datalens.core.config import ParamError, stage_params
    from datalens.applications.modeldiff import algorithm_run, algorithm_runs
    p = stage_params("modeldiff_train", root / "params.yaml")
    runs = algorithm_runs(p)
    base = runs["natural_a"]
    assert base.store.endswith(p["train"]["store"]) and base.num_models == p["train"]["num_models"]
    for name in ("planted_a", "planted_b", "natural_b", "control"):
        r = runs[name]
        assert (r.seed, r.stream, r.alpha) == (base.seed, base.stream, base.alpha)  # the same masks
        assert r.store != base.store and r.identity() != base.identity()
    assert runs["planted_a"].blank and not runs["planted_b"].blank and runs["planted_b"].patch == p["modeldiff"]["patch"]
    assert runs["control"].model_seeds(0, 3) != base.model_seeds(0, 3)
    with pytest.raises(ParamError, match="not allowed; allowed keys"):
        algorithm_run(p, {"evaluation.seed": 3}, store="memory://x", num_models=10, num_checkpoints=2)
    with pytest.raises(ParamError, match="train.lr"):
        algorithm_run(p, {"train.lr": -1.0}, store="memory://x", num_models=10, num_checkpoints=2)


def test_a_blanked_algorithm_cannot_react_to_the_patch(tmp_path):
    from dataclasses import replace
    from conftest import tiny_run
    from datalens.core.data import stamp
    from datalens.applications.modeldiff import intervention_effect
    from datalens.training.runs import train_subset_models
    patch = {"label": 3, "count": 20, "test_count": 5, "size": 2, "row": 0, "col": 0, "value": 4.0, "seed": 0}
    effects = {}
    for name, blank in (("sees", None), ("blanked", {"size": 2, "row": 0, "col": 0})):
        run = replace(tiny_run(tmp_path / f"{name}.zarr", num_models=4, num_checkpoints=3), patch=patch, blank=blank)
        store = train_subset_models(run, progress=False)
        ds = run.dataset_()
        effects[name] = intervention_effect(run, store, 3, ds.x_test[:50], ds.y_test[:50],
                                            lambda x, f: stamp(x, 2, 0, 0, f * 4.0), [1.0], watch=3)[0]
    assert effects["blanked"]["probability_change"]["mean"] == 0.0
    assert abs(effects["sees"]["probability_change"]["mean"]) > 0
    assert effects["sees"]["probability_change"]["models"] == 3


def _numpy_largest_ratio(a, b, k):
    """ModelDiff's largest variance ratio written again in numpy (SVD, not the Gram eigenvectors)."""
    def unit(m):
        r = m.T
        return r / np.linalg.norm(r, axis=1, keepdims=True)

    def share(m, v):
        m = unit(m) - unit(m).mean(0)
        return ((m @ v.T) ** 2).sum(0) / (m * m).sum()

    ratios = []
    for first, second in ((a, b), (b, a)):
        ua, ub = unit(first), unit(second)
        res = ua - (ua * ub).sum(1, keepdims=True) * ub
        v = np.linalg.svd(res - res.mean(0), full_matrices=False)[2][:k]
        r = share(a, v) / share(b, v)
        ratios += [r, 1 / r]
    return np.concatenate(ratios).max()


def _planted_difference(seed, strength):
    a, rng = _shared(seed=seed)
    n, t = a.shape
    planted = np.zeros(n)
    planted[rng.choice(n, 8, replace=False)] = 1.0
    b = a + 0.3 * rng.normal(size=a.shape)  # a noisy estimator of the same attributions
    b = b + strength * np.outer(planted, (rng.random(t) < 0.5) * rng.uniform(0.5, 1.5, t))
    return a + 0.3 * rng.normal(size=a.shape), b, planted


def test_the_swap_null_is_modeldiff_on_swapped_targets():
    from datalens.applications.modeldiff import largest_variance_ratio, swap_null
    a, b, _ = _planted_difference(4, 4.0)
    null = swap_null(a, b, 3, 2, seed=7)
    swap = np.random.default_rng([7, 29]).random(a.shape[1]) < 0.5  # the draw swap_null makes first
    assert null[0] == pytest.approx(_numpy_largest_ratio(np.where(swap, b, a), np.where(swap, a, b), 3), rel=1e-9)
    assert largest_variance_ratio(*model_diff(a, b, 3)) == pytest.approx(_numpy_largest_ratio(a, b, 3), rel=1e-9)


def test_a_planted_difference_is_significant_and_the_same_algorithm_is_not():
    from datalens.applications.modeldiff import largest_variance_ratio, permutation_p_value, swap_null
    for seed in range(3):
        a, b, _ = _planted_difference(seed, 4.0)
        observed = largest_variance_ratio(*model_diff(a, b, 3))
        assert permutation_p_value(observed, swap_null(a, b, 3, 99, seed)) == 0.01  # above every one of 99 swaps
        a, b, _ = _planted_difference(seed, 0.0)  # the same attributions estimated twice, noisily
        observed = largest_variance_ratio(*model_diff(a, b, 3))
        assert observed > 1.2 and permutation_p_value(observed, swap_null(a, b, 3, 99, seed)) > 0.05  # noise, not a feature


def test_the_planted_direction_is_chosen_without_the_planted_labels():
    from types import SimpleNamespace
    from datalens.applications.modeldiff_analysis import planted_case
    a, b, planted = _planted_difference(5, 4.0)
    truth = np.flatnonzero(planted)
    fake = np.setdiff1d(np.arange(len(planted)), truth)[:8]  # other labels: the choice must not move
    results = [planted_case(a, b, SimpleNamespace(planted=lab, planted_test=np.arange(3)), 3, 9, 0)[0] for lab in (truth, fake)]
    assert results[0]["chosen_direction"] == results[1]["chosen_direction"] == 1
    assert results[0]["auroc"] > 0.99 and results[1]["auroc"] < 0.9  # and what is reported is that direction's recovery
