import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

import datalens.attribution.datamodels as datamodels_module
from datalens.attribution.datamodels import Datamodels, Moments, fit_datamodels, lasso_fista, load_fits, save_fit


def _planted(n_models=1200, n=60, targets=4, k=5, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n_models, n)) < 0.5).astype(float)
    w = np.zeros((n, targets))
    for t in range(targets):
        idx = rng.choice(n, k, replace=False)
        w[idx, t] = rng.choice([-1, 1], k) * rng.uniform(0.5, 1.5, k)
    y = x @ w + 0.3 + noise * rng.standard_normal((n_models, targets))
    return x, y, w


def test_objective_at_fixed_lambda_matches_sklearn_lasso():
    x, y, _ = _planted(n_models=300, n=40, targets=3, noise=0.5)
    mom = Moments.from_blocks([(x[:150], y[:150]), (x[150:], y[150:])])  # streamed in two blocks
    mu, sigma, ybar, gram, cross = (a.numpy() for a in mom.standardised())
    z = (x - mu) / sigma
    lam = 0.05
    ours = lasso_fista(torch.tensor(gram), torch.tensor(cross), torch.full((3,), lam, dtype=torch.float64),
                       max_iter=20000, tol=1e-10).numpy()

    def objective(w, t):
        r = y[:, t] - ybar[t] - z @ w
        return r @ r / (2 * len(y)) + lam * np.abs(w).sum()

    for t in range(3):
        sk = Lasso(alpha=lam, fit_intercept=True, tol=1e-12, max_iter=100000).fit(z, y[:, t])
        assert objective(ours[:, t], t) == pytest.approx(objective(sk.coef_, t), rel=1e-7)
        assert set(np.flatnonzero(np.abs(ours[:, t]) > 1e-8)) == set(np.flatnonzero(np.abs(sk.coef_) > 1e-8))


def test_planted_sparse_model_is_recovered():
    x, y, w_true = _planted()
    tr, va = slice(0, 1000), slice(1000, None)
    dm, diag = fit_datamodels(Moments.from_blocks([(x[tr], y[tr])]), Moments.from_blocks([(x[va], y[va])]),
                              num_lambdas=40, eps=1e-3, progress=False)
    big = np.abs(dm.weight) > 0.1
    assert np.array_equal(big, w_true != 0)
    np.testing.assert_allclose(dm.weight[w_true != 0], w_true[w_true != 0], atol=0.06)  # the lasso shrinks by about lambda
    # weights and bias are scikit-learn's lasso with an intercept at the chosen lambdas, on the refit's models (all of
    # them) standardised; a bias within 0.1 of the truth would let a 30% error through
    mu, sd = x.mean(0), x.std(0)
    for t in range(4):
        sk = Lasso(alpha=dm.lam[t], tol=1e-12, max_iter=100000).fit((x - mu) / sd, y[:, t])
        np.testing.assert_allclose(dm.weight[:, t], sk.coef_ / sd, atol=1e-4)
        assert dm.bias[t] == pytest.approx(sk.intercept_ - mu @ (sk.coef_ / sd), abs=1e-4)
    assert diag["val_mse_path"].shape == (40, 4)


def test_predict_on_raw_masks_equals_the_standardised_fit():
    x, y, _ = _planted(n_models=400, n=30, targets=2, noise=0.3)
    dm, _ = fit_datamodels(Moments.from_blocks([(x[:300], y[:300])]), Moments.from_blocks([(x[300:], y[300:])]),
                           num_lambdas=20, progress=False)
    masks = (np.random.default_rng(5).random((7, 30)) < 0.5).astype(float)
    standardised = dm.ybar + ((masks - dm.mu) / dm.sigma) @ dm.weight_std
    np.testing.assert_allclose(dm.predict(masks), standardised, rtol=1e-10, atol=1e-10)


