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

Every method fine-tunes all N base models at once, through the training engine's stacked
trainer (:class:`~datalens.training.engine.ModelStack`; batch-norm buffers frozen in eval
mode). Every model of a stack sees the same batches, drawn from ``seed``, the epoch and the
pass, so results do not depend on the stack size. A compute budget is examples processed,
partial epochs included, so every point spends what its label says.

**KLoM** (KL divergence of margins): for each example, the margins of the N unlearned models
and of N oracles, clipped to +-100, histogrammed in 20 equal-width bins over their joint
range, empty bins floored at 1e-5 (then renormalised), and the KL divergence between the two
histograms. The published code has used both directions; ``direction`` chooses, and the
default is KL(unlearned || oracle), the first published one.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from torch import nn

from datalens.core.config import ParamError, resolve_location
from datalens.training.engine import ModelStack
from datalens.tasks.classification import margins_from_logits
from datalens.training.runs import SubsetRun

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
        flat = (np.arange(v.shape[1]) * bins + idx).ravel()  # (example, bin) as one index: bincount, not np.add.at
        p = np.bincount(flat, minlength=v.shape[1] * bins).reshape(v.shape[1], bins) / len(v)
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
    run = SubsetRun.from_params(p, store=f"{resolve_location(p, u['store_dir'])}/base", num_models=n,
                                num_checkpoints=n, block_size=min(int(p["train"]["block_size"]), n), stream="unlearning_base",
                                record_logits=True)
    return replace(run, alpha=1.0)


def datamodel_run(p: dict, alpha: float) -> SubsetRun:
    """Subset models at inclusion probability ``alpha`` for DMM's datamodels, as many as the base
    run has (``train.num_models``), on a mask stream of their own: the alternative to fitting them
    on the base run's alpha (a removal of a small group is closer to subsets with alpha near 1)."""
    u = p["unlearning"]
    run = SubsetRun.from_params(p, store=f"{resolve_location(p, u['store_dir'])}/datamodels", num_checkpoints=0,
                                stream="unlearning_datamodels", record_logits=True)
    return replace(run, alpha=float(alpha))


