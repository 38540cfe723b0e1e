"""The language-model pieces (issue 20) against independent computations: the transformer's masks,
its per-example gradients against a loop of autograd, stacked training against training alone,
the task's margin, Q and loss against direct formulas, retrieval against brute force, BM25 against
the Okapi formula, and embedding similarity against cosines by hand."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datalens.attribution import baselines
from datalens.core.facts import fact_corpus, fact_proponents, fact_tracing
from datalens.core.transformer import transformer
from datalens.evaluation.metrics import retrieval
from datalens.tasks.classification import ClassificationTask
from datalens.tasks.gradients import per_example_gradients
from datalens.tasks.language import LanguageModelTask
from datalens.training.engine import TrainSettings, init_models, train_models


@pytest.fixture(scope="module")
def data():
    return fact_tracing()


def _model(ds, seed=0, **kw):
    torch.manual_seed(seed)
    return transformer(ds.input_shape, ds.num_classes, dim=16, **kw).double().eval()


def test_the_dataset_holds_the_corpus_as_next_token_and_answer_targets(data):
    corpus = fact_corpus()
    vocab = corpus.vocabulary()
    assert data.n_train == len(corpus.sentences) and data.n_test == len(corpus.queries)
    words = ("<pad>", *vocab.words)
    for i in range(0, data.n_train, 37):
        tokens = corpus.sentences[i].split()
        assert [words[t] for t in data.x_train[i] if t] == tokens
        assert [words[t] for t in data.y_train[i] if t] == tokens[1:]  # every next token, none past the end
    for j in range(0, data.n_test, 11):
        prompt = corpus.queries[j].split()
        scored = np.flatnonzero(data.y_test[j])
        assert [words[t] for t in data.x_test[j] if t] == prompt
        assert scored.tolist() == [len(prompt) - 1] and words[data.y_test[j, scored[0]]] == corpus.answers[j]
    assert fact_tracing.proponents("data") == fact_proponents() == corpus.proponents


def test_a_position_sees_only_itself_and_earlier_real_tokens(data):
    model = _model(data)
    x = torch.as_tensor(data.x_train[:8])
    base = model(x)
    later = x.clone()
    later[:, 4:] = torch.where(later[:, 4:] > 0, (later[:, 4:] % 50) + 1, later[:, 4:])  # change tokens from position 4 on
    assert torch.allclose(model(later)[:, :4], base[:, :4], atol=1e-12) and not torch.allclose(model(later), base)
    padded = torch.cat([x, torch.zeros(len(x), 5, dtype=torch.long)], 1)  # more padding changes no real position's output
    for kind in (dict(), dict(causal=False, pool="mean")):
        torch.manual_seed(1)
        wide = transformer((12,), data.num_classes, dim=16, **kind).double().eval()
        real = (x > 0).unsqueeze(-1) if not kind else torch.ones(len(x), 1, dtype=torch.bool)
        short, long = wide(x), wide(padded)[:, :7] if not kind else wide(padded)
        assert torch.allclose(torch.where(real, short, 0.0), torch.where(real, long, 0.0), atol=1e-12), kind


@pytest.mark.parametrize("kind", [dict(), dict(causal=False, pool="mean", layers=2)])
def test_per_example_gradients_of_the_transformer_equal_a_loop_of_autograd(data, kind):
    model = _model(data, **kind)
    x = torch.as_tensor(data.x_train[:9])
    if kind:  # a two-class classifier on the same token sequences
        model = transformer(data.input_shape, 2, vocab_size=data.num_classes, dim=16, **kind).double().eval()
        y = torch.as_tensor(np.arange(9) % 2)
        task = ClassificationTask()
    else:
        y, task = torch.as_tensor(data.y_train[:9]), LanguageModelTask()
    got = per_example_gradients(model, x, y, task, chunk=4, dtype=torch.float64)
    for i in range(len(x)):
        f = task.output(model(x[i:i + 1]), y[i:i + 1])[0]
        want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, list(model.parameters()), allow_unused=False)])
        assert torch.allclose(got[i], want, atol=1e-12), i


def test_the_task_matches_the_margin_q_and_loss_by_hand(data):
    task, model = LanguageModelTask(), _model(data).requires_grad_(False)
    for x, y in ((data.x_test[:6], data.y_test[:6]), (data.x_train[:6], data.y_train[:6])):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        logits = model(x)
        for i in range(len(x)):
            scored = [t for t in range(x.shape[1]) if y[i, t] > 0]
            margins, probs, ce = [], [], []
            for t in scored:
                row, c = logits[i, t], int(y[i, t])
                others = torch.cat([row[:c], row[c + 1:]])
                margins.append(row[c] - torch.logsumexp(others, 0))
                probs.append(torch.softmax(row, 0)[c])
                ce.append(F.cross_entropy(row[None], y[i, t][None]))
            assert task.output(logits, y)[i] == pytest.approx(float(torch.stack(margins).mean()), abs=1e-12)
            assert task.out_to_loss(logits, y)[i] == pytest.approx(1 - float(torch.stack(probs).mean()), abs=1e-12)
            assert task.loss(logits, y)[i] == pytest.approx(float(torch.stack(ce).mean()), abs=1e-6)
            assert task.recalled(logits, y)[i] == float(all(int(logits[i, t].argmax()) == int(y[i, t]) for t in scored))
    # for one scored position the margin is log(p / (1 - p)), so dLoss/df = -Q there exactly
    p = task.answer_probability(model(torch.as_tensor(data.x_test[:6])), torch.as_tensor(data.y_test[:6]))
    f = task.output(model(torch.as_tensor(data.x_test[:6])), torch.as_tensor(data.y_test[:6]))
    assert torch.allclose(f, torch.log(p / (1 - p)), atol=1e-10)


def test_stacked_transformers_train_as_each_alone(data):
    task = LanguageModelTask()
    x, y = (torch.as_tensor(a) for a in (data.x_train, data.y_train))
    settings = TrainSettings(epochs=2, lr=0.01, optimizer="adam", momentum=0.9, weight_decay=0.0, batch_size=32,
                             label_smoothing=0.0, schedule="constant", peak_epoch=1, augment=False, precision="float32")
    masks = np.random.default_rng(0).random((3, data.n_train)) < 0.5
    build = lambda: transformer(data.input_shape, data.num_classes, dim=16)  # noqa: E731
    stacked = train_models(task, init_models(build, [1, 2, 3]), x, y, masks, [1, 2, 3], settings, batched=True, stack_size=3)
    alone = train_models(task, init_models(build, [1, 2, 3]), x, y, masks, [1, 2, 3], settings, batched=False)
    out_s, out_a = stacked.outputs(task, x, y), alone.outputs(task, x, y)
    assert torch.allclose(out_s, out_a, atol=2e-4) and not torch.allclose(out_s[0], out_s[1], atol=1e-2)


def test_retrieval_matches_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(40, 7)).astype(float)  # many ties
    relevant = [tuple(rng.choice(40, rng.integers(1, 4), replace=False).tolist()) for _ in range(7)]
    rr, rec = [], []
    for j in range(7):
        order = sorted(range(40), key=lambda i: (-scores[i, j], i))  # ties to the lower index
        rank = {i: r + 1 for r, i in enumerate(order)}
        rr.append(1 / min(rank[i] for i in relevant[j]))
        rec.append(sum(rank[i] <= 10 for i in relevant[j]) / len(relevant[j]))
    got = retrieval(scores, relevant, k=10)
    assert got["mrr"] == pytest.approx(np.mean(rr)) and got["recall_at_10"] == pytest.approx(np.mean(rec))


def test_bm25_is_the_okapi_formula():
    docs = ["a b c", "a d e f", "g h a", "b i j k l", "m n o", "p q b"]
    queries = ["a b", "d q z"]
    tokens = [d.split() for d in docs]
    n, avg = len(docs), np.mean([len(t) for t in tokens])
    k1, b = 1.5, 0.75
    want = np.zeros((n, len(queries)))
    for j, q in enumerate(queries):
        for word in q.split():
            df = sum(word in t for t in tokens)
            if df == 0:
                continue
            idf = math.log((n - df + 0.5) / (df + 0.5))  # positive: no word here is in half the documents
            for i, t in enumerate(tokens):
                tf = t.count(word)
                want[i, j] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avg))
    assert np.allclose(baselines.bm25(docs, queries), want)


def test_embedding_similarity_of_a_language_model_is_the_cosine_of_its_pooled_states(data):
    model, task = _model(data), LanguageModelTask()
    x, y, xt, yt = (torch.as_tensor(a) for a in (data.x_train[:20], data.y_train[:20], data.x_test[:5], data.y_test[:5]))
    got = baselines.embedding_similarity(task, model, x, y, xt, yt, chunk=7)

    def pooled(tokens):
        rows = []
        for seq in tokens:
            h = model.hidden(seq[None])[0]
            rows.append(h[seq > 0].mean(0))
        return torch.stack(rows)

    a, b = pooled(x), pooled(xt)
    want = (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None])
    assert np.allclose(got, want.detach().numpy(), atol=1e-10)
