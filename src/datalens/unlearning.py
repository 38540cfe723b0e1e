"""Unlearning by datamodel matching, judged by KLoM against retrained oracles.

Georgiev, Rinberg, Park, Garg, Ilyas, Madry, Neel, "Attribute-to-Delete: Machine Unlearning
via Datamodel Matching" (2024). To remove a forget set F from a model trained on S, fine-tune
it toward the outputs an *oracle* (a model retrained on S minus F) would give:

* **OM** (oracle matching) matches the mean logits of real oracles;
* **DMM** (datamodel matching) matches *predicted* oracle logits,
  ``f_c(x) - sum_{i in F} beta_{i,c}(x)``: the model's own logits minus the contribution of F
  that datamodels (one per class logit) attribute to it; no oracle is trained;
* **DM-direct** outputs those predictions themselves, without fine-tuning;
* baselines: do nothing, gradient descent on the retain set (GD), gradient ascent on F (GA),
  ascent then descent, and SCRUB.

Every method fine-tunes all N base models at once: their weights (and batch-norm buffers,
frozen in eval mode during fine-tuning) are stacked and one ``torch.func.vmap`` forward
serves the stack, as the training engine does. Every model of a stack sees the same batches,
drawn from ``seed`` and the epoch, so results do not depend on the stack size.

**KLoM** (KL divergence of margins): for each example, the margins of the N unlearned models
and of N oracles, clipped to +-100, histogrammed in 20 equal-width bins over their joint
range, empty bins floored at 1e-5 (then renormalised), and the KL divergence between the two
histograms. The published code has used both directions; ``direction`` chooses, and the
default is KL(unlearned || oracle), the first published one.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from torch import nn
from torch.func import functional_call, stack_module_state

from datalens.config import ParamError, resolve_location
from datalens.datamodels import Moments, fit_datamodels, ridge_datamodels, ridge_set_contributions, select_ridge, split_models
from datalens.engine import mlp_linear_names
from datalens.outputs import margins_from_logits
from datalens.progress import progress_bar
from datalens.runs import SubsetRun

METHODS = ("do_nothing", "gd", "ga", "ascent_descent", "scrub", "om", "dmm", "dm_direct")
FINE_TUNED = ("gd", "ga", "ascent_descent", "scrub", "om", "dmm")
SPLITS = ("forget", "retain", "validation")
DIRECTIONS = ("unlearned_oracle", "oracle_unlearned")

# Each epoch of a method is a sequence of passes: (which examples, which loss).
PASSES = {
    "gd": (("retain", "ce"),),
    "ga": (("forget", "neg_ce"),),
    "ascent_descent": (("forget", "neg_ce"), ("retain", "ce")),
    "scrub": (("retain", "ce_kl"), ("forget", "neg_kl")),  # min-steps first: the student starts equal to its
                                                           # teacher, where the max-step's gradient is zero
    "om": (("matching", "mse"),),
    "dmm": (("matching", "mse"),),
}
ADAM_METHODS = ("om", "dmm")  # the paper's matching recipe; the baselines use SGD with momentum


# -- KLoM -----------------------------------------------------------------------------------

def klom(unlearned: np.ndarray, oracle: np.ndarray, bins: int = 20, clip: float = 100.0, floor: float = 1e-5,
         direction: str = "unlearned_oracle") -> np.ndarray:
    """KL divergence of margins, per example.

    unlearned: (N, n) margins of N unlearned models; oracle: (N', n) margins of N' oracles.
    Returns (n,): KL(unlearned || oracle) with ``direction='unlearned_oracle'`` (the default),
    KL(oracle || unlearned) with ``'oracle_unlearned'``. Zero when both samples fall in the
    same bins in the same proportions; at most about ln(1 / floor)."""
    if direction not in DIRECTIONS:
        raise ParamError(f"unlearning.klom.direction={direction!r} is not allowed; allowed values: {', '.join(DIRECTIONS)}")
    a = np.clip(np.asarray(unlearned, np.float64), -clip, clip)
    b = np.clip(np.asarray(oracle, np.float64), -clip, clip)
    lo = np.minimum(a.min(0), b.min(0))
    width = (np.maximum(a.max(0), b.max(0)) - lo) / bins
    width[width == 0] = 1.0  # all margins equal: one bin holds everything, KL is 0

    def hist(v: np.ndarray) -> np.ndarray:
        idx = np.clip(np.floor((v - lo) / width).astype(np.int64), 0, bins - 1)  # the top edge joins the last bin
        counts = np.zeros((v.shape[1], bins))
        np.add.at(counts, (np.broadcast_to(np.arange(v.shape[1]), v.shape), idx), 1.0)
        p = counts / len(v)
        p[p == 0] = floor
        return p / p.sum(1, keepdims=True)

    p, q = hist(a), hist(b)
    if direction == "oracle_unlearned":
        p, q = q, p
    return (p * np.log(p / q)).sum(1)


def klom_summary(values: np.ndarray, split_indices: dict[str, np.ndarray]) -> dict:
    """95th and 99th percentile and mean of per-example KLoM ``values`` for each split."""
    out = {}
    for split, idx in split_indices.items():
        v = values[idx]
        out[split] = {"p95": float(np.percentile(v, 95)), "p99": float(np.percentile(v, 99)), "mean": float(v.mean())}
    return out


def split_indices(n_train: int, n_test: int, forget: np.ndarray) -> dict[str, np.ndarray]:
    """Indices into the concatenation (train, test) of the forget, retain and validation examples."""
    retain = np.setdiff1d(np.arange(n_train), forget)
    return {"forget": np.asarray(forget), "retain": retain, "validation": n_train + np.arange(n_test)}


# -- forget sets ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ForgetSet:
    """A named forget set: training indices (sorted); ``select`` sets are used only to choose
    hyperparameters, never reported."""

    name: str
    kind: str
    indices: tuple[int, ...]
    select: bool = False

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.indices, dtype=np.int64)


def datamodel_components(weights: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Scores (n_targets, count) of each row of a datamodel matrix ``weights`` (n_targets,
    n_train) on its first ``count`` principal components (sklearn PCA), each component's sign
    fixed so that its largest-magnitude score is positive."""
    scores = PCA(n_components=count, random_state=seed).fit_transform(weights)
    flip = np.sign(scores[np.abs(scores).argmax(0), np.arange(count)])
    return scores * flip


def make_forget_sets(specs: Sequence[dict], n_train: int, seed: int, component_scores: np.ndarray | None = None) -> list[ForgetSet]:
    """Forget sets from ``unlearning.forget_sets`` entries:
    ``{name, kind: random, size}``: a uniform sample, seeded by (seed, position);
    ``{name, kind: component, component: c, size}``: the ``size`` training examples with the
    highest score on principal component c (1-based) of the train x train datamodel matrix
    (``component_scores``, (n_train, >= c)): a coherent sub-population.
    ``select: true`` marks the sets used only to choose hyperparameters."""
    sets = []
    for position, spec in enumerate(specs):
        size = int(spec["size"])
        if not 0 < size < n_train:
            raise ParamError(f"unlearning.forget_sets[{position}].size={size} is not allowed; it must be in 1..{n_train - 1}")
        if spec["kind"] == "random":
            idx = np.random.default_rng([seed, 31, position]).choice(n_train, size, replace=False)
        elif spec["kind"] == "component":
            if component_scores is None or spec["component"] > component_scores.shape[1]:
                raise ParamError(f"unlearning.forget_sets[{position}].component={spec['component']} needs that many principal components")
            idx = np.argsort(-component_scores[:, spec["component"] - 1], kind="stable")[:size]
        else:
            raise ParamError(f"unlearning.forget_sets[{position}].kind={spec['kind']!r} is not allowed; allowed values: random, component")
        sets.append(ForgetSet(spec["name"], spec["kind"], tuple(int(i) for i in np.sort(idx)), bool(spec.get("select", False))))
    return sets


# -- the models: base models and oracles, through the training engine and its stores ----------

def base_run(p: dict) -> SubsetRun:
    """The N base models: the full training set (alpha = 1), every weight kept for fine-tuning."""
    u = p["unlearning"]
    n = int(u["num_models"])
    run = SubsetRun.from_params(p, store=f"{resolve_location(p, u['store_dir'])}/base.zarr", num_models=n,
                                num_checkpoints=n, block_size=min(int(p["train"]["block_size"]), n), stream="unlearning_base",
                                record_logits=True)
    return replace(run, alpha=1.0)


def oracle_run(p: dict, forget: ForgetSet) -> SubsetRun:
    """2N oracles retrained on S minus F: models 0..N-1 are the oracles KLoM compares against,
    N..2N-1 an independent set (the noise floor, and the targets OM matches, so that OM never
    sees the models it is judged against)."""
    u = p["unlearning"]
    n = 2 * int(u["num_models"])
    run = SubsetRun.from_params(p, store=f"{resolve_location(p, u['store_dir'])}/oracles_{forget.name}.zarr", num_models=n,
                                num_checkpoints=0, block_size=min(int(p["train"]["block_size"]), n),
                                stream="unlearning_oracle", record_logits=True)
    return replace(run, alpha=1.0, exclude=forget.indices)


# -- fine-tuning ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FineTuneSettings:
    """How every fine-tuning method runs (``unlearning.*`` params).

    ``lr_decay``: the learning rate is ``lr * lr_decay ** epoch``; ``retain_ratio``: OM and DMM
    fine-tune on F plus ``retain_ratio * |F|`` retain examples drawn once from ``seed``;
    ``temperature``: SCRUB's distillation temperature."""

    batch_size: int = 64
    momentum: float = 0.9
    lr_decay: float = 0.95
    retain_ratio: float = 3.0
    temperature: float = 4.0
    seed: int = 0
    stack_size: int = 100


def _per_model_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(M, B, C), (B,) -> (M,) mean cross-entropy of each model."""
    m, b, c = logits.shape
    return F.cross_entropy(logits.reshape(m * b, c), y.repeat(m), reduction="none").reshape(m, b).mean(1)


def _per_model_kl(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """(M,) mean KL(teacher || student) at ``temperature``, scaled by T^2 (as in distillation)."""
    log_s = F.log_softmax(logits / temperature, -1)
    log_t = F.log_softmax(teacher / temperature, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean(1) * temperature ** 2


def pass_loss(kind: str, logits, y, teacher, target, temperature: float) -> torch.Tensor:
    """The (M,) loss of one pass kind: ``ce`` (descent), ``neg_ce`` (ascent), ``neg_kl`` (SCRUB's
    max-step: away from the teacher), ``ce_kl`` (SCRUB's min-step), ``mse`` (matching logits)."""
    if kind == "ce":
        return _per_model_ce(logits, y)
    if kind == "neg_ce":
        return -_per_model_ce(logits, y)
    if kind == "neg_kl":
        return -_per_model_kl(logits, teacher, temperature)
    if kind == "ce_kl":
        return _per_model_ce(logits, y) + _per_model_kl(logits, teacher, temperature)
    if kind == "mse":
        return ((logits - target) ** 2).mean((1, 2))
    raise ValueError(f"unknown pass kind {kind!r}")


def example_sets(n_train: int, forget: np.ndarray, settings: FineTuneSettings) -> dict[str, np.ndarray]:
    """The training indices each pass draws from: forget, retain, and matching (F plus a seeded
    sample of ``retain_ratio * |F|`` retain examples, all of them when fewer remain)."""
    retain = np.setdiff1d(np.arange(n_train), forget)
    k = min(len(retain), int(round(settings.retain_ratio * len(forget))))
    sample = np.random.default_rng([settings.seed, 41]).choice(retain, k, replace=False)
    return {"forget": np.asarray(forget), "retain": retain, "matching": np.sort(np.concatenate([forget, sample]))}


def epoch_cost(method: str, sets: dict[str, np.ndarray], n_train: int) -> float:
    """Epoch-equivalents (examples processed / n_train) of one epoch of ``method``."""
    return sum(len(sets[which]) for which, _ in PASSES[method]) / n_train


def unlearn(models: Sequence[nn.Module], x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor, method: str,
            lr: float, snapshots: Sequence[int], forget: np.ndarray, settings: FineTuneSettings,
            targets: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Fine-tune copies of ``models`` with ``method`` and return their logits on ``x_eval``
    after each epoch count in ``snapshots``: {epochs: (M, n_eval, C)}. The models are not changed.

    x_train: (n, ...) and y_train: (n,) on the models' device; forget: indices into them;
    targets (OM, DMM): logits to match, (n, C) shared by every model or (M, n, C) per model.
    A stack whose loss turns non-finite (too large a learning rate for ascent) gives NaN logits
    from then on, so that point is never chosen."""
    if method not in PASSES:
        raise ParamError(f"unlearning method {method!r} is not allowed; allowed values: {', '.join(PASSES)}")
    if method in ("om", "dmm") and targets is None:
        raise ValueError(f"{method} needs targets to match")
    sets = example_sets(len(y_train), forget, settings)
    snapshots = sorted(set(int(e) for e in snapshots))
    out: dict[int, list[torch.Tensor]] = {e: [] for e in snapshots}
    for a in range(0, len(models), settings.stack_size):
        rows = slice(a, a + settings.stack_size)
        stack_targets = targets[rows] if targets is not None and targets.dim() == 3 else targets
        for b, logits in _unlearn_stack(list(models[rows]), x_train, y_train, x_eval, method, lr, snapshots, sets,
                                        settings, stack_targets).items():
            out[b].append(logits)
    return {b: torch.cat(v) for b, v in out.items()}


def stacked_forward(model: nn.Module, buffers: dict[str, torch.Tensor]):
    """f(params, x) -> logits (M, B, C) of M stacked copies of ``model`` on one batch x (B, ...).

    Plain MLPs (Flatten, Linear, ReLU) take a hand-laid path of broadcast matrix products, about
    twice as fast on CPU as ``torch.vmap`` over ``functional_call``, which serves every other
    model (batch norm in eval mode: its statistics stay frozen)."""
    names = mlp_linear_names(model)
    if names is not None:
        def mlp(p, x):
            h = x.reshape(len(x), -1)
            for k, name in enumerate(names):
                h = torch.matmul(h, p[f"{name}.weight"].transpose(1, 2)) + p[f"{name}.bias"].unsqueeze(1)
                if k < len(names) - 1:
                    h = torch.relu(h)
            return h
        return mlp
    base = copy.deepcopy(model).to("meta").eval()
    return lambda p, x: torch.vmap(lambda pp, bb: functional_call(base, (pp, bb), (x,)), in_dims=(0, 0))(p, buffers)


def _unlearn_stack(models, x_train, y_train, x_eval, method, lr, snapshots, sets, settings, targets) -> dict[int, torch.Tensor]:
    params, buffers = stack_module_state([copy.deepcopy(m).eval() for m in models])
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    forward = stacked_forward(models[0], buffers)

    def evaluate(p) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([forward(p, x_eval[i:i + 4096]) for i in range(0, len(x_eval), 4096)], dim=1)

    teacher = evaluate(params)[:, :len(x_train)] if method == "scrub" else None  # x_eval starts with x_train
    opt = (torch.optim.Adam(params.values(), lr=lr) if method in ADAM_METHODS
           else torch.optim.SGD(params.values(), lr=lr, momentum=settings.momentum))
    result, failed = {}, False
    for epoch in range(snapshots[-1]):
        for group in opt.param_groups:
            group["lr"] = lr * settings.lr_decay ** epoch
        for k, (which, kind) in enumerate(PASSES[method]):
            order = np.random.default_rng([settings.seed, epoch, k]).permutation(sets[which])
            for batch in np.array_split(order, max(1, math.ceil(len(order) / settings.batch_size))):
                idx = torch.as_tensor(batch, device=x_train.device)
                logits = forward(params, x_train[idx])
                target = None
                if targets is not None:
                    target = targets[:, idx] if targets.dim() == 3 else targets[idx].unsqueeze(0)
                loss = pass_loss(kind, logits, y_train[idx], teacher[:, idx] if teacher is not None else None, target,
                                 settings.temperature)
                failed = failed or not bool(torch.isfinite(loss).all())
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
        if epoch + 1 in snapshots:
            logits = evaluate(params)
            result[epoch + 1] = torch.full_like(logits, float("nan")) if failed else logits
    return result


# -- datamodel matching targets ---------------------------------------------------------------

def predicted_logits(own_logits: torch.Tensor, contribution: np.ndarray) -> torch.Tensor:
    """DMM's targets and DM-direct's outputs: each model's own logits (M, n, C) minus the
    contribution (n * C,) that the per-class-logit datamodels attribute to the forget set
    (``datamodels.ridge_set_contributions``; columns ordered example-major, class-minor)."""
    m, n, c = own_logits.shape
    return own_logits - torch.as_tensor(contribution.reshape(n, c), dtype=own_logits.dtype, device=own_logits.device)


def margins(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Margins (M, n) float64 of logits (M, n, C) for labels (n,)."""
    return margins_from_logits(logits.float(), y).double().cpu().numpy()


def accuracies(logits: torch.Tensor, y: torch.Tensor, splits: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean accuracy over models on each split."""
    correct = (logits.argmax(-1) == y).float().cpu().numpy()
    return {s: float(correct[:, idx].mean()) for s, idx in splits.items()}


# -- choosing hyperparameters on the selection sets only ---------------------------------------

def choose_per_budget(scores: dict[tuple[float, float], float]) -> dict[float, float]:
    """For each budget, the learning rate with the lowest score: scores[(lr, budget)] is the
    select sets' mean :func:`selection_score` (NaN for a diverged run, never chosen)."""
    chosen = {}
    for budget in sorted({b for _, b in scores}):
        candidates = {lr: s for (lr, b), s in scores.items() if b == budget and np.isfinite(s)}
        if candidates:
            chosen[budget] = min(candidates, key=lambda lr: (candidates[lr], lr))
    return chosen


def best_setting(scores: dict[tuple[float, float], float]) -> tuple[float, float] | None:
    """The (lr, budget) with the lowest selection score; ties go to the smaller budget."""
    finite = {k: s for k, s in scores.items() if np.isfinite(s)}
    return min(finite, key=lambda k: (finite[k], k[1], k[0])) if finite else None


# -- the comparison, as the stage runs it ------------------------------------------------------

class StoreLogits:
    """The logits of a store's models as a (N, (n_train + n_test) * C) array that reads by rows,
    so a store too large for memory streams through :func:`~datalens.datamodels.ridge_set_contributions`."""

    def __init__(self, store):
        self.store = store
        n, c = store.group["train_logits"].shape[1:]
        self.shape = (store.num_models, (n + store.group["test_logits"].shape[1]) * c)

    def __getitem__(self, rows) -> np.ndarray:
        out = load_outputs(self.store, rows)
        return out.reshape(len(out), -1)

    def columns(self, cols: np.ndarray, block: int = 1000) -> np.ndarray:
        """(N, len(cols)) float32: a few columns of every model, read ``block`` models at a time."""
        return np.concatenate([self[a:a + block][:, cols] for a in range(0, self.shape[0], block)]).astype(np.float32)


def load_outputs(store, rows: np.ndarray | slice, logits: bool = True) -> np.ndarray:
    """(N, n_train + n_test, C) float16 logits, or with ``logits=False`` (N, n_train + n_test)
    float32 margins, of the store's models ``rows``: train examples first, then test."""
    if logits:
        return np.concatenate([store.read("train_logits", rows), store.read("test_logits", rows)], axis=1)
    return np.concatenate([store.read("train_margins", rows), store.read("test_margins", rows)], axis=1)


@dataclass
class Attribution:
    """What the datamodels of the base run give unlearning (all fit on its subset models).

    component_scores: (n_train, k) scores of the train x train margin datamodels on their first
    principal components (coherent forget sets); contributions: (S, n_all * C) the ridge
    datamodels' attributed contribution of each forget set to every class logit;
    ridge choices with their validation MSE; seconds of fitting."""

    forget_sets: list[ForgetSet]
    component_scores: np.ndarray
    contributions: np.ndarray
    margin_ridge: float
    logit_ridge: float
    margin_val_mse: list[float]
    logit_val_mse: list[float]
    seconds: float


def attribute(main_store, u: dict, n_train: int, num_classes: int, device: str = "cpu") -> Attribution:
    """Fit what unlearning needs from the base run's store (masks, train margins, logits):
    ridge datamodels of train margins for the principal components that make coherent forget
    sets, then the forget sets, then each set's contribution to every logit."""
    t0 = time.perf_counter()
    masks = main_store.read("masks")
    train_margins = main_store.read("train_margins")
    ridges = [float(r) for r in u["ridge_grid"]]
    margin_ridge, margin_mse = select_ridge(masks, train_margins, ridges, u["val_fraction"], u["seed"], device)
    weights = ridge_datamodels(masks, train_margins, margin_ridge, device).weight.T  # (targets, train examples)
    components = max([s.get("component", 1) for s in u["forget_sets"]])
    scores = datamodel_components(weights, components, u["seed"])
    sets = make_forget_sets(u["forget_sets"], n_train, u["seed"], scores)
    logits = StoreLogits(main_store)  # (N, n_all * C), read by blocks of models
    # the ridge for the logits is chosen on a seeded sample of columns: one solve per ridge on all
    # of them would cost (n_all * C) / sample times as much and choose the same pooled optimum
    cols = np.sort(np.random.default_rng([u["seed"], 53]).choice(logits.shape[1], min(2000, logits.shape[1]), replace=False))
    logit_ridge, logit_mse = select_ridge(masks, logits.columns(cols), ridges, u["val_fraction"], u["seed"], device)
    contributions = ridge_set_contributions(main_store.group["masks"], logits, indicators(sets, n_train), logit_ridge, device)
    return Attribution(sets, scores, contributions, margin_ridge, logit_ridge, margin_mse.tolist(), logit_mse.tolist(),
                       time.perf_counter() - t0)


def lasso_check(main_store, attribution: Attribution, problems: Sequence["Problem"], own_logits: torch.Tensor,
                oracle_logits: dict[str, np.ndarray], num_targets: int, dm: dict, num_classes: int, seed: int) -> dict:
    """Ridge against the lasso path (``datamodels.*`` settings) on how well each predicts the
    oracles' change of logits, on up to ``num_targets`` logit columns of the select sets' forget
    examples: correlation and MSE of predicted against actual mean change, and each fit's
    seconds per target (the lasso's, extrapolated to every column, is what rules it out)."""
    masks = main_store.read("masks")
    logits = StoreLogits(main_store)
    predicted: dict[str, list[np.ndarray]] = {"ridge": [], "lasso": []}
    actual, seconds = [], {"ridge": 0.0, "lasso": 0.0}
    per_set = max(num_classes, num_targets // max(1, len(problems)))
    for prob in problems:
        examples = prob.forget.array[:max(1, per_set // num_classes)]
        cols = logit_columns(examples, num_classes)
        outputs = logits.columns(cols)
        t0 = time.perf_counter()
        ridge = ridge_datamodels(masks, outputs, attribution.logit_ridge)
        seconds["ridge"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        tr, va = split_models(len(masks), 0.1, seed)
        lasso, _ = fit_datamodels(Moments.from_blocks([(masks[tr], outputs[tr])]), Moments.from_blocks([(masks[va], outputs[va])]),
                                  num_lambdas=dm["num_lambdas"], eps=dm["eps"], max_iter=dm["max_iter"], tol=dm["tol"], progress=False)
        seconds["lasso"] += time.perf_counter() - t0
        for name, model in (("ridge", ridge), ("lasso", lasso)):
            predicted[name].append(-model.weight[prob.forget.array].sum(0))
        base_mean = own_logits.double().mean(0).cpu().numpy().reshape(-1)[cols]
        actual.append(oracle_logits[prob.forget.name].reshape(-1)[cols] - base_mean)
    targets = sum(len(a) for a in actual)
    out = compare_attributions({k: np.concatenate(v) for k, v in predicted.items()}, np.concatenate(actual))
    for name in out:
        out[name]["seconds_per_target"] = seconds[name] / targets
    out["targets"] = targets
    out["all_targets"] = int(logits.shape[1])
    return out


def logit_columns(examples: np.ndarray, num_classes: int) -> np.ndarray:
    """Columns of the flattened (example, class) logit matrix that belong to ``examples``."""
    return (np.asarray(examples)[:, None] * num_classes + np.arange(num_classes)).ravel()


def indicators(sets: Sequence[ForgetSet], n_train: int) -> np.ndarray:
    """(S, n_train) 0/1: which training examples each set holds."""
    out = np.zeros((len(sets), n_train))
    for i, fs in enumerate(sets):
        out[i, fs.array] = 1.0
    return out


def settings_from_params(u: dict) -> FineTuneSettings:
    return FineTuneSettings(batch_size=int(u["batch_size"]), momentum=float(u["momentum"]), lr_decay=float(u["lr_decay"]),
                            retain_ratio=float(u["retain_ratio"]), temperature=float(u["temperature"]), seed=int(u["seed"]))


@dataclass
class Problem:
    """Everything the methods are judged on for one forget set: the oracles' margins (N, n_all),
    the independent oracles' margins (N, n_all), OM's targets (n_train, C), the attributed
    contribution of F to every logit (n_all * C,), and the split indices into (train, test)."""

    forget: ForgetSet
    oracle_margins: np.ndarray
    independent_margins: np.ndarray
    om_targets: torch.Tensor
    contribution: np.ndarray
    splits: dict[str, np.ndarray]
    oracle_accuracy: dict[str, float]


def make_problem(forget: ForgetSet, oracle_store, num_models: int, om_oracles: int, contribution: np.ndarray,
                 labels: np.ndarray, device) -> Problem:
    """The problem of one forget set; labels: (n_train + n_test,) of the train then test examples."""
    n_train = oracle_store.group["train_margins"].shape[1]
    n_test = len(labels) - n_train
    out = load_outputs(oracle_store, slice(0, 2 * num_models), logits=False)
    om = load_outputs(oracle_store, np.arange(num_models, num_models + om_oracles))[:, :n_train].astype(np.float32).mean(0)
    splits = split_indices(n_train, n_test, forget.array)
    oracle_logits = torch.as_tensor(load_outputs(oracle_store, slice(0, num_models)).astype(np.float32))
    return Problem(forget, out[:num_models], out[num_models:], torch.as_tensor(om, device=device), contribution, splits,
                   accuracies(oracle_logits, torch.as_tensor(labels), splits))


def score_point(logits: torch.Tensor, y_all: torch.Tensor, oracle_margins: np.ndarray, splits: dict[str, np.ndarray],
                klom_params: dict) -> tuple[dict, np.ndarray]:
    """KLoM summary and accuracy per split of one point, and its per-example KLoM (n_all,);
    NaN throughout for a run that diverged."""
    if not torch.isfinite(logits).all():
        nan = {s: {"p95": float("nan"), "p99": float("nan"), "mean": float("nan")} for s in splits}
        return {"klom": nan, "accuracy": {s: float("nan") for s in splits}, "diverged": True}, np.full(oracle_margins.shape[1], np.nan)
    values = klom(margins(logits, y_all), oracle_margins, **klom_params)
    return {"klom": klom_summary(values, splits), "accuracy": accuracies(logits, y_all, splits), "diverged": False}, values


def evaluate_methods(models: Sequence[nn.Module], own_logits: torch.Tensor, data: dict, problems: Sequence[Problem],
                     u: dict, lrs: dict[str, Sequence[float]] | None = None, progress: bool = True) -> dict:
    """Every fine-tuning method at each of its learning rates (``lrs``, default ``u['lrs']``) and
    each compute budget of ``u['budgets']`` on each problem, plus do nothing, DM-direct and the floor.

    A budget is fine-tuning compute in epoch-equivalents (examples processed / n_train), so
    methods are compared at equal compute: each runs ``max(1, round(budget / epoch_cost))`` of its
    own epochs (OM's epoch over F and 3|F| retain examples is far cheaper than GD's over the
    whole retain set). Recorded compute is what was actually spent.

    own_logits: (M, n_all, C) the base models' logits; data: ``x_train``, ``y_train``, ``x_all``,
    ``y_all`` tensors. Returns {set name: {"floor", "do_nothing", "dm_direct": point,
    "points": [point, ...]}} where a point holds method, lr, budget, epochs, ``finetune_epochs``
    (epoch-equivalents), KLoM per split and accuracy per split; per-example KLoM and margins
    are kept under ``"_values"`` for the figures (dropped by :func:`jsonable`)."""
    settings = settings_from_params(u)
    lrs = lrs or u["lrs"]
    kp = u["klom"]
    budgets = sorted(float(b) for b in u["budgets"])
    n_train = len(data["y_train"])
    total = sum(len(v) for v in lrs.values()) * len(problems)
    bar = progress_bar(total=total, desc="unlearning runs", unit="run", disable=not progress)
    out = {}
    for prob in problems:
        y_all = data["y_all"]

        sets = example_sets(n_train, prob.forget.array, settings)

        def point(logits, method, lr, epochs, budget=0.0):
            record, values = score_point(logits, y_all, prob.oracle_margins, prob.splits, kp)
            cost = epochs * epoch_cost(method, sets, n_train) if epochs else 0.0
            record.update(method=method, lr=lr, budget=budget, epochs=epochs, finetune_epochs=cost)
            record["_values"] = {"klom": values, "margins": margins(logits, y_all)[:, prob.forget.array] if np.isfinite(values).all() else None}
            return record

        floor_values = klom(prob.independent_margins, prob.oracle_margins, **kp)
        predicted = predicted_logits(own_logits, prob.contribution)
        res = {"floor": {"klom": klom_summary(floor_values, prob.splits), "_values": {"klom": floor_values,
                                                                                    "margins": prob.oracle_margins[:, prob.forget.array]}},
               "do_nothing": point(own_logits, "do_nothing", 0.0, 0),
               "dm_direct": point(predicted, "dm_direct", 0.0, 0), "points": [], "_splits": prob.splits,
               "oracle_accuracy": prob.oracle_accuracy}
        targets = {"om": prob.om_targets, "dmm": predicted[:, :n_train]}
        for method, grid in lrs.items():
            epochs_of = {b: max(1, round(b / epoch_cost(method, sets, n_train))) for b in budgets}
            for lr in grid:
                bar.set_postfix(set=prob.forget.name, method=method, lr=lr)
                logits = unlearn(models, data["x_train"], data["y_train"], data["x_all"], method, float(lr), list(epochs_of.values()),
                                 prob.forget.array, settings, targets.get(method))
                res["points"] += [point(logits[e], method, float(lr), e, b) for b, e in epochs_of.items()]
                bar.update(1)
        out[prob.forget.name] = res
    bar.close()
    return out


def selection_score(point: dict) -> float:
    """What a setting is chosen by: the worst of its forget, retain and validation 95th-percentile
    KLoM. Unlearning must move the forget set to the oracles without moving the rest away from
    them; scored on the forget set alone, a learning rate that wrecks the model can win."""
    return max(point["klom"][split]["p95"] for split in SPLITS)


def selection_scores(results: dict, select_sets: Sequence[str]) -> dict[str, dict[tuple[float, int], float]]:
    """For each method, the select sets' mean :func:`selection_score` at each (lr, budget)."""
    scores: dict[str, dict[tuple[float, int], list[float]]] = {}
    for name in select_sets:
        for pt in results[name]["points"]:
            scores.setdefault(pt["method"], {}).setdefault((pt["lr"], pt["budget"]), []).append(selection_score(pt))
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in scores.items()}


@dataclass
class Choice:
    """Hyperparameters chosen on select sets: per method, the learning rate for each budget
    (``per_budget[method][budget]``) and the single best (lr, budget) (``best[method]``)."""

    per_budget: dict[str, dict[float, float]]
    best: dict[str, tuple[float, float] | None]

    @property
    def learning_rates(self) -> dict[str, list[float]]:
        """The learning rates a reported set must run: every one chosen for some budget."""
        return {m: sorted(set(v.values())) for m, v in self.per_budget.items() if v}


def choose(results: dict, select_sets: Sequence[ForgetSet]) -> dict[str, Choice]:
    """A :class:`Choice` per kind of forget set, made on the select sets of that kind (so random
    sets are reported with settings chosen on a random set, coherent ones on a coherent one)."""
    out = {}
    for kind in sorted({fs.kind for fs in select_sets}):
        scores = selection_scores(results, [fs.name for fs in select_sets if fs.kind == kind])
        out[kind] = Choice({m: choose_per_budget(sc) for m, sc in scores.items()}, {m: best_setting(sc) for m, sc in scores.items()})
    return out


def choice_for(forget: ForgetSet, choices: dict[str, Choice]) -> Choice:
    """The choice made on select sets of ``forget``'s kind."""
    if forget.kind not in choices:
        raise ParamError(f"unlearning.forget_sets: set {forget.name!r} is of kind {forget.kind!r} but no set of that kind has "
                         f"select: true; add one, so its hyperparameters are chosen on a set like it")
    return choices[forget.kind]


def chosen_points(result: dict, per_budget: dict[str, dict[float, float]]) -> dict[str, list[dict]]:
    """For one set's results, each method's points at the learning rate chosen for each budget."""
    out: dict[str, list[dict]] = {}
    for pt in result["points"]:
        if per_budget.get(pt["method"], {}).get(pt["budget"]) == pt["lr"]:
            out.setdefault(pt["method"], []).append(pt)
    return {m: sorted(v, key=lambda p: p["budget"]) for m, v in out.items()}


def jsonable(obj):
    """``obj`` without its ``_``-prefixed entries (per-example arrays), with tuple keys as strings."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    return obj


def compare_attributions(predicted_change: dict[str, np.ndarray], actual_change: np.ndarray) -> dict:
    """How well each attribution's predicted change of logits (T,) matches the oracles' actual
    mean change (T,): Pearson correlation and mean squared error."""
    return {name: {"pearson": float(np.corrcoef(p, actual_change)[0, 1]), "mse": float(np.mean((p - actual_change) ** 2))}
            for name, p in predicted_change.items()}


BASELINES = ("gd", "ga", "ascent_descent", "scrub")


def _best_point(result: dict, method: str, best: tuple[float, float] | None) -> dict | None:
    if method in ("do_nothing", "dm_direct"):
        return result[method]
    return next((pt for pt in result["points"] if best and pt["method"] == method and (pt["lr"], pt["budget"]) == tuple(best)), None)


def summarise(results: dict, choices: dict[str, Choice], extra_compute: dict[str, float]) -> dict:
    """Figures' series and the headline table of the reported sets.

    ``extra_compute``: epoch-equivalents of training each method needs besides fine-tuning
    (OM: its oracles; DMM and DM-direct: the subset models their datamodels were fit on,
    shared by every forget set). Returns curves, floor / ceiling / DM-direct forget KLoM,
    a table row per set and method at its chosen setting, mean accuracy per split, and per
    set whether DMM is within reach of OM and below every baseline at no more compute.
    ``choices``: the :class:`Choice` that applies to each set, by set name."""
    table, curves, verdict = [], {}, {}
    floor, ceiling, direct = {}, {}, {}
    accuracy: dict[str, dict[str, list[float]]] = {}
    for name, res in results.items():
        best = choices[name].best
        chosen = chosen_points(res, choices[name].per_budget)
        curves[name] = {m: [(pt["finetune_epochs"], pt["klom"]["forget"]["p95"]) for pt in pts] for m, pts in chosen.items()}
        floor[name] = res["floor"]["klom"]["forget"]["p95"]
        ceiling[name] = res["do_nothing"]["klom"]["forget"]["p95"]
        direct[name] = res["dm_direct"]["klom"]["forget"]["p95"]
        table.append({"set": name, "method": "floor (independent oracles)", **_row(res["floor"]["klom"]), "finetune_epochs": 0.0})
        for method in ("do_nothing", *FINE_TUNED, "dm_direct"):
            pt = _best_point(res, method, best.get(method))
            if pt is None:
                continue
            table.append({"set": name, "method": method, "lr": pt["lr"], "budget": pt["budget"], "epochs": pt["epochs"], **_row(pt["klom"]),
                          "worst_p95": selection_score(pt),
                          "finetune_epochs": pt["finetune_epochs"], "extra_epochs": extra_compute.get(method, 0.0)})
            for split, acc in pt["accuracy"].items():
                accuracy.setdefault(split, {}).setdefault(method, []).append(acc)
        for split, acc in res["oracle_accuracy"].items():
            accuracy.setdefault(split, {}).setdefault("oracle", []).append(acc)
        verdict[name] = {**_verdict(res, chosen, best), **predicted_shift(res)}
    return {"table": table, "curves": curves, "floor_p95": floor, "ceiling_p95": ceiling, "direct_p95": direct,
            "accuracy": {s: {m: float(np.mean(v)) for m, v in d.items()} for s, d in accuracy.items()}, "verdict": verdict}


def predicted_shift(result: dict) -> dict:
    """How much of the oracles' shift of the forget examples' mean margins (from the base models')
    DM-direct predicts: the mean absolute gap to the oracles before and after, and the slope of
    predicted on actual shift (1 = right size; below 1 the datamodels underestimate it)."""
    oracle = result["floor"]["_values"]["margins"].mean(0)
    base = result["do_nothing"]["_values"]["margins"].mean(0)
    direct = result["dm_direct"]["_values"]["margins"].mean(0)
    actual = oracle - base
    slope = float(np.polyfit(actual, direct - base, 1)[0]) if len(actual) > 1 and actual.std() > 0 else float("nan")
    return {"forget_gap_do_nothing": float(np.abs(actual).mean()), "forget_gap_dm_direct": float(np.abs(oracle - direct).mean()),
            "predicted_shift_slope": slope}


def _row(summary: dict) -> dict:
    return {f"{split}_{stat}": summary[split][stat] for split in SPLITS for stat in ("p95", "p99", "mean")}


def _verdict(res: dict, chosen: dict[str, list[dict]], best: dict) -> dict:
    """DMM at its chosen setting against OM at its own, and against the best baseline point
    that used no more fine-tuning compute (the cheapest baseline point when none did)."""
    dmm, om = _best_point(res, "dmm", best.get("dmm")), _best_point(res, "om", best.get("om"))
    if dmm is None:
        return {}
    budget = dmm["finetune_epochs"]
    baseline = [pt for m in BASELINES for pt in chosen.get(m, [])]
    within = [pt for pt in baseline if pt["finetune_epochs"] <= budget] or sorted(baseline, key=lambda pt: pt["finetune_epochs"])[:1]
    best_base = min(within, key=lambda pt: pt["klom"]["forget"]["p95"]) if within else None
    out = {"dmm_forget_p95": dmm["klom"]["forget"]["p95"], "dmm_finetune_epochs": budget,
           "om_forget_p95": om["klom"]["forget"]["p95"] if om else float("nan"),
           "dm_direct_forget_p95": res["dm_direct"]["klom"]["forget"]["p95"]}
    if best_base is not None:
        out.update(best_baseline=best_base["method"], best_baseline_forget_p95=best_base["klom"]["forget"]["p95"],
                   best_baseline_finetune_epochs=best_base["finetune_epochs"],
                   dmm_beats_baselines=bool(out["dmm_forget_p95"] < best_base["klom"]["forget"]["p95"]))
    return out


def pooled_distributions(results: dict, choices: dict[str, Choice]) -> dict[str, dict[str, np.ndarray]]:
    """Per-example KLoM per split, pooled over sets, for the floor, do nothing, each method at
    its chosen setting and DM-direct: {name: {split: (examples,)}}."""
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for set_name, res in results.items():
        best = choices[set_name].best
        entries = {"floor": res["floor"], **{m: _best_point(res, m, best.get(m)) for m in ("do_nothing", *FINE_TUNED, "dm_direct")}}
        for name, pt in entries.items():
            if pt is None or not np.isfinite(pt["_values"]["klom"]).all():
                continue
            for split, idx in res["_splits"].items():
                out.setdefault(name, {}).setdefault(split, []).append(pt["_values"]["klom"][idx])
    return {m: {s: np.concatenate(v) for s, v in d.items()} for m, d in out.items()}


def histogram_examples(result: dict, choice: Choice, labels: np.ndarray, forget: ForgetSet, count: int = 3,
                       methods: Sequence[str] = ("do_nothing", "om", "dmm", "dm_direct")):
    """The ``count`` forget examples whose margins do nothing moves furthest from the oracles
    (highest KLoM): the oracles' margins (N, count), each method's at its chosen setting
    {method: (N, count)}, and panel titles."""
    forget_klom = result["do_nothing"]["_values"]["klom"][forget.array]
    pick = np.argsort(-forget_klom, kind="stable")[:count]
    unlearned = {}
    for m in methods:
        pt = _best_point(result, m, choice.best.get(m))
        if pt is not None and pt["_values"]["margins"] is not None:
            unlearned[m] = pt["_values"]["margins"][:, pick]
    titles = [f"train #{forget.array[j]} (label {labels[forget.array[j]]})" for j in pick]
    return result["floor"]["_values"]["margins"][:, pick], unlearned, titles


def extra_compute(om_oracles: int, train_epochs: int, attribution_models: int, alpha: float) -> dict[str, float]:
    """Epoch-equivalents of training beyond fine-tuning: OM's oracles (``om_oracles`` models of
    ``train_epochs`` on about the whole training set, per forget set) and the subset models that
    DMM's and DM-direct's datamodels were fit on (once, for every forget set)."""
    attribution = float(attribution_models * alpha * train_epochs)
    return {"om": float(om_oracles * train_epochs), "dmm": attribution, "dm_direct": attribution}