def oracle_run(p: dict, forget: ForgetSet) -> SubsetRun:
    """2N oracles retrained on S minus F: models 0..N-1 are the oracles KLoM compares against,
    N..2N-1 an independent set (the noise floor, and the targets OM matches, so that OM never
    sees the models it is judged against)."""
    u = p["unlearning"]
    n = 2 * int(u["num_models"])
    run = SubsetRun.from_params(p, store=f"{resolve_location(p, u['store_dir'])}/oracles_{forget.name}", num_models=n,
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


def fine_tuning_steps(method: str, sets: dict[str, np.ndarray], settings: FineTuneSettings):
    """The endless sequence of steps of ``method``: (epoch, loss kind, batch indices). An epoch
    is each of the method's passes in turn; a pass is its examples in an order drawn from
    ``seed``, the epoch and the pass, in batches of at most ``batch_size``."""
    for epoch in itertools.count():
        for k, (which, kind) in enumerate(PASSES[method]):
            order = np.random.default_rng([settings.seed, epoch, k]).permutation(sets[which])
            for batch in np.array_split(order, max(1, math.ceil(len(order) / settings.batch_size))):
                yield epoch, kind, batch


def budget_steps(method: str, sets: dict[str, np.ndarray], budgets: Sequence[float], settings: FineTuneSettings,
                 n_train: int) -> dict[float, tuple[int, float]]:
    """For each budget (epoch-equivalents: examples processed / n_train), the number of steps
    that spends it, the first at which the examples processed reach ``budget * n_train``
    (partial epochs included), and what those steps spend: {budget: (steps, spent)}."""
    out, processed, pending = {}, 0, sorted(float(b) for b in budgets)
    for step, (_, _, batch) in enumerate(fine_tuning_steps(method, sets, settings), start=1):
        processed += len(batch)
        while pending and processed >= pending[0] * n_train * (1 - 1e-12):
            out[pending.pop(0)] = (step, processed / n_train)
        if not pending:
            return out
    raise AssertionError("unreachable: the steps never end")


def unlearn(models: Sequence[nn.Module], x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor, method: str,
            lr: float, budgets: Sequence[float], forget: np.ndarray, settings: FineTuneSettings,
            targets: torch.Tensor | None = None) -> dict[float, torch.Tensor]:
    """Fine-tune copies of ``models`` with ``method`` and return their logits on ``x_eval``
    once each budget is spent: {budget: (M, n_eval, C)}. The models are not changed.

    budgets: compute in epoch-equivalents (examples processed / n_train), partial epochs
    included (:func:`budget_steps`); x_train: (n, ...) and y_train: (n,) on the models'
    device; forget: indices into them; targets (OM, DMM): logits to match, (n, C) shared by
    every model or (M, n, C) per model. A model whose loss turns non-finite (too large a
    learning rate for ascent) gives NaN logits from then on; the others are unaffected."""
    if method not in PASSES:
        raise ParamError(f"unlearning method {method!r} is not allowed; allowed values: {', '.join(PASSES)}")
    if method in ("om", "dmm") and targets is None:
        raise ValueError(f"{method} needs targets to match")
    sets = example_sets(len(y_train), forget, settings)
    steps = {b: s for b, (s, _) in budget_steps(method, sets, budgets, settings, len(y_train)).items()}
    out: dict[float, list[torch.Tensor]] = {b: [] for b in steps}
    for a in range(0, len(models), settings.stack_size):
        rows = slice(a, a + settings.stack_size)
        stack_targets = targets[rows] if targets is not None and targets.dim() == 3 else targets
        logits = _unlearn_stack(list(models[rows]), x_train, y_train, x_eval, method, lr, sorted(set(steps.values())), sets,
                                settings, stack_targets)
        for b, s in steps.items():
            out[b].append(logits[s])
    return {b: torch.cat(v) for b, v in out.items()}


def _unlearn_stack(models, x_train, y_train, x_eval, method, lr, snapshots, sets, settings, targets) -> dict[int, torch.Tensor]:
    """Fine-tune one :class:`~datalens.training.engine.ModelStack` for ``snapshots[-1]`` steps;
    {steps: logits (M, n_eval, C)} after each step count in ``snapshots``."""
    stack = ModelStack(models)  # stacks copies of the weights: the models themselves are not touched
    stack.base.eval()  # batch-norm statistics stay frozen
    teacher = stack.outputs(x_eval)[:, :len(x_train)] if method == "scrub" else None  # x_eval starts with x_train
    params = list(stack.params.values())
    opt = torch.optim.Adam(params, lr=lr) if method in ADAM_METHODS else torch.optim.SGD(params, lr=lr, momentum=settings.momentum)
    result = {}
    for step, (epoch, kind, batch) in enumerate(fine_tuning_steps(method, sets, settings), start=1):
        idx = torch.as_tensor(batch, device=x_train.device)
        target = None
        if targets is not None:
            target = targets[:, idx] if targets.dim() == 3 else targets[idx].unsqueeze(0)
        loss = pass_loss(kind, stack.forward(x_train[idx]), y_train[idx], teacher[:, idx] if teacher is not None else None,
                         target, settings.temperature)
        stack.step(opt, lr * settings.lr_decay ** epoch, loss)
        if step in snapshots:
            logits = stack.outputs(x_eval)
            logits[stack.failed] = float("nan")
            result[step] = logits
            if step == snapshots[-1]:
                return result
    raise AssertionError("unreachable: the steps never end")


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


def settings_from_params(u: dict) -> FineTuneSettings:
    return FineTuneSettings(batch_size=int(u["batch_size"]), momentum=float(u["momentum"]), lr_decay=float(u["lr_decay"]),
                            retain_ratio=float(u["retain_ratio"]), temperature=float(u["temperature"]), seed=int(u["seed"]))


def indicators(sets: Sequence[ForgetSet], n_train: int) -> np.ndarray:
    """(S, n_train) 0/1: which training examples each set holds."""
    out = np.zeros((len(sets), n_train))
    for i, fs in enumerate(sets):
        out[i, fs.array] = 1.0
    return out


def logit_columns(examples: np.ndarray, num_classes: int) -> np.ndarray:
    """Columns of the flattened (example, class) logit matrix that belong to ``examples``."""
    return (np.asarray(examples)[:, None] * num_classes + np.arange(num_classes)).ravel()
