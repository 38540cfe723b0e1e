"""The contrastive (CLIP) task, its two-tower model and the digits captions, against direct
computations from their definitions."""
import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.datasets import load_digits
from torch.func import functional_call, stack_module_state, vmap

from datalens.core.captions import LEVELS, Vocabulary, attributes, digit_pairs, levels, negative_indices, tertiles
from datalens.core.two_tower import TwoTower
from datalens.tasks.contrastive import ContrastiveTask
from datalens.core.sampling import subset_masks
from datalens.tasks.gradients import per_example_gradients
from datalens.training.engine import TrainSettings, init_models, train_models
from datalens.training.runs import SubsetRun, train_subset_models


def _setup(batch=5, pool=7, negatives=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TwoTower((64,), vocab_size=12, dim=8, image_hidden=16, text_hidden=16)
    pool_x, pool_tok = torch.randn(pool, 64, generator=g), torch.randint(0, 12, (pool, 6), generator=g)
    x, tok = torch.randn(batch, 64, generator=g), torch.randint(1, 12, (batch, 6), generator=g)
    neg = torch.as_tensor(negative_indices(batch, pool, negatives, seed))
    return model, ContrastiveTask(pool_x, pool_tok), x, torch.cat([tok, neg], 1), pool_x, pool_tok, neg


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_clip_output_and_q_equal_the_formula_computed_directly():
    model, task, x, y, pool_x, pool_tok, neg = _setup()
    with torch.no_grad():
        out = task.forward(model, x, y)
        f, q = task.output(out, y).numpy(), task.out_to_loss(out, y).numpy()
        img = model.image(x).numpy()
        bag = lambda t: np.stack([np.bincount(r[r > 0], minlength=12) / max((r > 0).sum(), 1) for r in t.numpy()])  # noqa: E731
        txt = model.text(torch.as_tensor(bag(y[:, :6]), dtype=torch.float32)).numpy()
        pimg, ptxt = model.image(pool_x).numpy(), model.text(torch.as_tensor(bag(pool_tok), dtype=torch.float32)).numpy()
        tau = float(torch.exp(model.logit_scale))
    for i in range(len(x)):
        phi, psi = _unit(img[i]), _unit(txt[i])
        phi_j, psi_j = _unit(pimg[neg[i].numpy()]), _unit(ptxt[neg[i].numpy()])
        expected = -scipy.special.logsumexp(-phi @ (psi - psi_j).T) - scipy.special.logsumexp(-psi @ (phi - phi_j).T)
        assert f[i] == pytest.approx(expected, abs=1e-5)
        p_i2t = np.exp(tau * phi @ psi) / (np.exp(tau * phi @ psi) + np.exp(tau * psi_j @ phi).sum())
        p_t2i = np.exp(tau * phi @ psi) / (np.exp(tau * phi @ psi) + np.exp(tau * phi_j @ psi).sum())
        assert q[i] == pytest.approx(1 - (p_i2t + p_t2i) / 2, abs=1e-5)


def test_infonce_loss_is_clips_symmetric_cross_entropy_and_padding_is_no_ones_negative():
    model, task, x, y, *_ = _setup(batch=6)
    tokens = task.training_targets(y)
    with torch.no_grad():
        out = task.forward(model, x, tokens)
        logits = (out[:, 0, 0] @ out[:, 0, 1].T).numpy()
        labels = np.arange(6)
        ce = lambda z: -scipy.special.log_softmax(z, axis=1)[labels, labels]  # noqa: E731
        assert task.mean_loss(out, tokens).item() == pytest.approx(np.mean((ce(logits) + ce(logits.T)) / 2), rel=1e-5)
        # the last two entries are padding (weight 0): the rest's loss is that of the first four alone
        w = torch.tensor([0.25] * 4 + [0.0, 0.0])
        alone = task.mean_loss(out[:4], tokens[:4]).item()
        assert task.batch_loss(out, tokens, w).sum().item() == pytest.approx(alone, rel=1e-5)


def test_negatives_are_drawn_uniformly_from_the_whole_pool_and_never_the_pair_itself():
    pool, k, n = 20, 4, 5000
    own = np.arange(n) % pool
    neg = negative_indices(n, pool, k, seed=3, own=own)
    assert neg.shape == (n, k) and all(len(set(r)) == k for r in neg[:200])
    assert not (neg == own[:, None]).any()
    counts = np.bincount(neg.ravel(), minlength=pool)
    assert counts.min() > 0  # index 0 and the last index are drawn too (traker's index-weighted draw never picks 0)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    assert np.array_equal(neg, negative_indices(n, pool, k, seed=3, own=own))
    with pytest.raises(ValueError, match="num_negatives=20 exceeds the pool of 20"):
        negative_indices(3, pool, 20, seed=0, own=np.zeros(3, int))


def test_per_example_gradients_of_the_clip_output_equal_a_loop_of_autograd():
    model, task, x, y, *_ = _setup(batch=4)
    batched = per_example_gradients(model, x, y, task)
    params = list(model.parameters())
    for i in range(len(x)):
        f = task.output(task.forward(model, x[i:i + 1], y[i:i + 1]), y[i:i + 1])[0]
        loop = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params)])
        torch.testing.assert_close(batched[i], loop, rtol=1e-4, atol=1e-6)


