"""LDS and the other scores against scipy, computed target by target."""
import numpy as np
import pytest
from scipy import stats

from datalens.evaluation.metrics import columnwise_pearson, linear_datamodeling_score, noise_ceiling, seed_agreement


def _problem(seed=0, m=60, n=30, t=8):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, t))
    masks = (rng.random((m, n)) < 0.5).astype(float)
    pred = masks @ scores
    actual = np.exp(pred) + 0.3 * rng.normal(size=pred.shape)  # monotone but far from linear
    actual[:, 0] = np.round(actual[:, 0])  # ties in the actual margins
    return scores, masks, actual


def test_lds_equals_scipy_spearman_per_target():
    scores, masks, actual = _problem()
    pred = masks @ scores
    expected = np.array([stats.spearmanr(pred[:, j], actual[:, j])[0] for j in range(actual.shape[1])])
    np.testing.assert_allclose(linear_datamodeling_score(scores, masks, actual, per_target=True), expected, rtol=1e-12)
    assert linear_datamodeling_score(scores, masks, actual) == pytest.approx(expected.mean(), rel=1e-12)
    # Pearson in place of Spearman differs here (the relation is monotone, not linear)
    pearson = np.array([stats.pearsonr(pred[:, j], actual[:, j])[0] for j in range(actual.shape[1])])
    assert np.abs(pearson - expected).max() > 0.05
    # ranks taken along the wrong axis (over targets) differ too
    wrong = columnwise_pearson(stats.rankdata(pred, axis=1), stats.rankdata(actual, axis=1))
    assert np.abs(wrong - expected).max() > 0.05


def test_a_target_with_constant_prediction_scores_zero_and_counts():
    scores, masks, actual = _problem(seed=1)
    scores[:, 3] = 0.0  # predicts the same margin for every model
    per = linear_datamodeling_score(scores, masks, actual, per_target=True)
    assert per[3] == 0.0
    assert linear_datamodeling_score(scores, masks, actual) == pytest.approx(per.mean())  # not a nanmean over 7 targets
    assert np.isfinite(per).all()


def test_shapes_that_do_not_fit_are_refused():
    scores, masks, actual = _problem()
    with pytest.raises(ValueError, match="shapes do not fit"):
        linear_datamodeling_score(scores[:-1], masks, actual)


def test_seed_agreement_is_the_mean_per_target_pearson():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    b[:, 2] = 1.0  # a constant column counts as 0
    expected = np.mean([0.0 if j == 2 else stats.pearsonr(a[:, j], b[:, j])[0] for j in range(5)])
    assert seed_agreement(a, b) == pytest.approx(expected, rel=1e-12)


def test_the_noise_ceilings_are_the_correlations_of_the_mask_signal_with_one_model_and_with_the_mean():
    """Outputs = a function of the mask (s) + independent seed noise: the ceilings from two repeats
    match the correlation of s itself with one repeat and with the mean of R repeats, simulated."""
    rng = np.random.default_rng(0)
    m, t, R = 20000, 6, 4
    s = rng.normal(size=(m, t))
    runs = s[:, None] + rng.normal(scale=1.3, size=(m, R, t))  # reliability 1 / (1 + 1.69)
    c = noise_ceiling(runs[:, 0], runs[:, 1], R)
    assert c["single_model_ceiling"] == pytest.approx(columnwise_pearson(s, runs[:, 0]).mean(), abs=0.01)
    assert c["mean_ceiling"] == pytest.approx(columnwise_pearson(s, runs.mean(1)).mean(), abs=0.01)
    assert c["mean_ceiling"] > c["single_model_ceiling"] + 0.15
