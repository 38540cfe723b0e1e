"""Diffusion models: the schedule, the noising and the loss against the DDPM closed forms, the fixed-noise
measurement, per-example gradients, the sampler, training draws that depend only on a model's seed, and
the CIFAR-10 paper profile end to end on tiny data."""
from __future__ import annotations

import math
import pickle
import tarfile
from dataclasses import replace
from io import BytesIO

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_gradients_match_autograd, paper_profile, run_profile_stage
from datalens.core.denoisers import mlp_denoiser, unet_denoiser
from datalens.core.diffusion import cosine_alpha_bar, digits_denoising, fixed_draws, spaced_draws
from datalens.tasks.diffusion import DiffusionTask, posterior_step, sample, sampling_noise, step_targets
from datalens.training.engine import TrainSettings
from datalens.training.runs import SubsetRun, train_range

T = 20


def closed_form_alpha_bar(steps: int, offset: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's alpha_bar_t = f(t + 1) / f(0), valid wherever beta is not clipped."""
    f = lambda s: math.cos((s / steps + offset) / (1 + offset) * math.pi / 2) ** 2  # noqa: E731
    return np.array([f(t + 1) / f(0) for t in range(steps)])


def test_the_schedule_is_the_cosine_closed_form():
    got, want = cosine_alpha_bar(T).numpy(), closed_form_alpha_bar(T)
    np.testing.assert_allclose(got[:-1], want[:-1], rtol=1e-12)  # the last beta is clipped at 0.999
    assert got[-1] == pytest.approx(got[-2] * 0.001, rel=1e-12) and want[-1] < 1e-30  # f(T) = cos(pi/2)^2 = 0


def test_forward_noising_and_loss_match_the_ddpm_closed_forms():
    rng = np.random.default_rng(0)
    x0, y = rng.uniform(-1, 1, (3, 6)).astype(np.float32), fixed_draws(0, "train", 3, 4, 6)
    seen = {}

    def model(xt, t):  # records what it is given and predicts half of it
        seen["xt"], seen["t"] = xt, t
        return 0.5 * xt

    task = DiffusionTask(T)
    out = task.forward(model, torch.as_tensor(x0), torch.as_tensor(y))
    ab = closed_form_alpha_bar(T)
    t = np.floor(y[..., 0] * T).astype(int)
    xt = np.sqrt(ab[t])[..., None] * x0[:, None] + np.sqrt(1 - ab[t])[..., None] * y[..., 1:]
    np.testing.assert_allclose(seen["xt"].numpy().reshape(3, 4, 6), xt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["t"].numpy(), ((t + 0.5) / T).ravel(), rtol=1e-6)
    loss = ((y[..., 1:] - 0.5 * xt) ** 2).mean((1, 2))
    np.testing.assert_allclose(task.loss(out, torch.as_tensor(y)).numpy(), loss, rtol=1e-5)
    np.testing.assert_allclose(task.output(out, torch.as_tensor(y)).numpy(), -loss, rtol=1e-5)
    np.testing.assert_allclose(DiffusionTask(T, "square_norm").output(out, torch.as_tensor(y)).numpy(), ((0.5 * xt) ** 2).mean((1, 2)), rtol=1e-5)
    # K' of the K draws: the evenly spaced ones
    assert spaced_draws(32, 4).tolist() == [4, 12, 20, 28] and spaced_draws(4, 4).tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(DiffusionTask(T, draws=2).loss(DiffusionTask(T, draws=2).forward(model, torch.as_tensor(x0), torch.as_tensor(y)),
                                                              torch.as_tensor(y)).numpy(), ((y[:, [1, 3], 1:] - 0.5 * xt[:, [1, 3]]) ** 2).mean((1, 2)), rtol=1e-5)
    with pytest.raises(ValueError, match="5 timesteps asked for, but the data carries 4"):
        spaced_draws(4, 5)


def test_draws_are_stratified_and_fixed_by_seed_split_and_size():
    y = fixed_draws(0, "train", 50, 8, 3)
    assert np.array_equal(y, fixed_draws(0, "train", 50, 8, 3)) and not np.array_equal(y, fixed_draws(0, "test", 50, 8, 3))
    k = np.arange(8)
    assert np.all((y[..., 0] >= k / 8) & (y[..., 0] < (k + 1) / 8))  # draw k in stratum k


def tiny_diffusion_run(tmp_path, **changes) -> SubsetRun:
    run = SubsetRun("datalens.core.diffusion:digits_denoising", "data", "datalens.core.denoisers:mlp_denoiser",
                    {"hidden": [16], "time_dim": 8, "schedule_steps": T}, TrainSettings(epochs=3, lr=1e-2, batch_size=64), 0.5, 0, 6, 6,
                    str(tmp_path / "store"), num_checkpoints=6, device="cpu", task="diffusion", stack_size=6, repo=str(ROOT))
    return replace(run, **changes)


def test_training_draws_depend_only_on_the_model_seed_and_the_measurement_repeats_exactly(tmp_path):
    run = tiny_diffusion_run(tmp_path)
    stacked, alone = train_range(run, 0, 3), train_range(replace(run, stack_size=1), 0, 3)
    for a, b in zip(stacked["models"].state_dicts(), alone["models"].state_dicts()):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    again = train_range(run, 0, 3)
    assert np.array_equal(again["test_outputs"], stacked["test_outputs"])  # the fixed-noise measurement, bit for bit
    # and it is the negated loss at the test set's fixed draws, computed here draw by draw
    ds, task = run.dataset_(), run.make_task()
    model = run.build_model()
    model.load_state_dict(stacked["models"].state_dicts()[1])
    ab = closed_form_alpha_bar(T)
    ab[-1] = cosine_alpha_bar(T)[-1].item()
    for j in (0, 7):
        losses = []
        for u, *eps in ds.y_test[j]:
            t = int(u * T)
            xt = math.sqrt(ab[t]) * ds.x_test[j] + math.sqrt(1 - ab[t]) * np.asarray(eps)
            with torch.no_grad():
                pred = model(torch.as_tensor(xt, dtype=torch.float32)[None], torch.tensor([(t + 0.5) / T]))[0].numpy()
            losses.append(np.mean((np.asarray(eps) - pred) ** 2))
        assert stacked["test_outputs"][1, j] == pytest.approx(-np.mean(losses), rel=1e-5)
    assert task.metric_name == "denoising loss"


@pytest.mark.parametrize("output", ["loss", "square_norm"])
def test_per_example_gradients_match_a_loop(output):
    torch.manual_seed(0)
    model = mlp_denoiser((6,), hidden=[5], time_dim=4).double()
    x = torch.rand(4, 6, dtype=torch.float64) * 2 - 1
    y = torch.as_tensor(fixed_draws(1, "train", 4, 3, 6), dtype=torch.float64)
    assert_gradients_match_autograd(model, x, y, DiffusionTask(T, output, draws=2))


def test_the_unet_gives_per_example_gradients_too():
    torch.manual_seed(0)
    model = unet_denoiser((3, 8, 8), width=4, levels=2, time_dim=8, groups=2).double()
    assert not list(model.buffers())  # so it trains stacked
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.as_tensor(fixed_draws(1, "train", 2, 2, 3 * 64), dtype=torch.float64)
    assert_gradients_match_autograd(model, x, y, DiffusionTask(T))


def test_sampling_with_fixed_noise_repeats_exactly_resumes_and_steps_by_the_posterior():
    torch.manual_seed(0)
    model, task = mlp_denoiser((6,), hidden=[8], time_dim=4).eval(), DiffusionTask(T)
    noise = sampling_noise(3, 2, T, 6)
    first, second = sample(model, task, noise, (6,)), sample(model, task, noise, (6,))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["final"], sample(model, task, sampling_noise(4, 2, T, 6), (6,))["final"])
    resumed = sample(model, task, noise, (6,), start=7, x_start=first["states"][:, 7])
    torch.testing.assert_close(resumed["final"], first["final"], rtol=0, atol=0)
    # one step against DDPM's posterior q(x_{s-1} | x_s, x_0): Ho et al. (2020), eq. 7, in numpy
    ab = cosine_alpha_bar(T).numpy()
    s, xs = 7, first["states"][:, 7].double().numpy()
    with torch.no_grad():
        eps = model(first["states"][:, 7], torch.full((2,), (s + 0.5) / T)).double().numpy()
    x0 = np.clip((xs - np.sqrt(1 - ab[s]) * eps) / np.sqrt(ab[s]), -1, 1)
    beta = 1 - ab[s] / ab[s - 1]
    mean = np.sqrt(ab[s - 1]) * beta / (1 - ab[s]) * x0 + np.sqrt(1 - beta) * (1 - ab[s - 1]) / (1 - ab[s]) * xs
    want = mean + np.sqrt(beta * (1 - ab[s - 1]) / (1 - ab[s])) * noise[:, s - 1].double().numpy()
    np.testing.assert_allclose(first["states"][:, 6].double().numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first["x0"][:, 7].double().numpy(), x0, rtol=1e-4, atol=1e-5)
    last, _ = posterior_step(cosine_alpha_bar(T).float(), 0, first["states"][:, 0], torch.zeros(2, 6), torch.zeros(2, 6))
    assert last.abs().max() <= 1  # the last step returns the clipped x_0 prediction


