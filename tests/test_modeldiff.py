"""ModelDiff against direct numpy and scikit-learn computations, and on planted differences."""
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import Lasso

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


SOLVER = dict(num_lambdas=12, eps=1e-3, max_iter=500, tol=1e-7)


def _model_stacks(seed, strength, n=40, t=30, models=400, shared=3, shared_scale=3.0):
    """Two algorithms' subset models on the same masks (models, n): outputs (models, t) = masks @ theta
    + a per-model effect shared by every target (a seed stream's quirks, rank ``shared``) + noise;
    B's theta adds ``strength`` on 4 planted training examples for half of the targets."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((models, n)) < 0.5).astype(float)
    theta = rng.normal(size=(n, t)) * (rng.random((n, t)) < 0.3)
    loadings = shared_scale * rng.normal(size=(shared, t))
    extra = np.zeros((n, t))
    extra[np.ix_(rng.choice(n, 4, replace=False), rng.random(t) < 0.5)] = strength

    def outputs(th):
        return masks @ th + rng.normal(size=(models, shared)) @ loadings + 0.5 * rng.normal(size=(models, t))
    return masks, outputs(theta), outputs(theta + extra)


def _kkt_on_support(masks, y, support, signs, lam):
    """The lasso's equations on a given support, solved by least squares on scikit-learn's
    standardised masks: min 1/(2N) |Z_S w - (y - ybar)|^2 + lam s^T w, in raw units."""
    from sklearn.preprocessing import StandardScaler
    z = StandardScaler().fit_transform(masks)[:, support]
    n = len(masks)
    w = np.linalg.lstsq(z.T @ z / n, z.T @ (y - y.mean()) / n - lam * signs, rcond=None)[0]
    out = np.zeros(masks.shape[1])
    out[support] = w / masks.std(0)[support]
    return out


def test_paired_datamodels_of_one_algorithm_twice_are_its_lasso():
    from datalens.applications.modeldiff import paired_datamodels
    masks, ya, _ = _model_stacks(0, 0.0, models=200)
    pair = paired_datamodels(masks, ya, ya, SOLVER, seed=3)  # the pool is A twice: its lasso is A's own
    mu, sd = masks.mean(0), masks.std(0)
    lam = _pooled_fit(masks, ya, ya).lam
    for j in (0, 7, 19):  # scikit-learn's coordinate descent at the chosen lambda, on the standardised masks
        ref = Lasso(alpha=lam[j], fit_intercept=False, tol=1e-12, max_iter=100000).fit((masks - mu) / sd, ya[:, j] - ya[:, j].mean())
        np.testing.assert_allclose(pair.theta_a[:, j], ref.coef_ / sd, atol=1e-4 * np.abs(ref.coef_ / sd).max())
    np.testing.assert_array_equal(pair.theta_a, pair.theta_b)


def _pooled_fit(masks, ya, yb):
    """The lasso path on both stacks pooled, as paired_datamodels runs it (split seed 3): its lambdas and support."""
    from datalens.attribution.datamodels import Moments, fit_datamodels, split_models
    tr, va = split_models(len(masks), 0.1, 3)
    pooled = [Moments.from_blocks([(masks[r], ya[r]), (masks[r], yb[r])]) for r in (tr, va)]
    return fit_datamodels(*pooled, progress=False, **SOLVER)[0]


def test_a_swapped_pair_solves_the_lasso_equations_on_the_pooled_support():
    from datalens.applications.modeldiff import paired_datamodels
    masks, ya, yb = _model_stacks(1, 1.0, models=200)
    pair = paired_datamodels(masks, ya, yb, SOLVER, seed=3, block=2)
    pooled = _pooled_fit(masks, ya, yb)
    swaps = np.random.default_rng(1).random((3, 200)) < 0.5
    fits = list(pair.swapped(swaps))  # three swaps, in blocks of two
    for s, (theta_a, theta_b) in zip(swaps, fits):
        for theta, y in ((theta_a, np.where(s[:, None], yb, ya)), (theta_b, np.where(s[:, None], ya, yb))):
            for j in (0, 7, 19):
                support = np.flatnonzero(pooled.weight_std[:, j])
                ref = _kkt_on_support(masks, y[:, j], support, np.sign(pooled.weight_std[support, j]), pooled.lam[j])
                np.testing.assert_allclose(theta[:, j], ref, atol=1e-8 * np.abs(ref).max())
    everything = next(pair.swapped(np.ones((1, 200), bool)))  # exchanging every model exchanges the algorithms
    np.testing.assert_allclose(everything[0], pair.theta_b, atol=1e-10)
    np.testing.assert_allclose(everything[1], pair.theta_a, atol=1e-10)


def _per_target_swap_null(a, b, k, permutations, seed):
    """The earlier null: each target's pair of attribution vectors exchanged (not the models)."""
    from datalens.applications.modeldiff import largest_variance_ratio
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(permutations):
        s = rng.random(a.shape[1]) < 0.5
        out.append(largest_variance_ratio(*model_diff(np.where(s, b, a), np.where(s, a, b), k)))
    return np.array(out)


