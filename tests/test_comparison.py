"""The compute accounting of the LDS-versus-compute comparison, on synthetic scores."""
import numpy as np
import pytest
import torch

from datalens.applications.comparison import Comparison, Ground, comparison_targets, overtaking_point, run_trak
from datalens.attribution.trak import ModelFeatures
from datalens.evaluation.metrics import linear_datamodeling_score


def _cmp(selection=7):
    rng = np.random.default_rng(0)
    n, t, m = 20, 4, 30
    w = rng.normal(size=(n, t))
    masks = (rng.random((m, n)) < 0.5).astype(float)
    vm = (rng.random((selection, n)) < 0.5).astype(float)
    ground = Ground(masks, masks @ w, masks @ w + 0.1 * rng.normal(size=(m, t)), vm, vm @ w)
    return Comparison(seconds_per_model=0.5, ground=ground), w


def test_every_model_a_method_uses_is_charged_at_the_same_rate():
    cmp, w = _cmp()
    a = cmp.add("fits_on_own_models", 100, 2.0, w, selects=False)
    b = cmp.add("chooses_on_validation", 3, 2.0, w, selects=True)
    assert (a["models"], a["seconds"]) == (100, pytest.approx(100 * 0.5 + 2.0))
    assert (b["models"], b["seconds"]) == (3 + 7, pytest.approx(10 * 0.5 + 2.0))
    assert a["lds"] == pytest.approx(1.0) and b["models_used"] == 3
    assert "7 validation models" in cmp.caption() and "500.0 ms" in cmp.caption()


def test_only_the_scores_figures_draw_are_kept():
    cmp, w = _cmp()
    cmp.keep = {("trak", 5, 64)}
    cmp.add("trak", 5, 1.0, w, selects=True, proj_dim=64)
    cmp.add("trak", 5, 1.0, 2 * w, selects=True, proj_dim=32)
    cmp.add("grad_dot", 1, 1.0, 3 * w, selects=False)
    assert list(cmp.scores) == [("trak", 5, 64)] and cmp.scores[("trak", 5, 64)] is w
    assert len(cmp.records) == 3


def test_selection_uses_validation_models_only():
    """Validation models follow one truth and evaluation models another: a selector that peeked at
    the evaluation set would pick the other candidate."""
    rng = np.random.default_rng(0)
    n, t, m, v = 20, 4, 30, 9
    w_eval, w_val = rng.normal(size=(n, t)), rng.normal(size=(n, t))
    masks, vm = (rng.random((m, n)) < 0.5).astype(float), (rng.random((v, n)) < 0.5).astype(float)
    cmp = Comparison(seconds_per_model=0.5, ground=Ground(masks, masks @ w_eval, masks @ w_eval, vm, vm @ w_val))
    best, lds = cmp.select({"evaluation_truth": w_eval, "validation_truth": w_val})
    assert best == "validation_truth" and lds["validation_truth"] > lds["evaluation_truth"]
    assert cmp.add("evaluation_truth", 1, 0.0, w_eval, selects=False)["lds"] > cmp.add("validation_truth", 1, 0.0, w_val, selects=False)["lds"]


def test_overtaking_point_is_the_cheapest_point_above_the_rivals_best():
    recs = [{"method": "trak", "models": 51, "seconds": 2.0, "lds": 0.6, "proj_dim": 8},
            {"method": "trak", "models": 60, "seconds": 9.0, "lds": 0.7, "proj_dim": 8},
            {"method": "trak", "models": 60, "seconds": 9.0, "lds": 0.9, "proj_dim": 4},  # another k, not compared
            {"method": "datamodels", "models": 250, "seconds": 4.0, "lds": 0.65},
            {"method": "datamodels", "models": 500, "seconds": 8.0, "lds": 0.75},
            {"method": "datamodels", "models": 1000, "seconds": 16.0, "lds": 0.85}]
    point = overtaking_point(recs, proj_dim=8)
    assert (point["models"], point["seconds"], point["trak_best_lds"]) == (500, 8.0, 0.7)
    assert overtaking_point(recs, proj_dim=4) == {}


class _Features:
    """M models' TRAK features over n training examples and t test examples, as a feature store reads them."""

    def __init__(self, n=30, t=12, k=8, models=2):
        g = torch.Generator().manual_seed(0)
        self.models = [ModelFeatures(torch.randn(n, k, generator=g), torch.randn(t, k, generator=g), torch.rand(n, generator=g))
                       for _ in range(models)]

    def features(self, models, k):
        return [self.models[m] for m in models]

    def seconds(self, M, k):
        return np.zeros(M)


def _ground(targets, n=30, t=12):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(n, t))
    masks, vm = (rng.random((40, n)) < 0.5).astype(float), (rng.random((9, n)) < 0.5).astype(float)
    cols = slice(None) if targets is None else targets
    return Ground(masks, (masks @ w)[:, cols], (masks @ w)[:, cols], vm, (vm @ w)[:, cols], targets)


def test_a_comparison_on_a_sample_of_targets_scores_those_columns_of_the_whole():
    """TRAK on 4 of the 12 test examples: the scores are those columns of TRAK on all 12, and the
    LDS is theirs against those targets' ground truth."""
    targets = comparison_targets(12, 4, seed=3)
    assert len(targets) == 4 and np.all(np.diff(targets) > 0) and np.array_equal(targets, comparison_targets(12, 4, seed=3))
    assert comparison_targets(12, 0, seed=3) is None and comparison_targets(12, 12, seed=3) is None
    whole, part = (Comparison(0.5, _ground(tg), keep={("trak", 2, 8)}) for tg in (None, targets))
    for cmp in (whole, part):
        run_trak(cmp, _Features(), [2], [8], [0.1])
    # equal up to float32 rounding: the features' products run in their precision
    np.testing.assert_allclose(part.scores[("trak", 2, 8)], whole.scores[("trak", 2, 8)][:, targets], rtol=1e-4, atol=1e-6)
    g = part.ground
    assert part.records[0]["lds"] == pytest.approx(linear_datamodeling_score(whole.scores[("trak", 2, 8)][:, targets], g.masks,
                                                                             g.actual_mean), rel=1e-5)
    assert part.records[0]["lds"] != pytest.approx(whole.records[0]["lds"], rel=1e-3)  # other targets, another mean