def test_step_targets_sit_at_their_step():
    y = step_targets(0, T, 13, 3, 5, 6)
    task = DiffusionTask(T)
    assert task.timesteps(y[..., 0]).eq(13).all() and y.shape == (3, 5, 7)
    assert torch.equal(y, step_targets(0, T, 13, 3, 5, 6)) and not torch.equal(y[..., 1:], step_targets(0, T, 12, 3, 5, 6)[..., 1:])


def test_generated_samples_join_the_test_split_with_draws_of_their_own(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (5, 64)).astype(np.float32)
    np.save(tmp_path / "gen.npy", x)
    base, run = digits_denoising(), tiny_diffusion_run(tmp_path, generated=str(tmp_path / "gen.npy"))
    ds = run.dataset_()
    assert ds.n_test == base.n_test + 5 and np.array_equal(ds.x_test[-5:], x)
    assert np.array_equal(ds.y_test[-5:], fixed_draws(0, "generated", 5, 32, 64)) and np.array_equal(ds.y_test[:-5], base.y_test)
    np.testing.assert_allclose(ds.images_test[-5:], (x.reshape(5, 8, 8) + 1) / 2, atol=1e-6)
    assert run.identity()["data.content_hash"] != replace(run, generated=None).identity()["data.content_hash"]


