"""Each baseline against a direct computation on a tiny model."""
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import cg
import torch.nn.functional as F
from torch import nn

from datalens.attribution.baselines import (
    ekfac_influence, empirical_influence, grad_cosine, grad_dot, influence_cg, influence_explicit, last_layer_params,
    params_within, penultimate_features, representation_similarity, tracin,
)
from datalens.core.models import build_model
from datalens.core.transformer import transformer
from datalens.tasks.classification import ClassificationTask, margins_from_logits

TASK = ClassificationTask()


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(25, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (25,))
    return model, x[:20], y[:20], x[20:], y[20:]


def _grad_of(scalar, model):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, list(model.parameters()))])


def _direct_vectors(model, x_tr, y_tr, x_t, y_t):
    """-grad L_i and grad f_x one example at a time, with plain autograd."""
    helpful = torch.stack([-_grad_of(F.cross_entropy(model(x_tr[i:i + 1]), y_tr[i:i + 1]), model) for i in range(len(x_tr))])
    target = torch.stack([_grad_of(margins_from_logits(model(x_t[j:j + 1]), y_t[j:j + 1])[0], model) for j in range(len(x_t))])
    return helpful, target


def test_grad_dot_cosine_and_tracin_match_direct_loops():
    model, x_tr, y_tr, x_t, y_t = _tiny()
    helpful, target = _direct_vectors(model, x_tr, y_tr, x_t, y_t)
    np.testing.assert_allclose(grad_dot(TASK, model, x_tr, y_tr, x_t, y_t), (helpful @ target.T).numpy(), rtol=1e-8, atol=1e-12)
    cos = (F.normalize(helpful, dim=1) @ F.normalize(target, dim=1).T).numpy()
    np.testing.assert_allclose(grad_cosine(TASK, model, x_tr, y_tr, x_t, y_t), cos, rtol=1e-8, atol=1e-12)
    other = _tiny(seed=1)[0]
    h2, t2 = _direct_vectors(other, x_tr, y_tr, x_t, y_t)
    expected = 0.5 * (helpful @ target.T) + 0.1 * (h2 @ t2.T)
    np.testing.assert_allclose(tracin(TASK, [model, other], [0.5, 0.1], x_tr, y_tr, x_t, y_t), expected.numpy(), rtol=1e-8, atol=1e-12)


def test_influence_explicit_and_cg_match_the_inverse_hessian_formula():
    model, x_tr, y_tr, x_t, y_t = _tiny()
    mask = np.arange(20) % 3 != 0
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]

    def loss(v):
        w1, b1, w2, b2 = (t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes))
        h = torch.tanh(x_tr[mask] @ w1.T + b1)
        return F.cross_entropy(h @ w2.T + b2, y_tr[mask])

    hess = torch.autograd.functional.hessian(loss, flat).numpy()
    helpful, target = _direct_vectors(model, x_tr, y_tr, x_t, y_t)
    damping = 0.05
    expected = helpful.numpy() @ np.linalg.inv(hess + damping * np.eye(len(hess))) @ target.numpy().T
    np.testing.assert_allclose(influence_explicit(TASK, model, x_tr, y_tr, mask, x_t, y_t, damping), expected, rtol=1e-6, atol=1e-9)
    lowest = np.linalg.eigvalsh(hess).min()
    damping_pd = max(0.0, -lowest) + 0.05  # CG needs a positive definite system
    expected_pd = helpful.numpy() @ np.linalg.inv(hess + damping_pd * np.eye(len(hess))) @ target.numpy().T
    np.testing.assert_allclose(influence_cg(TASK, model, x_tr, y_tr, mask, x_t, y_t, damping_pd, iters=300, tol=1e-12), expected_pd,
                               rtol=1e-5, atol=1e-7)
    if lowest + damping < 0:
        with pytest.raises(ValueError, match="not positive definite"):
            influence_cg(TASK, model, x_tr, y_tr, mask, x_t, y_t, damping)


def _tiny_hessian(model, x_tr, y_tr, mask):
    params = list(model.parameters())
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss(v):
        w1, b1, w2, b2 = (t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes))
        return F.cross_entropy(torch.tanh(x_tr[mask] @ w1.T + b1) @ w2.T + b2, y_tr[mask])

    return torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for p in params])).numpy()


@pytest.mark.parametrize("iters", [4, 300])
def test_cg_over_a_grid_of_dampings_equals_scipys_cg_run_for_each_and_drops_the_indefinite_ones(iters):
    model, x_tr, y_tr, x_t, y_t = _tiny()
    mask = np.arange(20) % 3 != 0
    hess = _tiny_hessian(model, x_tr, y_tr, mask)
    helpful, target = (v.numpy() for v in _direct_vectors(model, x_tr, y_tr, x_t, y_t))
    lowest = np.linalg.eigvalsh(hess).min()
    assert lowest < 0  # the tiny model's loss is non-convex, so the smallest damping below is indefinite
    pd = [-lowest + 0.01, -lowest + 0.1, -lowest + 1.0]
    dampings = [max(0.0, -lowest - 0.05)] + pd
    got = influence_cg(TASK, model, x_tr, y_tr, mask, x_t, y_t, dampings, iters=iters, tol=1e-12)
    assert sorted(got) == pd
    for d in pd:  # scipy's CG from zero, the same number of steps (or converged), one target at a time
        system = hess + d * np.eye(len(hess))
        solves = np.stack([cg(system, col, x0=np.zeros_like(col), rtol=1e-14, atol=0.0, maxiter=iters)[0] for col in target], 1)
        np.testing.assert_allclose(got[d], helpful @ solves, rtol=1e-6, atol=1e-8)


