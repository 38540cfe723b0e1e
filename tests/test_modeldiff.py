"""ModelDiff against direct numpy and scikit-learn computations, and on planted differences."""
import numpy as np
import pytest
from sklearn.decomposition import PCA

from datalens.modeldiff import model_diff, per_target_cosine, principal_directions, residuals


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
