"""Our TRAK against the public reference, PyPI ``traker`` 0.3.2 (the bench extra, which `make test`
installs), on a tiny model, both unprojected (traker's ``NoOpProjector``), so the two must agree
up to what traker does differently on purpose:

* it stores gradients divided by sqrt(k) (k = d here), so its lambda is ours / d;
* it divides each model's (X^T X + lambda I)^{-1} by that matrix's mean absolute entry before
  scoring, so each model's scores carry that positive factor (and its ensemble weights models by
  it; ours averages them as the paper does). The factor is recomputed here from the features.
"""
import logging
import warnings

import numpy as np
import pytest
import torch

from trak import TRAKer
from trak.projectors import NoOpProjector

from datalens.attribution.trak import featurize, trak_scores
from datalens.core.data import load_digits
from datalens.tasks.classification import ClassificationTask
from tiny_models import trained_digits_mlp

TASK = ClassificationTask()


def _reference_scores(model, x, y, xs, ys, lambda_reg, save_dir):
    d = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = TRAKer(model=model, task="image_classification", train_set_size=len(x), save_dir=str(save_dir), device="cpu",
                   projector=NoOpProjector(grad_dim=d, proj_dim=d, device="cpu"), proj_dim=d, use_half_precision=False,
                   logging_level=logging.ERROR, lambda_reg=lambda_reg)
        t.load_checkpoint(model.state_dict(), model_id=0)
        t.featurize(batch=(x, y), num_samples=len(x))
        t.finalize_features()
        t.start_scoring_checkpoint("check", model.state_dict(), model_id=0, num_targets=len(xs))
        t.score(batch=(xs, ys), num_samples=len(xs))
        return np.asarray(t.finalize_scores(exp_name="check"), dtype=np.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_unprojected_trak_equals_the_reference_implementation(seed, tmp_path):
    ds = load_digits()
    x, y = torch.as_tensor(ds.x_train[:60]).float(), torch.as_tensor(ds.y_train[:60])
    xs, ys = torch.as_tensor(ds.x_test[:20]).float(), torch.as_tensor(ds.y_test[:20])
    model = trained_digits_mlp(x, y, seed, steps=100)
    ridge = 0.1
    feats = featurize(TASK, model, x, y, xs, ys, None, seed=0, model_index=0, dtype=torch.float64)
    ours = trak_scores([feats], ridge)
    g = feats.train.numpy()
    d = g.shape[1]
    lam = ridge * float((g ** 2).sum()) / d  # ours: ridge * trace(Phi^T Phi) / k, k = d unprojected
    inverse = np.linalg.inv(g.T @ g / d + lam / d * np.eye(d))  # traker's, on its features g / sqrt(d)
    ref = _reference_scores(model, x, y, xs, ys, lam / d, tmp_path)
    np.testing.assert_allclose(ref, ours / np.abs(inverse).mean(), rtol=2e-3, atol=2e-3 * np.abs(ref).max())
