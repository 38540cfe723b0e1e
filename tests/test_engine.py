import numpy as np
import pytest
import torch

from datalens.core.data import load_digits
from datalens.core.models import build_model
from datalens.training.engine import NonFiniteLossError, TrainSettings, flatten_state, init_models, train_models, unflatten_state
from datalens.tasks.classification import ClassificationTask, margins_from_logits
from datalens.core.sampling import model_seed, subset_masks

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    return ds, torch.tensor(ds.x_train), torch.tensor(ds.y_train), torch.tensor(ds.x_test), torch.tensor(ds.y_test)


def _both_paths(digits, model_name, kwargs, settings, m=5):
    ds, x, y, xt, yt = digits
    masks = subset_masks(0, range(m), ds.n_train, 0.5)
    seeds = [model_seed(0, j, 0) for j in range(m)]
    factory = lambda: build_model(model_name, ds.input_shape, ds.num_classes, **kwargs)  # noqa: E731
    out = []
    for batched in (True, False):
        trained = train_models(TASK, init_models(factory, seeds), x, y, masks, seeds, settings, batched=batched)
        out.append(margins_from_logits(trained.outputs(TASK, xt, yt), yt).numpy())
    return out


@pytest.mark.parametrize(
    "model_name,kwargs,settings",
    [
        ("mlp", {"hidden": [32]}, TrainSettings(epochs=20, lr=1e-2, weight_decay=1e-3)),
        ("mlp", {"hidden": [16, 16]}, TrainSettings(epochs=3, lr=5e-2, optimizer="sgd", batch_size=128, schedule="triangular", peak_epoch=1)),
        ("cnn", {"width": 4}, TrainSettings(epochs=2, lr=1e-2, batch_size=256)),
    ],
)
def test_batched_training_equals_training_each_model_alone(digits, model_name, kwargs, settings):
    batched, alone = _both_paths(digits, model_name, kwargs, settings)
    assert batched.shape == alone.shape == (5, 450)
    np.testing.assert_allclose(batched, alone, rtol=1e-3, atol=2e-3)
    # and the models really differ from each other (the comparison is not vacuous)
    assert np.abs(batched[0] - batched[1]).max() > 0.05


@pytest.mark.parametrize("model_name,kwargs,settings", [
    ("mlp", {"hidden": [32]}, TrainSettings(epochs=20, lr=1e-2, weight_decay=1e-3, precision="bfloat16")),
    ("cnn", {"width": 4}, TrainSettings(epochs=2, lr=1e-2, batch_size=256, precision="bfloat16")),
])
def test_bfloat16_batched_training_matches_autocast_loop(digits, model_name, kwargs, settings):
    # The stacked MLP casts by hand and the vmap path relies on autocast; the loop path is
    # plain torch.autocast. Rounding in bfloat16 differs with the kernel, hence the looser
    # bound than float32's, yet far below the gap between two models (checked below).
    batched, alone = _both_paths(digits, model_name, kwargs, settings)
    assert np.abs(batched - alone).max() < 0.1
    assert np.corrcoef(batched.ravel(), alone.ravel())[0, 1] > 0.999
    assert np.abs(batched[0] - batched[1]).max() > 1.0


def test_bfloat16_training_agrees_with_float32(digits):
    ds, x, y, xt, yt = digits
    masks = subset_masks(0, range(8), ds.n_train, 0.5)
    seeds = [model_seed(0, j, 0) for j in range(8)]
    factory = lambda: build_model("mlp", ds.input_shape, ds.num_classes, hidden=[32])  # noqa: E731
    out = {}
    for precision in ("float32", "bfloat16"):
        settings = TrainSettings(epochs=30, lr=1e-2, weight_decay=1e-3, precision=precision)
        trained = train_models(TASK, init_models(factory, seeds), x, y, masks, seeds, settings)
        assert all(p.dtype == torch.float32 for p in trained.params.values())
        logits = trained.outputs(TASK, xt, yt)
        out[precision] = (margins_from_logits(logits, yt).numpy(), (logits.argmax(-1) == yt).float().mean().item())
    (m32, acc32), (m16, acc16) = out["float32"], out["bfloat16"]
    assert abs(acc32 - acc16) < 0.01
    assert np.corrcoef(m32.ravel(), m16.ravel())[0, 1] > 0.999
    assert not np.array_equal(m32, m16)  # bfloat16 really ran


def test_margin_is_log_odds_of_the_true_class():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.1, 3.0]]])
    y = torch.tensor([0, 1])
    p = torch.softmax(logits, -1)[0]
    expected = torch.log(p[[0, 1], y] / (1 - p[[0, 1], y]))
    torch.testing.assert_close(margins_from_logits(logits, y)[0], expected)


def test_nan_loss_is_reported_with_model_ids(digits):
    ds, x, y, *_ = digits
    masks = subset_masks(0, range(2), ds.n_train, 0.5)
    models = init_models(lambda: build_model("mlp", ds.input_shape, 10, hidden=[8]), [1, 2])
    with pytest.raises(NonFiniteLossError, match=r"models \[7, 8\].*train.lr"):
        train_models(TASK, models, x, y, masks, [1, 2], TrainSettings(epochs=3, lr=1e30), model_ids=[7, 8])


