import weakref

import numpy as np
import pytest
import torch
from torch import nn

from datalens.evaluation.metrics import linear_datamodeling_score
from datalens.tasks.classification import ClassificationTask
from datalens.tasks.gradients import per_example_gradients
from datalens.attribution.projection import Projector, int8_slices
from tiny_models import trained_digits_mlp
import datalens.attribution.trak as trak_module
from datalens.attribution.trak import ModelFeatures, ScoreStore, featurize, score_blocks, soft_threshold, trak_scores

TASK = ClassificationTask()


def _logreg(seed=0, d=6, c=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, c)).double()
    x = torch.randn(40, d, dtype=torch.float64)
    y = torch.randint(0, c, (40,))
    return model, x, y


def _closed_form_grads(W, b, x, y):
    """d margin / d (W, b) for a linear softmax model, by hand: df/dz_j = [j = y] - [j != y] softmax_{others}(z)_j."""
    z = x @ W.T + b
    out = []
    for zi, xi, yi in zip(z, x, y):
        others = np.delete(np.arange(len(zi)), yi)
        s = np.exp(zi[others] - zi[others].max())
        s /= s.sum()
        dz = np.zeros_like(zi)
        dz[yi] = 1.0
        dz[others] = -s
        out.append(np.concatenate([np.outer(dz, xi).ravel(), dz]))
    return np.array(out)