def test_the_model_swap_null_holds_where_the_per_target_swap_rejects_the_same_algorithm():
    from datalens.applications.modeldiff import largest_variance_ratio, model_swap_null, paired_datamodels, permutation_p_value
    model_swap, target_swap = [], []
    for seed in range(12):  # one algorithm, two seed streams, whose quirks are shared across targets
        pair = paired_datamodels(*_model_stacks(seed, 0.0), SOLVER)
        observed = largest_variance_ratio(*model_diff(pair.theta_a, pair.theta_b, 3))
        model_swap.append(permutation_p_value(observed, model_swap_null(pair, 3, 19, seed)))
        target_swap.append(permutation_p_value(observed, _per_target_swap_null(pair.theta_a, pair.theta_b, 3, 19, seed)))
    assert sum(p <= 0.05 for p in model_swap) <= 2  # a null with the estimator's shared noise: the control passes
    assert sum(p <= 0.05 for p in target_swap) >= 9  # exchanging targets breaks that noise and rejects nearly always
    for seed in range(9, 12):  # a real difference still stands out: above all 19 swaps
        planted = paired_datamodels(*_model_stacks(seed, 2.0, shared_scale=0.5), SOLVER)
        observed = largest_variance_ratio(*model_diff(planted.theta_a, planted.theta_b, 3))
        assert permutation_p_value(observed, model_swap_null(planted, 3, 19, 0)) == 0.05


def test_model_swap_null_draws_the_exchanges_it_says():
    from datalens.applications.modeldiff import AttributionPair, largest_variance_ratio, model_swap_null
    a, b, _ = _planted_difference(4, 4.0)
    seen = []

    def swapped(swaps):  # a stand-in: records the exchanges, yields a fixed pair
        for s in swaps:
            seen.append(s)
            yield (b, a) if s[0] else (a, b)

    null = model_swap_null(AttributionPair(a, b, swapped, 6), 3, 2, seed=7)
    draws = np.random.default_rng([7, 29])
    np.testing.assert_array_equal(np.array(seen), draws.random((2, 6)) < 0.5)
    assert null[0] == pytest.approx(_numpy_largest_ratio(a, b, 3), rel=1e-9)
    assert largest_variance_ratio(*model_diff(a, b, 3)) == pytest.approx(_numpy_largest_ratio(a, b, 3), rel=1e-9)


def test_the_planted_direction_is_chosen_without_the_planted_labels():
    from types import SimpleNamespace
    from datalens.applications.modeldiff import AttributionPair
    from datalens.applications.modeldiff_analysis import planted_case
    a, b, planted = _planted_difference(5, 4.0)
    truth = np.flatnonzero(planted)
    fake = np.setdiff1d(np.arange(len(planted)), truth)[:8]  # other labels: the choice must not move
    pair = AttributionPair(a, b, lambda swaps: ((a, b) for _ in swaps), 4)  # the null is not what is tested here
    results = [planted_case(pair, SimpleNamespace(planted=lab, planted_test=np.arange(3)), 3, 2, 0)[0] for lab in (truth, fake)]
    assert results[0]["chosen_direction"] == results[1]["chosen_direction"] == 1
    assert results[0]["auroc"] > 0.99 and results[1]["auroc"] < 0.9  # and what is reported is that direction's recovery
