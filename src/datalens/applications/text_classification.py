"""Stage text_classification: the TRAK paper's text-classification case (BERT fine-tuned on QNLI)
in miniature.

The ``text_classification`` section of the params is a run of its own, like ``clip``
(:data:`datalens.core.config.SECTIONS`). Its subset models are small transformer encoders
(:mod:`datalens.core.transformer`, mean-pooled, no causal mask) trained from scratch on random
subsets of question-sentence pairs (:func:`datalens.core.facts.question_pairs`: does this sentence
answer this question?); every model records each test pair's classification margin
(:class:`datalens.tasks.classification.ClassificationTask`): the LDS ground truth. The methods are
the comparison's (:func:`datalens.applications.comparison.run_section_methods`), EK-FAC included
(kronfluence factors the encoder's linear layers; the embedding table is not factored). On top of
the LDS, one question the corpus can answer: do a method's top training pairs ask about the test
pair's own subject (:func:`same_subject_rate`)?
"""
from __future__ import annotations

import numpy as np

from datalens.core.data import resolve_callable
from datalens.training.runs import SubsetRun


def kept_settings(cp: dict) -> dict[str, tuple]:
    """The comparison keys (method, models used, proj_dim) of the scores the figures and
    :func:`same_subject_rate` read: TRAK at its most models and largest k, EK-FAC and embedding
    similarity at their most checkpoints."""
    tp, ensemble = cp["trak"], max(cp["attribution"]["ensemble_sizes"])
    kept = {"trak": ("trak", max(tp["num_models"]), max(tp["proj_dims"])), "embedding_similarity": ("embedding_similarity", ensemble, None)}
    if cp["attribution"].get("ekfac_dampings"):
        kept["ekfac_influence"] = ("ekfac_influence", ensemble, None)
    return kept


def _dataset_attribute(run: SubsetRun, name: str):
    return getattr(resolve_callable(run.dataset, "data.dataset", run.repo), name, None)


def pair_texts(run: SubsetRun, cols: slice | np.ndarray = slice(None)) -> tuple[list[str], list[str]] | None:
    """The training pairs and the test pairs ``cols`` as text, from the dataset function's
    ``texts(root)`` (:func:`datalens.core.facts.question_pair_texts`); None when it has none."""
    texts = _dataset_attribute(run, "texts")
    if texts is None:
        return None
    train, test = texts(run.data_root)
    return list(train), [test[j] for j in np.arange(len(test))[cols]]


def pair_facts(run: SubsetRun, cols: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray] | None:
    """The fact each training pair (n,) and each test pair of ``cols`` (t,) asks about, from the
    dataset function's ``facts(root)``; None when it has none (a user's QNLI data)."""
    facts = _dataset_attribute(run, "facts")
    if facts is None:
        return None
    train, test = facts(run.data_root)
    return np.asarray(train), np.asarray(test)[cols]


def same_subject_rate(scores: np.ndarray, train_facts: np.ndarray, test_facts: np.ndarray, k: int) -> dict[str, float]:
    """Of each test pair's top-``k`` training pairs by ``scores`` (n, t) (ties to the lower index),
    the fraction that ask about the test pair's fact, averaged over test pairs (``top_k``), beside
    the same fraction over all training pairs (``chance``): how much a method leans on pairs about
    the same subject."""
    top = np.argsort(-scores, axis=0, kind="stable")[:k]  # (k, t)
    same = train_facts[:, None] == test_facts[None, :]  # (n, t)
    return {"top_k": float(np.take_along_axis(same, top, 0).mean()), "chance": float(same.mean())}
