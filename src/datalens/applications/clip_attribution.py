"""Stage clip: the TRAK paper's contrastive (CLIP) case on the digits with captions.

The ``clip`` section of the params is a run of its own (``clip.data``, ``clip.model``,
``clip.train``, ``clip.evaluation``, ...; the device and executor are shared), checked key by key
as its top-level counterpart (:data:`datalens.core.config.SECTIONS`). Its subset models are
two-tower models (:mod:`datalens.core.two_tower`) trained by InfoNCE, and every model records the
CLIP output of each test pair against that pair's fixed negatives
(:class:`datalens.tasks.contrastive.ContrastiveTask`): the LDS ground truth. The methods are
scored by :mod:`datalens.applications.comparison` under stage 05's accounting; the counterfactual
(:func:`datalens.applications.counterfactuals.removal_effects`) measures the pair's cosine
similarity after removing each method's top examples.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from datalens.training.runs import SubsetRun, train_on_masks


def cosine_retrain(run: SubsetRun, repeats: int, cols: slice | np.ndarray = slice(None)):
    """``retrain(masks (m, n)) -> (repeats, m, t)``: the cosine similarity of the test pairs ``cols``
    (the comparison's targets) under models trained on each mask, repeat r with one seed for
    every mask."""
    task = run.make_task()
    return lambda masks: train_on_masks(run, masks, repeats, measure=lambda raw, y: task.cosine(raw), average=False)[..., cols]


def captioner(run: SubsetRun) -> Callable[[np.ndarray], str]:
    """``caption(targets (L + K,)) -> str``: a pair's caption from its token ids (the pairs dataset's
    class names are its vocabulary, id 0 the pad; the K negatives' indices are not words)."""
    ds, length = run.dataset_(), run.make_task().length
    return lambda targets: " ".join(ds.class_names[i] for i in np.asarray(targets)[:length] if i > 0)
