"""What stage fit_datamodels reports, against direct computations on small arrays."""
import numpy as np

from datalens.applications.datamodel_analysis import embedding, leakage
from datalens.core.data import Dataset


def _dataset(rng):
    x_tr, x_te = rng.normal(size=(12, 4)), rng.normal(size=(5, 4))
    y_tr, y_te = np.arange(12) % 2, np.arange(5) % 2
    return Dataset.from_arrays("toy", x_tr, y_tr, x_te, y_te, images_train=rng.random((12, 2, 2)), images_test=rng.random((5, 2, 2)))


def test_leakage_pairs_and_distances_match_a_loop():
    rng = np.random.default_rng(0)
    ds, weight = _dataset(rng), rng.normal(size=(12, 5))
    pairs, out = leakage(weight, ds, pairs=3)
    ranked = sorted(((weight[i, t], i, t) for i in range(12) for t in range(5)), reverse=True)
    assert pairs == [(i, t) for _, i, t in ranked[:3]]
    _, i, t = ranked[0]
    assert out["top_pair_weight"] == weight[i, t]
    assert np.isclose(out["top_pair_pixel_distance"], np.mean(np.abs(ds.images_test[t] - ds.images_train[i])))
    nearest = [min(np.mean(np.abs(ds.images_test[x] - ds.images_train[j])) for j in range(12) if ds.y_train[j] == ds.y_test[x])
               for x in range(5)]
    assert np.isclose(out["median_pixel_distance_same_class"], np.median(nearest))


def test_embedding_is_the_pca_of_the_targets_weight_vectors():
    weight = np.random.default_rng(1).normal(size=(30, 8))
    proj, explained = embedding(weight)
    centred = weight.T - weight.T.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(proj), np.abs(centred @ vt[:2].T), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(explained, (s[:2] ** 2 / (s ** 2).sum()), rtol=1e-8)