def test_moments_mse_equals_direct_mse():
    x, y, w = _planted(n_models=50, n=10, targets=2)
    mom = Moments.from_blocks([(x, y)])
    direct = ((x @ w + 0.1 - y) ** 2).mean(0)
    np.testing.assert_allclose(mom.mse(w, np.full(2, 0.1)), direct, rtol=1e-10)


def test_moments_of_boolean_masks_hold_exact_float32_counts_and_standardise_like_numpy(monkeypatch):
    """The Gram of boolean masks is kept as float32 counts, exactly the float64 Gram; past the
    exactness bound (lowered here) the accumulation carries on in float64. Standardised, of one
    set of moments or of two without summing them, it equals numpy's population z-scores."""
    x, y, _ = _planted(n_models=90, n=12, targets=3, seed=7)
    masks = x.astype(bool)
    counts = Moments.from_blocks([(masks[:40], y[:40]), (masks[40:], y[40:])])
    assert counts.sxx.dtype == torch.float32
    np.testing.assert_array_equal(counts.sxx.double().numpy(), x.T @ x)
    assert Moments.from_blocks([(x, y)]).sxx.dtype == torch.float64  # not boolean: float64 throughout
    monkeypatch.setattr(datamodels_module, "EXACT_COUNTS", 60)
    crossing = Moments.from_blocks([(masks[:40], y[:40]), (masks[40:], y[40:])])
    assert crossing.sxx.dtype == torch.float64
    np.testing.assert_array_equal(crossing.sxx.numpy(), x.T @ x)
    a, b = Moments.from_blocks([(masks[:70], y[:70])]), Moments.from_blocks([(masks[70:], y[70:])])
    for moments, plus in ((counts, None), (a, b)):
        mu, sigma, ybar, gram, cross = (t.numpy() for t in moments.standardised(block=5, plus=plus))
        z = (x - x.mean(0)) / x.std(0)
        np.testing.assert_allclose(gram, z.T @ z / len(x), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(cross, z.T @ (y - y.mean(0)) / len(x), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ybar, y.mean(0), rtol=1e-14)
        np.testing.assert_allclose(sigma, x.std(0), rtol=1e-12)


def _peak_growth_mib(code: str) -> float:
    """Peak resident memory (MiB) a snippet adds, in a fresh interpreter: VmHWM after minus VmRSS before."""
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from pathlib import Path
        from datalens.attribution.datamodels import Moments
        def status(field):
            return next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(field))
        {textwrap.indent(textwrap.dedent(code), '        ').strip()}
        before = status('VmRSS')
        Path('/proc/self/clear_refs').write_text('5')
        run()
        print((status('VmHWM') - before) / 1024)
    """)
    return float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()[-1])


def test_standardising_holds_one_gram_beside_the_moments_not_the_several_temporaries_of_the_whole_array_formula():
    """n = 2500: the float64 (n, n) Gram is 48 MiB. Standardised by blocks of 128 rows, the step adds
    that one array and little else; the whole-array formula ((sxx / N - outer(mu, mu)) /
    outer(sigma, sigma)) allocates three more of them, which this budget would not admit."""
    setup = """
        masks = np.random.default_rng(0).random((300, 2500)) < 0.5
        mom = Moments.from_blocks([(masks, np.zeros((300, 1)))])
        def run():
            global out
            out = mom.standardised(block=128)
    """
    whole = setup.replace("out = mom.standardised(block=128)", "n, s, mu = mom.count, mom.sxx.double(), mom.sx / mom.count\n"
                          "            sd = torch.sqrt(torch.diagonal(s) / n - mu * mu)\n"
                          "            out = (s / n - torch.outer(mu, mu)) / torch.outer(sd, sd)")
    gram_mib = 2500 ** 2 * 8 / 2 ** 20
    budget = 1.5 * gram_mib
    assert _peak_growth_mib(setup) < budget
    assert _peak_growth_mib(whole) > budget  # the budget does separate the two


def test_targets_fitted_in_blocks_equal_the_fit_of_all_at_once():
    """Each target is its own lasso: blocks of 3 give the path, the chosen lambdas and the refit of
    the whole (to the solver's tolerance; a block may raise the step constant for the next)."""
    x, y, _ = _planted(n_models=700, n=50, targets=11, noise=0.3, seed=5)
    train, val = Moments.from_blocks([(x[:600], y[:600])]), Moments.from_blocks([(x[600:], y[600:])])
    whole, d_whole = fit_datamodels(train, val, num_lambdas=20, max_iter=5000, tol=1e-10, progress=False)
    blocked, d_blocked = fit_datamodels(train, val, num_lambdas=20, max_iter=5000, tol=1e-10, progress=False, block=3)
    np.testing.assert_array_equal(d_blocked["best_index"], d_whole["best_index"])
    np.testing.assert_allclose(d_blocked["lambda_grid"], d_whole["lambda_grid"], rtol=1e-12)
    np.testing.assert_allclose(d_blocked["val_mse_path"], d_whole["val_mse_path"], rtol=1e-7)
    np.testing.assert_allclose(blocked.weight, whole.weight, atol=1e-7)


def test_fitting_targets_in_blocks_keeps_the_working_set_within_a_budget_all_at_once_exceeds():
    """n = 600, T = 600: the solver's (n, T) float64 working set over all targets is about
    24 x 2.7 MiB; in blocks of 40 targets the fit holds the Gram, the moments and the (n, T)
    results (about 12 such arrays) and one block's iterates, inside a budget that the fit of all
    targets at once does not meet."""
    setup = """
        from datalens.attribution.datamodels import fit_datamodels
        rng = np.random.default_rng(0)
        masks = rng.random((240, 600)) < 0.5
        y = masks @ (rng.normal(size=(600, 600)) * (rng.random((600, 600)) < 0.01)) + rng.normal(size=(240, 600))
        train, val = Moments.from_blocks([(masks[:200], y[:200])]), Moments.from_blocks([(masks[200:], y[200:])])
        def run():
            fit_datamodels(train, val, num_lambdas=3, max_iter=10, progress=False, block=BLOCK)
    """
    array_mib = 600 * 600 * 8 / 2 ** 20
    budget = 16 * array_mib
    assert _peak_growth_mib(setup.replace("BLOCK", "40")) < budget
    assert _peak_growth_mib(setup.replace("BLOCK", "600")) > budget  # the budget does separate the two


def test_zero_models_is_refused():
    with pytest.raises(ValueError, match="zero rows"):
        Moments.from_blocks([])


def test_chosen_lambda_and_support_agree_with_sklearn_path_selection():
    from sklearn.linear_model import lasso_path
    x, y, _ = _planted(n_models=600, n=40, targets=3, k=4, noise=0.3, seed=3)
    tr, va = slice(0, 500), slice(500, None)
    train, val = Moments.from_blocks([(x[tr], y[tr])]), Moments.from_blocks([(x[va], y[va])])
    dm, diag = fit_datamodels(train, val, num_lambdas=25, eps=1e-3, max_iter=5000, tol=1e-9, progress=False)
    mu, sd = x[tr].mean(0), x[tr].std(0)
    for t in range(3):
        grid = diag["lambda_grid"][:, t]
        ybar = y[tr, t].mean()
        _, coefs, _ = lasso_path((x[tr] - mu) / sd, y[tr, t] - ybar, alphas=grid, tol=1e-10, max_iter=100000)
        val_mse = (((x[va] - mu) / sd @ coefs + ybar - y[va, t][:, None]) ** 2).mean(0)
        sk_best = int(np.argmin(val_mse))
        assert diag["best_index"][t] == sk_best
        lam = grid[sk_best]
        xa, ya = x, y[:, t]
        refit = Lasso(alpha=lam, tol=1e-12, max_iter=100000).fit((xa - xa.mean(0)) / xa.std(0), ya)
        assert set(np.flatnonzero(np.abs(refit.coef_) > 1e-6)) == set(np.flatnonzero(np.abs(dm.weight[:, t]) > 1e-6))


def _ill_conditioned(n=60, t=3, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    gram = q @ np.diag(np.geomspace(1.0, 1e-4, n)) @ q.T
    cross = gram @ rng.normal(size=(n, t))
    return torch.tensor(gram), torch.tensor(cross)


def test_fista_restarts_when_the_objective_rises_and_never_increases_it():
    from datalens.attribution.datamodels import lasso_objective
    gram, cross = _ill_conditioned()
    lam = torch.full((3,), 1e-4, dtype=torch.float64)
    w, info = lasso_fista(gram, cross, lam, max_iter=3000, tol=1e-12, return_info=True)
    assert info["restarts"] > 0  # momentum overshoots on an ill-conditioned problem, and the restart fires
    trace = np.array(info["objective"])
    assert (np.diff(trace) <= 1e-12 * np.abs(trace[:-1])).all()
    # and the answer is the lasso optimum: scikit-learn's coordinate descent on the same objective
    for j in range(3):
        ref = _lasso_reference(gram.numpy() + 1e-12 * np.eye(60), cross[:, j].numpy(), 1e-4)
        ours_obj = float(lasso_objective(gram, cross[:, j:j + 1], lam[:1], w[:, j:j + 1])[0])
        sk_obj = float(lasso_objective(gram, cross[:, j:j + 1], lam[:1], torch.tensor(ref)[:, None])[0])
        assert ours_obj == pytest.approx(sk_obj, rel=1e-8, abs=1e-12)


def test_reaching_max_iter_before_tol_warns_with_the_params():
    x, y, _ = _planted(n_models=300, n=40, targets=2, noise=0.5)
    with pytest.warns(UserWarning, match=r"datamodels.max_iter=2 before datamodels.tol"):
        _, diag = fit_datamodels(Moments.from_blocks([(x[:250], y[:250])]), Moments.from_blocks([(x[250:], y[250:])]),
                                 num_lambdas=5, max_iter=2, tol=1e-12, progress=False)
    assert diag["unconverged_solves"] > 0


def test_refit_starts_from_the_solution_at_the_chosen_lambda():
    x, y, _ = _planted(n_models=600, n=40, targets=3, noise=0.3, seed=4)
    train, val = Moments.from_blocks([(x[:500], y[:500])]), Moments.from_blocks([(x[500:], y[500:])])
    _, diag = fit_datamodels(train, val, num_lambdas=25, max_iter=5000, tol=1e-10, progress=False)
    mu, sigma, ybar, gram, cross = (a.numpy() for a in train.standardised())
    last = np.flatnonzero(~np.isnan(diag["val_mse_path"][:, 0]))[-1]
    assert diag["best_index"][0] < last  # the path went past the chosen lambda, so the two starts differ
    for t in range(3):
        lam = diag["lambda_grid"][diag["best_index"][t], t]
        cold = lasso_fista(torch.tensor(gram), torch.tensor(cross[:, t:t + 1]), torch.tensor([lam]), max_iter=20000, tol=1e-12)
        np.testing.assert_allclose(diag["refit_start"][:, t], cold[:, 0].numpy(), atol=1e-5)


def test_saved_fits_come_back_with_their_seconds_and_a_missing_count_is_named(tmp_path):
    rng = np.random.default_rng(0)
    dm = Datamodels(weight=rng.normal(size=(6, 3)), bias=rng.normal(size=3), lam=np.ones(3), weight_std=rng.normal(size=(6, 3)),
                    mu=np.full(6, 0.5), sigma=np.full(6, 0.5), ybar=np.zeros(3))
    save_fit(tmp_path / "fits", 80, dm, 3.25)
    save_fit(tmp_path / "fits", 40, dm, 1.5)
    back = list(load_fits(tmp_path / "fits", [80, 40]))
    assert [(n, sec) for n, _, sec in back] == [(40, 1.5), (80, 3.25)] and np.array_equal(back[0][1].weight, dm.weight)
    with pytest.raises(FileNotFoundError, match=r"\[60\] models"):
        load_fits(tmp_path / "fits", [40, 60])


def _lasso_reference(gram: np.ndarray, cross: np.ndarray, lam: float) -> np.ndarray:
    """scikit-learn's coordinate descent on 1/2 w^T C w - c^T w + lam |w|_1: with C = R^T R and
    R^T b = c, that is 1/(2n) |sqrt(n) b - sqrt(n) R w|^2 + lam |w|_1 up to a constant."""
    from scipy.linalg import cholesky
    n = len(gram)
    chol = cholesky(gram)
    b = np.linalg.solve(chol.T, cross)
    return Lasso(alpha=lam, fit_intercept=False, tol=1e-15, max_iter=500000).fit(np.sqrt(n) * chol, np.sqrt(n) * b).coef_


def test_a_short_lipschitz_estimate_is_raised_and_the_optimum_still_reached():
    # the power iteration starts from the ones vector; every row of this integer matrix sums to 2,
    # so it stays exactly there and estimates 2, while the top eigenvalue, 8, lies on (1, -1, 0, ...):
    # steps of 1/2.02 more than double the error along it
    rng = np.random.default_rng(0)
    n = 6
    gram = 2.0 * np.eye(n)
    gram[:2, :2] = [[5.0, -3.0], [-3.0, 5.0]]
    cross = gram @ rng.normal(size=n)
    from datalens.attribution.datamodels import _lipschitz
    assert _lipschitz(torch.tensor(gram)) < 4.0  # the estimate falls short of 8 by more than half
    w, info = lasso_fista(torch.tensor(gram), torch.tensor(cross[:, None]), torch.tensor([0.05]), max_iter=20000, tol=1e-13,
                          return_info=True)
    assert info["converged"] and info["lipschitz"] >= 8.0
    np.testing.assert_allclose(w[:, 0].numpy(), _lasso_reference(gram, cross, 0.05), atol=1e-8)


def test_each_target_stops_on_its_own_scale():
    # one target's weights are 1e4 times smaller than the other's: a stop judged on the largest
    # weight of all would leave the small one far from its optimum
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    gram = torch.tensor(q @ np.diag(np.geomspace(1.0, 1e-2, 40)) @ q.T)
    cross = gram @ torch.tensor(rng.normal(size=(40, 2)) * [1.0, 1e-4])
    lam = torch.tensor([1e-4, 1e-8], dtype=torch.float64)
    w = lasso_fista(gram, cross, lam, max_iter=100000, tol=1e-6).numpy()
    for j in range(2):
        ref = _lasso_reference(gram.numpy(), cross[:, j].numpy(), float(lam[j]))
        assert np.abs(w[:, j] - ref).max() <= 1e-3 * np.abs(ref).max()


def test_the_configuration_checks_memory_estimate_is_below_the_fits_measured_peak():
    """The check that refuses a fit before it starts (datalens.core.memory) counts only arrays the fit
    must hold: at n = 600, T = 600 its estimate is below the peak the fit is measured to reach, so a
    refusal is never of a fit that would have fitted."""
    from datalens.core.memory import _needs
    estimate = next(need for param, _, what, need, _ in _needs({"device": "cpu", "datamodels.max_iter": 10}, 600, 600)
                    if what.startswith("the datamodels fit"))
    setup = """
        from datalens.attribution.datamodels import fit_datamodels
        rng = np.random.default_rng(0)
        masks = rng.random((240, 600)) < 0.5
        y = masks @ (rng.normal(size=(600, 600)) * (rng.random((600, 600)) < 0.01)) + rng.normal(size=(240, 600))
        def run():
            global train, val
            train, val = Moments.from_blocks([(masks[:200], y[:200])]), Moments.from_blocks([(masks[200:], y[200:])])
            fit_datamodels(train, val, num_lambdas=3, max_iter=10, progress=False, block=40)
    """
    assert estimate / 2 ** 20 < _peak_growth_mib(setup)
