"""Stage fact_tracing: the TRAK paper's fact-tracing case (mT5 on FTRACE-TREx) in miniature.

The ``fact_tracing`` section of the params is a run of its own, like ``clip``
(:data:`datalens.core.config.SECTIONS`). Its subset models are small causal transformers
(:mod:`datalens.core.transformer`) trained on random subsets of the fact corpus's sentences
(:func:`datalens.core.facts.fact_tracing`); every model records each query's answer margin
(:class:`datalens.tasks.language.LanguageModelTask`): the LDS ground truth. The methods are the
comparison's (:func:`datalens.applications.comparison.run_section_methods`) plus BM25. Two
questions on top of the LDS:

* *retrieval*: does a method rank the sentences that state a query's fact (its ground-truth
  proponents) first? MRR and recall at 10 (:func:`datalens.evaluation.metrics.retrieval`);
* *counterfactual*: for queries the full-data models recall, does removing a method's top-k
  sentences and retraining make the models forget the fact: the drop in the answer's
  probability and in the fraction of models whose argmax is still the answer.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from datalens.applications import comparison, counterfactuals
from datalens.attribution import baselines
from datalens.core.data import resolve_callable
from datalens.evaluation.metrics import retrieval
from datalens.training.runs import SubsetRun, train_on_masks

MEASURES = ("answer_probability", "recall")  # what the counterfactual measures, in the order retrain returns them


def texts(run: SubsetRun, cols: slice | np.ndarray = slice(None)) -> tuple[list[str], list[str]]:
    """The training sentences and the queries ``cols`` with their answers, as words (the dataset's
    class names are its vocabulary, id 0 the pad): what BM25 and the figures read."""
    ds = run.dataset_()
    words = np.asarray(ds.class_names)

    def decode(tokens: np.ndarray) -> str:
        return " ".join(words[tokens[tokens > 0]])

    def query(x: np.ndarray, y: np.ndarray) -> str:  # the prompt up to the position that predicts the answer, then the answer
        return f"{decode(x[:np.flatnonzero(y)[0] + 1])} {decode(y)}"

    return [decode(x) for x in ds.x_train], [query(x, y) for x, y in zip(ds.x_test[cols], ds.y_test[cols])]


def proponents(run: SubsetRun, cols: slice | np.ndarray = slice(None)) -> list[tuple[int, ...]]:
    """Per query of ``cols``, the training sentences that state its fact: the ``proponents(root)``
    that the dataset's function carries (:func:`datalens.core.facts.fact_proponents`)."""
    dataset = resolve_callable(run.dataset, "data.dataset", run.repo)
    if not hasattr(dataset, "proponents"):
        raise ValueError(f"data.dataset={run.dataset!r} gives no ground-truth proponents: fact tracing needs a dataset function "
                         "with a `proponents(root)` attribute (see datalens.core.facts.fact_tracing)")
    found = dataset.proponents(run.data_root)
    if len(found) != run.dataset_().n_test:
        raise ValueError(f"data.dataset={run.dataset!r}: {len(found)} proponent sets for {run.dataset_().n_test} queries")
    return [found[j] for j in np.arange(len(found))[cols]]


def kept_settings(cp: dict, num_models: int) -> dict[str, tuple]:
    """The setting of each method whose scores retrieval and the figures read, as the comparison's
    (method, models used, proj_dim) keys: every method at its most models (TRAK also at its
    largest k), empirical influence on all ``num_models``, BM25 on none."""
    tp, ensemble = cp["trak"], max(cp["attribution"]["ensemble_sizes"])
    return {"trak": ("trak", max(tp["num_models"]), max(tp["proj_dims"])), "bm25": ("bm25", 0, None),
            **{m: (m, ensemble, None) for m in ("grad_dot", "grad_cosine", "embedding_similarity")},
            "tracin": ("tracin", 1, None), "empirical_influence": ("empirical_influence", num_models, None)}