def test_unprojected_trak_on_logistic_regression_equals_the_closed_form():
    model, x, y = _logreg()
    W, b = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    xt, yt = x[:30], y[:30]
    xs, ys = x[30:], y[30:]
    g_train = _closed_form_grads(W, b, xt.double().numpy(), yt.numpy())
    g_test = _closed_form_grads(W, b, xs.double().numpy(), ys.numpy())
    p = np.exp(xt.double().numpy() @ W.T + b)
    p /= p.sum(1, keepdims=True)
    q = 1 - p[np.arange(30), yt.numpy()]
    kern = g_train.T @ g_train
    lam = 0.1 * np.trace(kern) / kern.shape[0]
    expected = q[:, None] * (g_train @ np.linalg.solve(kern + lam * np.eye(len(kern)), g_test.T))

    feats = featurize(TASK, model, xt, yt, xs, ys, proj_dim=None, seed=0, model_index=0, dtype=torch.float64)
    np.testing.assert_allclose(feats.train.numpy(), g_train, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(trak_scores([feats], ridge=0.1), expected, rtol=1e-6, atol=1e-10)
    # the ensemble of two identical models equals one model
    np.testing.assert_allclose(trak_scores([feats, feats], ridge=0.1), expected, rtol=1e-6, atol=1e-10)


def test_projector_preserves_inner_products_and_is_reproducible():
    d, k = 3000, 2048
    g = torch.randn(20, d, dtype=torch.float64)
    proj = Projector(d, k, seed=3, model_index=1)
    phi = proj.project(g.float()).double()
    gram, pgram = g @ g.T, phi @ phi.T
    norms = torch.sqrt(torch.diag(gram))
    rel = (pgram - gram) / torch.outer(norms, norms)
    assert rel.abs().max() < 4 * (2 / k) ** 0.5 * 2  # JL: error of order sqrt(2/k) of the norms' product
    # the same P whatever the block size, and the dense matrix gives the same result
    small_blocks = Projector(d, k, seed=3, model_index=1, block_rows=1024).project(g.float())
    torch.testing.assert_close(small_blocks, phi.float(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(g.float() @ proj.matrix(), phi.float(), rtol=1e-4, atol=1e-3)
    assert not torch.allclose(Projector(d, k, seed=3, model_index=2).project(g.float()), phi.float())
    gauss = Projector(d, 512, seed=0, kind="gaussian").matrix()
    assert abs(float(gauss.std()) - 512 ** -0.5) < 0.05 * 512 ** -0.5


def test_int8_slices_reconstruct_the_rows():
    torch.manual_seed(0)
    g = torch.randn(50, 300) * torch.logspace(-4, 2, 300)
    slices, scale = int8_slices(g)
    assert all(q.dtype == torch.int8 for q in slices)
    rebuilt = sum(q.double() / 128.0 ** j for j, q in enumerate(slices)) * scale.double()
    # float32 rounding of each entry (in g / scale) plus the last slice's half step
    assert ((rebuilt - g.double()).abs() <= 2.0 ** -23 * g.double().abs() + 0.5 / 128 ** 3 * scale.double()).all()
    g[3, 7] = float("nan")
    with pytest.raises(FloatingPointError, match=r"rows \[3\]"):
        int8_slices(g)


@pytest.mark.parametrize("block_rows", [16 * 1024, 1024])  # P cached whole, and P in blocks
def test_int8_projection_is_at_least_as_exact_as_a_float32_gemm(block_rows):
    torch.manual_seed(1)
    g = torch.randn(300, 2500) * torch.logspace(-3, 1, 2500)  # rows with a wide dynamic range
    proj = Projector(2500, 256, seed=2, model_index=4, block_rows=block_rows)
    exact = g.double() @ proj.matrix().double()
    err = lambda out: float((out.double() - exact).norm() / exact.norm())  # noqa: E731
    assert err(proj._project_int8(g)) <= err(g @ proj.matrix())
    assert err(proj._project_int8(g)) < 2e-7
    # the route is only taken where it is exact and fast
    assert not Projector(2500, 256, kind="gaussian").uses_int8(g)
    assert not proj.uses_int8(g.double())


def test_parameter_subset_gradients_equal_the_slice_of_full_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    full = per_example_gradients(model, x, y, TASK)
    sub = per_example_gradients(model, x, y, TASK, param_names=["2.weight", "2.bias"])
    n_first = 5 * 7 + 7
    torch.testing.assert_close(sub, full[:, n_first:])
    with pytest.raises(ValueError, match="not parameters of the model"):
        per_example_gradients(model, x, y, TASK, param_names=["9.weight"])


def test_lds_of_random_scores_is_near_zero_and_of_the_true_datamodel_near_one():
    rng = np.random.default_rng(0)
    n, t, m = 200, 30, 300
    w = rng.normal(size=(n, t)) * (rng.random((n, t)) < 0.1)
    masks = (rng.random((m, n)) < 0.5).astype(float)
    actual = masks @ w + 0.05 * rng.normal(size=(m, t))
    assert linear_datamodeling_score(w, masks, actual) > 0.95
    assert abs(linear_datamodeling_score(rng.normal(size=(n, t)), masks, actual)) < 0.05


def test_soft_threshold():
    np.testing.assert_allclose(soft_threshold(np.array([-2.0, -0.5, 0.2, 3.0]), 1.0), [-1.0, 0.0, 0.0, 2.0])


def test_kernel_terms_agree_whether_k_is_below_or_above_n():
    from datalens.attribution.trak import ModelFeatures, kernel_terms
    torch.manual_seed(0)
    for n, k in ((30, 10), (10, 30)):  # the second takes the n x n route
        phi, tgt = torch.randn(n, k, dtype=torch.float64), torch.randn(4, k, dtype=torch.float64)
        lam = 0.3 * float((phi * phi).sum()) / k
        direct = phi @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(k, dtype=torch.float64), tgt.T)
        torch.testing.assert_close(kernel_terms(ModelFeatures(phi, tgt, torch.ones(n)), 0.3), direct)


def test_feature_store_refuses_features_from_another_projector_version(tmp_path, monkeypatch):
    import datalens.attribution.trak as trak_module
    from conftest import tiny_run
    from datalens.core.store import StoreError
    from datalens.attribution.trak import FeatureJob, featurize_checkpoints
    from datalens.training.runs import train_subset_models

    run = tiny_run(tmp_path / "s.zarr", num_models=4, num_checkpoints=2)
    train_subset_models(run, progress=False)
    job = FeatureJob(run, str(tmp_path / "f.zarr"), (8,))
    store = featurize_checkpoints(job, 2, progress=False)
    assert store.completed().all() and (store.seconds(2, 8) > 0).all()
    monkeypatch.setattr(trak_module, "PROJECTOR_VERSION", trak_module.PROJECTOR_VERSION + 1)
    with pytest.raises(StoreError, match="made with projector_version=2, but the params now say projector_version=3"):
        featurize_checkpoints(job, 2, progress=False)


def test_fast_jl_is_optional_and_refuses_cpu_gradients():
    from datalens.attribution.projection import projector_backend
    assert projector_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="CUDA device"):
        Projector(100, 512, backend="fast_jl").project(torch.zeros(4, 100))
    with pytest.raises(ValueError, match="allowed values: torch, fast_jl"):
        Projector(100, 512, backend="cupy")


def test_scores_over_the_memory_budget_stream_into_a_store_by_target_blocks(tmp_path):
    """A budget smaller than the (n, t) float64 scores: they go to a store, a block of targets at a
    time, and equal the in-memory scores; without a store the refusal names the size."""
    gen = torch.Generator().manual_seed(0)
    feats = [ModelFeatures(torch.randn(300, 40, generator=gen), torch.randn(70, 40, generator=gen), torch.rand(300, generator=gen))
             for _ in range(3)]
    dense = trak_scores(feats, ridge=0.1)
    budget = 300 * 70 * 8 // 4  # a quarter of what the dense scores need
    with pytest.raises(ValueError, match="GiB as float64"):
        trak_scores(feats, ridge=0.1, budget=budget)
    stored = trak_scores(feats, ridge=0.1, store=str(tmp_path / "scores.zarr"), budget=budget, target_block=16)
    assert isinstance(stored, ScoreStore) and stored.block_size == 16 and stored.completed().all()
    np.testing.assert_allclose(stored.matrix(), dense, rtol=1e-6, atol=1e-7)  # stored as float32
    np.testing.assert_allclose(stored.matrix(slice(20, 40)), dense[:, 20:40], rtol=1e-6, atol=1e-7)
    # resumable: a second call finds every block done and computes none of them
    again = trak_scores(feats, ridge=0.1, store=str(tmp_path / "scores.zarr"), budget=budget, target_block=16)
    np.testing.assert_array_equal(again.matrix(), stored.matrix())
    assert [a for a, _ in score_blocks(feats, 0.1, 16, only=set(again.missing_blocks()))] == []
    assert [a for a, _ in score_blocks(feats, 0.1, 16, only={1, 4})] == [16, 64]


class _CountingFeatures:
    """A lazy sequence of features that counts how many of its items are alive at once."""

    def __init__(self, feats):
        self.feats, self.alive, self.most_alive, self.reads = feats, 0, 0, 0

    def __len__(self):
        return len(self.feats)

    def __getitem__(self, i):
        f = self.feats[i]
        item = ModelFeatures(f.train.clone(), f.targets.clone(), f.q.clone())
        self.alive += 1
        self.reads += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(item, self._dropped)
        return item

    def _dropped(self):
        self.alive -= 1


def test_scores_stream_over_models_holding_one_models_features_at_a_time():
    """Eight models' features, of which memory may hold one: the streamed scores equal the
    all-in-memory product of Algorithm 1 computed directly, and when the budget splits the
    targets into groups each model is read once per group."""
    gen = torch.Generator().manual_seed(1)
    feats = [ModelFeatures(torch.randn(120, 30, generator=gen, dtype=torch.float64), torch.randn(50, 30, generator=gen, dtype=torch.float64),
                           torch.rand(120, generator=gen, dtype=torch.float64)) for _ in range(8)]
    direct = 0
    for f in feats:
        lam = 0.1 * float((f.train ** 2).sum()) / 30
        direct = direct + f.train @ torch.linalg.solve(f.train.T @ f.train + lam * torch.eye(30, dtype=torch.float64), f.targets.T)
    direct = (sum(f.q for f in feats) / 8)[:, None] * direct / 8
    lazy = _CountingFeatures(feats)
    np.testing.assert_allclose(trak_scores(lazy, ridge=0.1, target_block=10), direct.numpy(), rtol=1e-9, atol=1e-12)
    assert lazy.most_alive == 1
    grouped = _CountingFeatures(feats)
    budget = 8 * 120 * 10 * 2  # two blocks of 10 targets at a time: three groups for 50 targets
    blocks = dict(score_blocks(grouped, 0.1, 10, budget=budget))
    np.testing.assert_allclose(np.concatenate([blocks[a] for a in sorted(blocks)], 1), direct.numpy(), rtol=1e-9, atol=1e-12)
    assert grouped.most_alive == 1 and grouped.reads == 1 + 3 * 8  # the first read is for the shapes


def test_a_gradient_budget_smaller_than_one_chunk_streams_fewer_examples_at_a_time_with_equal_features(monkeypatch):
    """The logistic regression has 21 parameters: a budget of 7 examples' float32 gradients makes
    chunks of 7 (where one chunk of all 40 would exceed it), and the features are those of one chunk."""
    model, x, y = _logreg()
    whole = featurize(TASK, model, x[:30], y[:30], x[30:], y[30:], proj_dim=16, seed=0, model_index=0)
    sizes = []
    real = trak_module.per_example_gradients
    monkeypatch.setattr(trak_module, "per_example_gradients", lambda m, xb, *a, **k: sizes.append(len(xb)) or real(m, xb, *a, **k))
    monkeypatch.setattr(trak_module, "GRADIENT_CHUNK_BYTES", 4 * 21 * 7)
    streamed = featurize(TASK, model, x[:30], y[:30], x[30:], y[30:], proj_dim=16, seed=0, model_index=0)
    assert max(sizes) == 7 and sum(sizes) == 40
    torch.testing.assert_close(streamed.train, whole.train, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(streamed.targets, whole.targets, rtol=1e-6, atol=1e-7)


def test_projected_trak_approaches_unprojected_trak_as_k_grows():
    from datalens.core.data import load_digits
    ds = load_digits()
    x, y = torch.as_tensor(ds.x_train[:300]).float(), torch.as_tensor(ds.y_train[:300])
    xs, ys = torch.as_tensor(ds.x_test[:40]).float(), torch.as_tensor(ds.y_test[:40])
    model = trained_digits_mlp(x, y, seed=0, steps=200)
    raw = featurize(TASK, model, x, y, xs, ys, None, seed=0, model_index=0, dtype=torch.float64)
    lam = 0.1 * float((raw.train ** 2).sum()) / raw.train.shape[1]
    exact = trak_scores([raw], 0.1)
    ks = [16, 64, 256, 1024, 4096]
    projected = featurize(TASK, model, x, y, xs, ys, ks, seed=0, model_index=0, dtype=torch.float64)
    corr, err = [], []
    for k in ks:  # each at the unprojected kernel's absolute lambda (ridge is relative to trace / k)
        f = projected[k]
        s = trak_scores([f], lam * k / float((f.train ** 2).sum()))
        corr.append(np.corrcoef(s.ravel(), exact.ravel())[0, 1])
        err.append(np.abs(s - exact).max() / np.abs(exact).max())
    assert all(np.diff(corr) > 0) and all(np.diff(err) < 0)  # JL: inner products sharpen as 1/sqrt(k)
    assert corr[0] < 0.6 and corr[-1] > 0.99 and err[-1] < 0.06