def write_tiny_cifar(path, n_train: int = 40, n_test: int = 10) -> None:
    """A CIFAR-10-format tarball of random images."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        def add(name, blob):
            data = pickle.dumps(blob)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, BytesIO(data))
        add("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
        add("data_batch_1", {b"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n_train))})
        add("test_batch", {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n_test))})


@pytest.mark.slow
def test_the_diffusion_paper_profile_runs_end_to_end_on_tiny_cifar_data(root, tmp_path):
    paper_profile(root, tmp_path)
    write_tiny_cifar(tmp_path / "data" / "cifar-10-python.tar.gz")
    result = run_profile_stage(root, tmp_path, "12_diffusion", "diffusion", {
        "model.width": 4, "model.levels": 2, "model.time_dim": 8, "model.groups": 2, "model.schedule_steps": 20, "train.num_models": 16,
        "train.num_checkpoints": 3, "train.block_size": 8, "train.stack_size": 8, "train.epochs": 2, "train.peak_epoch": 1, "train.batch_size": 16,
        "train.precision": "float32", "evaluation.num_masks": 5, "trak.num_models": [1, 3], "trak.proj_dims": [16],
        "attribution.ensemble_sizes": [1, 2], "attribution.selection_models": 5,
        "counterfactuals.num_targets": 1, "counterfactuals.ks": [5], "counterfactuals.steps": [5], "denoising.num_generated": 3,
        "denoising.trajectories": 2, "denoising.steps": [15, 5], "denoising.timesteps": [2, 10], "denoising.step_draws": 2})
    assert {r["method"] for r in result["records"]} == {"trak_loss", "trak_square_norm", "trak_loss_to_square_norm", "empirical_influence", "grad_dot",
                                                       "grad_cosine"}
    assert {r["timesteps"] for r in result["records"] if r["method"].startswith("trak")} == {2, 10}
    assert set(result["ceiling"]) == {"validation", "generated"} and len(result["stepwise"]["same_class"]) == 2
    assert (tmp_path / "diffusion" / "figures" / "stepwise_attribution.png").exists()
    assert len(list((tmp_path / "stores" / "diffusion" / "train_subsets").glob("*.zarr"))) == 1


def test_diffusion_params_that_do_not_fit_are_refused_naming_them(root, tmp_path):
    from datalens.applications.diffusion import check
    from datalens.core.config import ParamError, section_params, stage_params
    with pytest.raises(ParamError, match=r"diffusion.denoising.steps=\[90, 120\], diffusion.model.schedule_steps=100 do not fit together"):
        stage_params("diffusion", root / "params.yaml", {"diffusion.denoising.steps": [90, 120]})
    with pytest.raises(ParamError, match=r"diffusion.denoising.outputs=\['l1_norm'\] is not allowed; it must be a non-empty list of: loss"):
        stage_params("diffusion", root / "params.yaml", {"diffusion.denoising.outputs": ["l1_norm"]})
    with pytest.raises(ParamError, match=r"diffusion.denoising.trajectories=60, diffusion.denoising.num_generated=50 do not fit together"):
        stage_params("diffusion", root / "params.yaml", {"diffusion.denoising.trajectories": 60})
    p = stage_params("diffusion", root / "params.yaml", {"diffusion.denoising.outputs": ["square_norm"]})
    with pytest.raises(ValueError, match=r"diffusion.denoising.outputs=\['square_norm'\] is not allowed; it must include loss"):
        check(tiny_diffusion_run(tmp_path), section_params(p, "diffusion")["denoising"])
    # more timesteps than the data's fixed draws: one line before any training
    p = stage_params("diffusion", root / "params.yaml", {"diffusion.denoising.timesteps": [4, 64]})
    with pytest.raises(ValueError, match=r"diffusion.denoising.timesteps=\[4, 64\] is not allowed; .* carries 32 fixed draws"):
        check(tiny_diffusion_run(tmp_path), section_params(p, "diffusion")["denoising"])
