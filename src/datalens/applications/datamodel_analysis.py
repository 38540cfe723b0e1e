"""What stage fit_datamodels reports about datamodels: their quality on held-out models as the
number of training models grows, train-test leakage (the largest weights pair near-duplicates),
and the datamodel embedding (PCA of the targets' weight vectors). Figures are drawn by the
notebook from these results."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA

from datalens.attribution.datamodels import Datamodels, fit_from_store, save_fit, timed_fits
from datalens.core.config import ParamError
from datalens.core.data import Dataset
from datalens.evaluation.metrics import evaluate_heldout
from datalens.tasks.classification import correct_class_margins


def fit_and_grow(train_store, held_out: tuple[np.ndarray, np.ndarray, np.ndarray], solver: dict, val_fraction: float,
                 seed: int, model_counts: list[int], fits_dir) -> tuple[Datamodels, dict]:
    """Datamodels on every completed model of ``train_store`` and refits on the first
    ``model_counts`` (those below the total), each scored on ``held_out`` = (masks (m, n),
    outputs averaged over repeats (m, t), outputs of one repeat (m, t)).

    Every fit goes to ``fits_dir`` with its wall seconds as soon as it is made (stage 05 charges
    them instead of refitting), so at most two are held at once (at paper scale each is 8 GB).
    Returns the full fit and its result (held-out scores, sparsity, unconverged solves and
    ``growth``: the scores per model count, the full fit's last)."""
    num_models = int(train_store.completed().sum())
    refits = sorted(n for n in model_counts if n < num_models)
    growth, dm, result = {}, None, {}
    for n, fit, diag, seconds in timed_fits(train_store, [num_models, *refits], val_fraction, seed, solver, progress=True):
        save_fit(fits_dir, n, fit, seconds)
        if n == num_models:
            dm = fit
            result = {"num_models": num_models, **evaluate_heldout(dm.weight, dm.bias, *held_out),
                      "mean_nonzero_weights": float((dm.weight != 0).sum(0).mean()), "unconverged_solves": int(diag["unconverged_solves"])}
        else:
            growth[n] = evaluate_heldout(fit.weight, fit.bias, *held_out)
        del fit
    growth[num_models] = {k: result[k] for k in growth[min(growth)]} if growth else {}
    result["growth"] = {str(k): v for k, v in growth.items()}
    return dm, result


def correct_class_datamodels(train_store, y_test: np.ndarray, solver: dict, val_fraction: float, seed: int) -> Datamodels:
    """Datamodels of the correct-class margin ``logit_y - max_{j != y} logit_j`` of every test
    example (n_train, t), fit like the margin's on the store's test logits: brittleness counts a
    prediction as flipped when this margin falls below 0, i.e. when the argmax changes."""
    if "test_logits" not in train_store.group:
        raise ParamError("the correct-class datamodels need the class logits of every subset model: set "
                         "train.record_logits: true (the train store was made without them)")
    y = torch.as_tensor(np.asarray(y_test))

    def measure(logits: np.ndarray) -> np.ndarray:
        return correct_class_margins(torch.as_tensor(logits, dtype=torch.float32), y).double().numpy()

    dm, _ = fit_from_store(train_store, val_fraction=val_fraction, seed=seed, target="test_logits", measure=measure,
                           progress=False, **solver)
    return dm


def leakage(weight: np.ndarray, ds: Dataset, pairs: int = 8) -> tuple[list[tuple[int, int]], dict]:
    """The (train, test) pairs with the largest weights (n, t), and how close they are: the top
    pair's weight and mean pixel distance beside the median, over test images, of the distance
    to the nearest training image of the same class."""
    top = [tuple(int(v) for v in np.unravel_index(i, weight.shape)) for i in np.argsort(-weight, axis=None)[:pairs]]
    i, t = top[0]
    nearest = [np.abs(ds.images_test[x] - ds.images_train[ds.y_train == ds.y_test[x]]).mean(axis=(1, 2)).min() for x in range(ds.n_test)]
    return top, {"top_pair_weight": float(weight[i, t]),
                 "top_pair_pixel_distance": float(np.abs(ds.images_test[t] - ds.images_train[i]).mean()),
                 "median_pixel_distance_same_class": float(np.median(nearest))}


def embedding(weight: np.ndarray, components: int = 2) -> tuple[np.ndarray, list[float]]:
    """Datamodel embeddings: each target's weight vector (a column of ``weight`` (n, t)) projected
    on the top principal components, (t, components), and their explained variance ratios."""
    pca = PCA(n_components=components, random_state=0).fit(weight.T)
    return pca.transform(weight.T), pca.explained_variance_ratio_.tolist()