def test_checkpoint_round_trip_restores_the_model(digits):
    ds, x, *_ = digits
    model = build_model("resnet9", (3, 8, 8), 10, width=4)
    other = build_model("resnet9", (3, 8, 8), 10, width=4)
    other.load_state_dict(unflatten_state(flatten_state(model.state_dict()), other))
    inp = torch.randn(2, 3, 8, 8)
    model.eval(), other.eval()
    torch.testing.assert_close(model(inp), other(inp))


def test_augmentation_is_pad_crop_and_flip_per_image():
    from datalens.training.engine import augment
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    out = augment(x, gen)
    pad = 2  # H / 8
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    # the same draws, replayed by hand: flips, then row and column offsets, one per image
    replay = torch.Generator().manual_seed(0)
    flip = torch.rand(2, generator=replay) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (2,), generator=replay)
    dx = torch.randint(0, 2 * pad + 1, (2,), generator=replay)
    for i in range(2):
        crop = padded[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16]
        torch.testing.assert_close(out[i], crop.flip(2) if flip[i] else crop)
    assert augment(x[:, 0].reshape(2, -1), gen).shape == (2, 256)  # flat inputs pass through


def test_a_model_trains_the_same_in_any_grouping_with_minibatches_and_augmentation(digits):
    ds, x, y, xt, yt = digits
    x4, xt4 = x.reshape(-1, 1, 8, 8), xt.reshape(-1, 1, 8, 8)
    masks = subset_masks(0, range(6), ds.n_train, 0.5)
    seeds = [model_seed(0, j, 0) for j in range(6)]
    settings = TrainSettings(epochs=2, lr=1e-2, batch_size=135, augment=True)
    factory = lambda: build_model("cnn", (1, 8, 8), ds.num_classes, width=4)  # noqa: E731

    def margins(ids, stack_size):
        trained = train_models(TASK, init_models(factory, [seeds[i] for i in ids]), x4, y, masks[ids], [seeds[i] for i in ids],
                               settings, stack_size=stack_size)
        return margins_from_logits(trained.outputs(TASK, xt4, yt), yt).numpy()

    together = margins([0, 1, 2, 3, 4, 5], stack_size=6)
    # model 4 alone, and in a different stack with other company, in another order
    np.testing.assert_allclose(margins([4], 1)[0], together[4], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(margins([5, 4, 1], 2)[1], together[4], rtol=1e-4, atol=1e-4)
    # steps per epoch come from each model's own subset: model 4 takes 6 steps, the rest 5 (stacked apart)
    assert [settings.steps_per_epoch(int(m.sum())) for m in masks] == [5, 5, 5, 5, 6, 5]
    assert np.abs(together[0] - together[1]).max() > 0.05  # the models differ: the comparison is not vacuous


@pytest.mark.parametrize("batched", [True, False])
def test_the_triangular_schedule_rises_to_the_peak_then_falls_to_zero(digits, monkeypatch, batched):
    """The learning rate each optimizer step uses, against the closed form: linear warm-up over
    peak_epoch epochs to train.lr, then linear decay to 0 at the last step (constant: train.lr)."""
    x, y = digits[1], digits[2]
    masks = subset_masks(0, np.arange(1), len(y), 0.5)
    steps_per_epoch = -(-int(masks.sum()) // 128)
    real = torch.optim.SGD.step
    for schedule in ("triangular", "constant"):
        settings = TrainSettings(epochs=4, lr=0.1, optimizer="sgd", batch_size=128, schedule=schedule, peak_epoch=1.5)
        used = []
        monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: used.append(self.param_groups[0]["lr"]) or real(self, *a, **k))
        factory = lambda: build_model("mlp", (64,), 10, hidden=[8])  # noqa: E731
        train_models(TASK, init_models(factory, [1]), x, y, masks, [1], settings, batched=batched)
        total, peak = 4 * steps_per_epoch, int(1.5 * steps_per_epoch)
        step = np.arange(total)
        closed = np.where(step < peak, (step + 1) / peak, (total - step) / (total - peak)) if schedule == "triangular" else np.ones(total)
        np.testing.assert_allclose(used, 0.1 * closed, rtol=1e-12)
        if schedule == "triangular":
            assert max(used) == pytest.approx(0.1) and used[0] < 0.1 / 2 and used[-1] < 0.1 / 2


def test_tracin_weights_each_snapshot_by_the_learning_rate_of_its_interval():
    from datalens.training.engine import interval_lrs
    tri = TrainSettings(epochs=10, lr=0.5, schedule="triangular", peak_epoch=5)
    # one step per epoch: factors 0.2 0.4 0.6 0.8 1.0 rising, then 1.0 0.8 0.6 0.4 0.2 (closed form of the schedule)
    assert interval_lrs(tri, [2, 10], 1) == pytest.approx([0.5 * 0.6, 0.5 * 5.4])
    assert interval_lrs(tri, [5, 10], 2) == pytest.approx([0.5 * 5.5, 0.5 * 5.5])  # 10 steps up, 10 down
    const = TrainSettings(epochs=100, lr=0.01, schedule="constant")
    assert interval_lrs(const, [25, 50, 75, 100], 3) == pytest.approx([0.01 * 75] * 4)