def test_representation_similarity_is_cosine_of_penultimate_features():
    model, x_tr, _, x_t, _ = _tiny()
    with torch.no_grad():
        a, b = torch.tanh(model[0](x_tr)), torch.tanh(model[0](x_t))
    expected = np.array([[float(F.cosine_similarity(ai, bj, dim=0)) for bj in b] for ai in a])
    np.testing.assert_allclose(representation_similarity(model, x_tr, x_t), expected, rtol=1e-10)


def test_empirical_influence_matches_a_loop():
    rng = np.random.default_rng(0)
    masks = rng.random((40, 6)) < 0.5
    margins = rng.normal(size=(40, 3))
    expected = np.array([[margins[masks[:, i], t].mean() - margins[~masks[:, i], t].mean() for t in range(3)] for i in range(6)])
    np.testing.assert_allclose(empirical_influence(masks, margins), expected, rtol=1e-12)


def test_influence_functions_leave_the_callers_model_as_it_was():
    model, x_tr, y_tr, x_t, y_t = _tiny()
    model = model.float()
    mask = np.ones(20, bool)
    influence_explicit(TASK, model, x_tr.float(), y_tr, mask, x_t.float(), y_t, 1.0)
    influence_cg(TASK, model, x_tr.float(), y_tr, mask, x_t.float(), y_t, 1.0, iters=5)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_resnet9_last_layer_and_penultimate_features_are_found_by_module():
    model = build_model("resnet9", (3, 8, 8), 10, width=4).eval()
    # ResNet-9 ends Linear(bias=False) then a scaling module: parameter order would pick a batch-norm layer
    linear_name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert last_layer_params(model) == [f"{linear_name}.weight"]
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model[:-2](x)  # everything before the Linear and the scale: the pooled, flattened features
    torch.testing.assert_close(penultimate_features(model, x), expected)
    sims = representation_similarity(model, x, x)
    np.testing.assert_allclose(np.diag(sims), 1.0, rtol=1e-6)


def test_ekfac_with_large_damping_is_grad_dot_over_the_damping():
    # (G + d I)^{-1} -> I / d as d grows: an independent check of kronfluence's wiring and of the sign
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    scores = ekfac_influence(TASK, model, x[:30], y[:30], x[30:], y[30:], [1e6, 1e-3])
    np.testing.assert_allclose(scores[1e6] * 1e6, grad_dot(TASK, model, x[:30], y[:30], x[30:], y[30:]), rtol=1e-4, atol=1e-6)
    # at small damping the curvature matters: the scores are no longer a multiple of grad-dot
    gd = grad_dot(TASK, model, x[:30], y[:30], x[30:], y[30:]).ravel()
    assert abs(np.corrcoef(scores[1e-3].ravel(), gd)[0, 1]) < 0.99
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not hasattr(model[1], "original_module")
    # the Fisher's sampled labels are seeded: the same seed gives the same scores, another seed others
    again = ekfac_influence(TASK, model, x[:30], y[:30], x[30:], y[30:], [1e-3])[1e-3]
    np.testing.assert_array_equal(again, scores[1e-3])
    assert not np.array_equal(ekfac_influence(TASK, model, x[:30], y[:30], x[30:], y[30:], [1e-3], seed=1)[1e-3], again)


def test_ekfac_takes_token_ids_and_factors_the_linear_layers_of_a_transformer():
    # token ids stay integers for the embedding; kronfluence factors the linear layers, so at a large
    # damping the scores are grad-dot over exactly those layers' parameters, over the damping
    torch.manual_seed(0)
    model = transformer((6,), 2, vocab_size=9, dim=8, layers=1, heads=2, causal=False, pool="mean")
    x, y = torch.randint(1, 9, (24, 6)), torch.randint(0, 2, (24,))
    x[:, 4:] = 0  # padding at the end
    linear = [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.Linear) for p in ("weight", "bias")]
    scores = ekfac_influence(TASK, model, x[:18], y[:18], x[18:], y[18:], [1e6])[1e6]
    np.testing.assert_allclose(scores * 1e6, grad_dot(TASK, model, x[:18], y[:18], x[18:], y[18:], linear), rtol=1e-4, atol=1e-7)


def test_gradient_baselines_keep_every_parameter_while_they_fit_and_else_the_trailing_tensors_that_do():
    """(n + t) x d float64 gradients: an MLP 20 -> 16 -> 3 has tensors of 320, 16, 48 and 3 entries
    (387 in all). For 100 examples a budget of all of them keeps all; one of 51 parameters keeps the
    output layer (48 + 3) alone; one below the last tensor is refused before any gradient is taken."""
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    per_param = 100 * 8
    assert params_within(model, 100, 387 * per_param) == (["0.weight", "0.bias", "2.weight", "2.bias"], "all")
    names, label = params_within(model, 100, 51 * per_param + 7)
    assert names == ["2.weight", "2.bias"] and label == "last 2 of 4 tensors (51 of 387 parameters)"
    names, _ = params_within(model, 100, 67 * per_param)  # 16 more reach the hidden layer's bias, not its weight
    assert names == ["0.bias", "2.weight", "2.bias"]
    with pytest.raises(MemoryError, match=r"2\.bias\) for 100 examples"):
        params_within(model, 100, 2 * per_param)