def run_bm25(cmp: comparison.Comparison, run: SubsetRun) -> None:
    """BM25 of each training sentence for each query with its answer (the TRAK paper's retrieval
    baseline), scored and charged like every method (it uses no model)."""
    t0 = time.perf_counter()
    train, queries = texts(run, cmp.ground.cols)
    scores = baselines.bm25(train, queries)
    cmp.add("bm25", 0, time.perf_counter() - t0, scores, False)


def retrieval_table(scores: dict[str, np.ndarray], relevant: list, k: int = 10) -> dict[str, dict[str, float]]:
    """{method: {"mrr", "recall_at_k"}} of each method's (n, t) scores against the ``relevant`` sets (t)."""
    return {method: retrieval(s, relevant, k) for method, s in scores.items()}


def measure_retrain(run: SubsetRun, repeats: int, cols: slice | np.ndarray = slice(None)) -> Callable[[np.ndarray], np.ndarray]:
    """``retrain(masks (m, n)) -> (repeats, m, t, 2)``: each query's answer probability and whether
    the model recalls it (argmax), for the queries ``cols``, under models trained on each mask,
    repeat r with one seed for every mask."""
    task = run.make_task()

    def measure(raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([task.answer_probability(raw, y), task.recalled(raw, y)], -1)

    return lambda masks: train_on_masks(run, masks, repeats, measure=measure, average=False)[:, :, cols]


def recalled_candidates(retrain: Callable[[np.ndarray], np.ndarray], n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """The score columns the full-data models recall (the recalled fraction over repeats at least
    a half) and each column's full-data (answer probability, recall) over repeats, (t, 2)."""
    full = retrain(np.ones((1, n_train), bool))[:, 0].mean(0)
    return np.flatnonzero(full[:, 1] >= 0.5), full


def counterfactual_summary(effects: dict, ks: list[int]) -> dict[str, dict[str, list[dict]]]:
    """{measure: {method: per-k drops}} (:func:`~datalens.applications.counterfactuals.removal_summary`)
    for each of :data:`MEASURES`, from :func:`~datalens.applications.counterfactuals.removal_effects`
    on :func:`measure_retrain`'s outputs (their changes are (R, rows, 2))."""
    return {m: counterfactuals.removal_summary({**effects, "change": effects["change"][..., q]}, ks) for q, m in enumerate(MEASURES)}


def counterfactual(cmp: comparison.Comparison, run: SubsetRun, rankings: dict[str, np.ndarray], cf: dict) -> dict:
    """The counterfactual of the module docstring, on a seeded sample of ``cf["num_targets"]`` of
    the score columns the full-data models recall (all of those and the columns with the most
    probable answers when fewer are recalled): remove each method's (``rankings`` {method:
    (n, t)}) top-k sentences for each ``cf["ks"]``, or k at random, retrain ``cf["num_retrains"]``
    seeds and measure. Returns the summary per measure, the sampled columns and their full-data
    measures, and the full-data recall over every column."""
    retrain = measure_retrain(run, cf["num_retrains"], cmp.ground.cols)
    recalled, full = recalled_candidates(retrain, run.dataset_().n_train)
    if len(recalled) >= cf["num_targets"]:
        shown = recalled[comparison.seeded_sample(len(recalled), cf["num_targets"], cf["seed"], 29)]
    else:  # too few recalled (a small or undertrained model): the others with the most probable answers fill the sample
        others = np.setdiff1d(np.arange(len(full)), recalled)
        shown = np.sort(np.concatenate([recalled, others[np.argsort(-full[others, 0], kind="stable")[:cf["num_targets"] - len(recalled)]]]))
    effects = counterfactuals.removal_effects(rankings, shown, cf["ks"], retrain, cf["seed"])
    return {"counterfactual": counterfactual_summary(effects, cf["ks"]), "counterfactual_targets": shown.tolist(),
            "counterfactual_full_data": dict(zip(MEASURES, full[shown].mean(0).tolist())), "full_data_recall": float(full[:, 1].mean())}