def test_two_towers_stacked_under_vmap_equal_each_model_alone():
    _, task, x, y, *_ = _setup()
    models = []
    for s in range(3):
        torch.manual_seed(s)
        models.append(TwoTower((64,), vocab_size=12, dim=8, image_hidden=16, text_hidden=16))
    params, buffers = stack_module_state(models)
    stacked = vmap(lambda p, b: task.forward(lambda *a: functional_call(models[0], (p, b), a), x, y))(params, buffers)
    for m, model in enumerate(models):
        torch.testing.assert_close(stacked[m], task.forward(model, x, y), rtol=1e-5, atol=1e-6)


def test_captions_are_rebuilt_identically_and_name_what_the_pixels_measure():
    d = load_digits()
    a = digit_pairs(d.images[:300], d.target[:300], d.images[300:400], d.target[300:400], seed=0)
    b = digit_pairs(d.images[:300], d.target[:300], d.images[300:400], d.target[300:400], seed=0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[3] == b[3]
    vocab = a[2]
    assert [vocab.decode(t) for t in a[0][:20]] == a[3][:20]
    assert all(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][y] in c.split()
               for y, c in zip(d.target[:300], a[3]))
    # a stroke from bottom left to top right leans right; a wider and inkier image measures so
    stroke = np.zeros((1, 8, 8))
    for r in range(8):
        stroke[0, r, 7 - r] = 16
    wide = np.full((1, 8, 8), 16.0)
    cuts = tertiles(attributes(d.images[:300]))
    lv = levels(attributes(np.concatenate([stroke, wide])), cuts)
    assert LEVELS["slant"][lv["slant"][0]] == "leaning right" and LEVELS["width"][lv["width"][1]] == "wide"
    assert LEVELS["ink"][lv["ink"][1]] == "heavy"
    with pytest.raises(ValueError, match="unknown words"):
        Vocabulary.of(["a one"]).encode(["a two"])


def test_contrastive_subset_models_train_stacked_as_alone_and_record_the_clip_output(tmp_path):
    """Through a run (the pairs dataset and the two towers by import path): models stacked, whose
    padded batches must not leak into InfoNCE, equal the same models trained one at a time; the
    store records each model's CLIP output on the test pairs, against their fixed negatives."""
    settings = TrainSettings(epochs=3, lr=1e-2, batch_size=100)
    run = SubsetRun(dataset="datalens.core.captions:digit_captions", data_root="data", model="datalens.core.two_tower:two_tower",
                    model_kwargs={"dim": 8, "image_hidden": 16, "text_hidden": 16}, settings=settings, alpha=0.5, seed=0, num_models=4,
                    block_size=4, store=str(tmp_path / "clip.zarr"), task="contrastive", stack_size=4)
    ds, task = run.dataset_(), run.make_task()
    x_tr, y_tr, x_te, y_te = ds.tensors()
    masks, seeds = subset_masks(run.seed, run.mask_indices(0, 4), ds.n_train, run.alpha), run.model_seeds(0, 4)
    assert len({int(m.sum()) for m in masks}) > 1  # unequal subsets: the stacked batches are padded
    paths = [train_models(task, init_models(run.build_model, seeds), x_tr, y_tr, masks, seeds, settings, batched=b, stack_size=4)
             for b in (True, False)]
    stacked, alone = (p.outputs(task, x_te, y_te) for p in paths)
    torch.testing.assert_close(task.output(stacked, y_te), task.output(alone, y_te), rtol=1e-3, atol=2e-3)
    assert (task.output(alone[0], y_te) - task.output(alone[1], y_te)).abs().max() > 0.05
    recorded = train_subset_models(run, progress=False).read("test_outputs", np.arange(4))
    np.testing.assert_allclose(recorded, task.output(stacked, y_te).numpy(), rtol=1e-3, atol=2e-3)


def test_a_large_batch_embeds_the_pool_once_and_gives_the_outputs_of_embedding_each_negative():
    model, task, x, y, pool_x, pool_tok, neg = _setup(batch=5, pool=7, negatives=3)  # 15 negatives > a pool of 7
    with torch.no_grad():
        pooled = task.forward(model, x, y)
        each = torch.cat([task.forward(model, x[i:i + 1], y[i:i + 1]) for i in range(len(x))])  # 3 < 7: one by one
        direct = model(pool_x[neg.reshape(-1)], pool_tok[neg.reshape(-1)]).reshape(5, 3, 2, -1)
    torch.testing.assert_close(pooled, each, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled[:, 1:], direct, rtol=1e-5, atol=1e-6)


def test_embedding_similarity_is_the_mean_of_the_image_and_text_cosines():
    from datalens.attribution.baselines import embedding_similarity
    model, task, x, y, *_ = _setup(batch=6)
    scores = embedding_similarity(task, model, x[:4], y[:4], x[4:], y[4:])
    with torch.no_grad():
        img, txt = model(x, y[:, :6])[:, 0].numpy(), model(x, y[:, :6])[:, 1].numpy()
    for i in range(4):
        for j in range(2):
            cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
            assert scores[i, j] == pytest.approx(0.5 * (cos(img[i], img[4 + j]) + cos(txt[i], txt[4 + j])), abs=1e-6)
