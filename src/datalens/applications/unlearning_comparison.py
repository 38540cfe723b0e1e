"""How unlearning methods compare, as stage ``unlearning`` runs it: the datamodels of the base
run (forget sets and each set's attributed contribution to every logit), the problem each forget
set poses (its oracles' margins, OM's targets, DMM's contribution), every method at every
setting on every set, learning rates chosen on the select sets only, and the summaries the
figures and the metrics are drawn from. The methods and KLoM are :mod:`datalens.applications.unlearning`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from datalens.core.config import ParamError
from datalens.attribution.datamodels import Moments, fit_datamodels, ridge_datamodels, ridge_set_contributions, select_ridge, split_models
from datalens.core.progress import progress_bar
from datalens.tasks.gradients import raw_outputs
from datalens.training.runs import train_subset_models
from datalens.applications.unlearning import (FINE_TUNED, SPLITS, ForgetSet, accuracies, budget_steps, datamodel_components,
                                 datamodel_run, example_sets, indicators, klom, klom_summary, logit_columns, make_forget_sets, margins,
                                 predicted_logits, settings_from_params, split_indices, unlearn)

SE_DRAWS = 200  # resamples of the examples behind a selection score's standard error (the one-SE budget rule)

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


def outward(grid: Sequence[float], lr: float, side: int) -> float:
    """The learning rate next to ``lr`` on ``side`` (-1 below, +1 above) of the sorted ``grid``;
    beyond the grid's end, a new one a step as wide as the grid's outermost (x3 for a one-value grid)."""
    i = grid.index(lr)
    if 0 <= i + side < len(grid):
        return grid[i + side]
    if len(grid) == 1:
        return lr * 3.0 ** side
    return lr * (grid[1] / grid[0] if side < 0 else grid[-1] / grid[-2]) ** side


@dataclass
class Search:
    """The settings tried on one kind's select sets, as :func:`widen_until_interior` leaves them:
    per method the learning-rate grid and the budgets (epoch-equivalents, the params' then each
    doubling), and what is still on an edge once the widenings allowed are spent: learning rates
    (``lrs_on_edge[method]``) and the best budget (``budget_on_edge[method]``); the best budgets
    that are the largest but gained less than the noise on the last doubling (``budget_flat[method]``:
    {"budget", "gain", "se"}); ``choice``, the choice on the final results."""

    results: dict
    grids: dict[str, list[float]]
    budgets: dict[str, list[float]]
    lrs_on_edge: dict[str, list[float]]
    budget_on_edge: dict[str, float]
    budget_flat: dict[str, dict[str, float]]
    choice: "Choice"


def widen_until_interior(lrs: dict[str, Sequence[float]], budgets: Sequence[float], evaluate, select_sets: Sequence[ForgetSet],
                         max_lr_extensions: int, max_budget_extensions: int, seed: int = 0) -> Search:
    """Evaluate every method on one kind's select sets and widen its settings until no choice sits
    on an edge. Per budget, the chosen learning rate (:func:`choose_per_budget`) must have a
    tried neighbour on both sides (a diverged one counts: it is never chosen, so a grid whose next
    step diverges ends there); beyond the grid's ends a new rate is one more step, at most
    ``max_lr_extensions`` rounds. A method whose best (lr, budget) spends its largest budget gets
    a budget twice as large, tried at that rate and its two neighbours, at most
    ``max_budget_extensions`` times, unless the last doubling gained no more than one standard
    error of the paired difference (:func:`difference_ses`, resampled from ``seed``): the curve
    is flat within noise there, so a larger budget would not change the choice beyond it (in
    ``budget_flat``). Each round runs only what is new.

    ``evaluate(plan, budgets) -> {set name: {"points": [...]}}`` runs plan[method][lr] = the
    largest budget to spend, recording a point at each of ``budgets[method]`` up to it."""
    kinds = {fs.kind for fs in select_sets}
    if len(kinds) != 1:
        raise ValueError(f"widen_until_interior searches one kind of select set at a time, got {sorted(kinds)}")
    kind = kinds.pop()
    grids = {m: sorted(float(v) for v in g) for m, g in lrs.items()}
    budgets = {m: sorted(float(b) for b in budgets) for m in grids}
    results: dict = {}
    tried: dict[tuple[str, float], set[float]] = {}

    def run(plan: dict[str, dict[float, float]]) -> None:
        for name, res in evaluate(plan, budgets).items():
            new = [pt for pt in res["points"] if pt["lr"] not in tried.get((pt["method"], pt["budget"]), ())]
            results.setdefault(name, {**res, "points": []})["points"] += new
        for method, by_lr in plan.items():
            for lr, top in by_lr.items():
                for b in budgets[method]:
                    if b <= top:
                        tried.setdefault((method, b), set()).add(lr)

    run({m: {lr: budgets[m][-1] for lr in g} for m, g in grids.items()})
    lr_rounds, budget_rounds = 0, dict.fromkeys(grids, 0)
    names = [fs.name for fs in select_sets]
    while True:
        choice = choose(results, select_sets)[kind]
        scores_of = selection_scores(results, names)
        work: dict[str, dict[float, float]] = {}
        lrs_on_edge: dict[str, set[float]] = {}
        beyond: dict[str, set[float]] = {}
        for method, per_budget in choice.per_budget.items():
            for b, lr in per_budget.items():
                near = sorted(tried[method, b])
                for side in [s for s, end in ((-1, near[0]), (1, near[-1])) if end == lr]:
                    nxt = outward(grids[method], lr, side)
                    if nxt not in grids[method]:
                        if lr_rounds == max_lr_extensions:
                            lrs_on_edge.setdefault(method, set()).add(lr)
                            continue
                        beyond.setdefault(method, set()).add(nxt)
                    work.setdefault(method, {})[nxt] = max(work.get(method, {}).get(nxt, 0.0), b)
        budget_on_edge, budget_flat = {}, {}
        for method, best in choice.best.items():
            if best is None or best[1] != budgets[method][-1]:
                continue
            if len(budgets[method]) > 1:  # did the last doubling gain more than the noise?
                before = budgets[method][-2]
                if before in choice.per_budget[method]:
                    key = (choice.per_budget[method][before], before)
                    gain = scores_of[method][key] - scores_of[method][best]
                    se = difference_ses(results, names, method, best, [key], seed)[key]
                    if gain <= se:
                        budget_flat[method] = {"budget": best[1], "gain": gain, "se": se}
                        continue
            if budget_rounds[method] == max_budget_extensions:
                budget_on_edge[method] = best[1]
                continue
            budgets[method].append(2 * best[1])
            budget_rounds[method] += 1
            i = grids[method].index(best[0])
            for lr in grids[method][max(0, i - 1):i + 2]:
                work.setdefault(method, {})[lr] = 2 * best[1]
        if not work:
            return Search(results, grids, budgets, {m: sorted(v) for m, v in lrs_on_edge.items()}, budget_on_edge, budget_flat, choice)
        for method, new in beyond.items():
            grids[method] = sorted(grids[method] + sorted(new))
        lr_rounds += bool(beyond)
        run(work)


class StoreRows:
    """The completed models of a store as an array that reads by rows (N, ...): ``name``'s rows,
    or with ``name=None`` every class logit, (N, (n_train + n_test) * C). A store too large for
    memory streams through :func:`~datalens.attribution.datamodels.ridge_set_contributions`, and
    masks and outputs read through two of these are the same models, row for row."""

    def __init__(self, store, name: str | None = None):
        self.store, self.name = store, name
        self.rows = np.flatnonzero(store.completed())
        if name is None:
            n, c = store.group["train_logits"].shape[1:]
            self.shape = (len(self.rows), (n + store.group["test_logits"].shape[1]) * c)
        else:
            self.shape = (len(self.rows), *store.group[name].shape[1:])

    def __getitem__(self, rows) -> np.ndarray:
        idx = self.rows[rows]
        if self.name is not None:
            return self.store.read(self.name, idx)
        out = load_outputs(self.store, idx)
        return out.reshape(len(out), -1)

    def columns(self, cols: np.ndarray, block: int = 1000) -> np.ndarray:
        """(N, len(cols)) float32: a few columns of every model, read ``block`` models at a time."""
        return np.concatenate([self[a:a + block][:, cols] for a in range(0, self.shape[0], block)]).astype(np.float32)


def load_outputs(store, rows: np.ndarray | slice, logits: bool = True) -> np.ndarray:
    """(N, n_train + n_test, C) float16 logits, or with ``logits=False`` (N, n_train + n_test)
    float32 margins, of the store's models ``rows``: train examples first, then test."""
    if logits:
        return np.concatenate([store.read("train_logits", rows), store.read("test_logits", rows)], axis=1)
    return np.concatenate([store.read("train_outputs", rows), store.read("test_outputs", rows)], axis=1)


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
    masks = main_store.read("masks")  # completed models only, like every read below
    train_outputs = main_store.read("train_outputs")
    ridges = [float(r) for r in u["ridge_grid"]]
    margin_ridge, margin_mse = select_ridge(masks, train_outputs, ridges, u["val_fraction"], u["seed"], device)
    weights = ridge_datamodels(masks, train_outputs, margin_ridge, device).weight.T  # (targets, train examples)
    components = max([s.get("component", 1) for s in u["forget_sets"]])
    scores = datamodel_components(weights, components, u["seed"])
    sets = make_forget_sets(u["forget_sets"], n_train, u["seed"], scores)
    contributions, logit_ridge, logit_mse = set_contributions(main_store, sets, u, n_train, device)
    return Attribution(sets, scores, contributions, margin_ridge, logit_ridge, margin_mse.tolist(), logit_mse.tolist(),
                       time.perf_counter() - t0)


def set_contributions(store, sets: Sequence[ForgetSet], u: dict, n_train: int, device: str = "cpu") -> tuple[np.ndarray, float, np.ndarray]:
    """(S, n_all * C): each forget set's contribution to every class logit by the ridge datamodels of
    a store's models, with the ridge (chosen on its validation models) and its validation MSE."""
    logits = StoreRows(store)  # (N, n_all * C), read by blocks of models
    ridges = [float(r) for r in u["ridge_grid"]]
    # the ridge for the logits is chosen on a seeded sample of columns: one solve per ridge on all
    # of them would cost (n_all * C) / sample times as much and choose the same pooled optimum
    cols = np.sort(np.random.default_rng([u["seed"], 53]).choice(logits.shape[1], min(2000, logits.shape[1]), replace=False))
    masks = store.read("masks")
    ridge, mse = select_ridge(masks, logits.columns(cols), ridges, u["val_fraction"], u["seed"], device)
    return ridge_set_contributions(StoreRows(store, "masks"), logits, indicators(sets, n_train), ridge, device), ridge, mse


def datamodel_contributions(p: dict, attribution: "Attribution", n_train: int, executor=None) -> dict[float, dict[str, np.ndarray]]:
    """For each alpha of ``unlearning.datamodel_alphas``: every forget set's contribution (n_all * C,)
    by name. The base run's alpha reuses ``attribution`` (its store); any other trains
    :func:`~datalens.applications.unlearning.datamodel_run` first (resumable)."""
    u, base_alpha = p["unlearning"], float(p["train"]["alpha"])
    out = {}
    for alpha in sorted({float(a) for a in u["datamodel_alphas"]}):
        if alpha == base_alpha:
            contributions = attribution.contributions
        else:
            store = train_subset_models(datamodel_run(p, alpha), executor=executor)
            contributions = set_contributions(store, attribution.forget_sets, u, n_train)[0]
        out[alpha] = {fs.name: contributions[i] for i, fs in enumerate(attribution.forget_sets)}
    return out


def lasso_check(main_store, attribution: Attribution, problems: Sequence["Problem"], own_logits: torch.Tensor,
                oracle_logits: dict[str, np.ndarray], num_targets: int, dm: dict, num_classes: int, seed: int) -> dict:
    """Ridge against the lasso path (``datamodels.*`` settings) on how well each predicts the
    oracles' change of logits, on up to ``num_targets`` logit columns of the select sets' forget
    examples: correlation and MSE of predicted against actual mean change, and each fit's
    seconds per target (the lasso's, extrapolated to every column, is what rules it out)."""
    masks = main_store.read("masks")
    logits = StoreRows(main_store)
    predicted: dict[str, list[np.ndarray]] = {"ridge": [], "lasso": []}
    actual, seconds = [], {"ridge": 0.0, "lasso": 0.0}
    per_set = max(num_classes, num_targets // max(1, len(problems)))
    cols_of = [logit_columns(prob.forget.array[:max(1, per_set // num_classes)], num_classes) for prob in problems]
    every = logits.columns(np.concatenate(cols_of))  # one pass over the store for every set's columns
    base_mean = own_logits.double().mean(0).cpu().numpy().reshape(-1)
    start = 0
    for prob, cols in zip(problems, cols_of):
        outputs = every[:, start:start + len(cols)]
        start += len(cols)
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
        actual.append(oracle_logits[prob.forget.name].reshape(-1)[cols] - base_mean[cols])
    targets = sum(len(a) for a in actual)
    out = compare_attributions({k: np.concatenate(v) for k, v in predicted.items()}, np.concatenate(actual))
    for name in out:
        out[name]["seconds_per_target"] = seconds[name] / targets
    out["targets"] = targets
    out["all_targets"] = int(logits.shape[1])
    return out


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
    n_train = oracle_store.group["train_outputs"].shape[1]
    n_test = len(labels) - n_train
    out = load_outputs(oracle_store, slice(0, 2 * num_models), logits=False)
    logits = load_outputs(oracle_store, slice(0, num_models + om_oracles)).astype(np.float32)  # oracles, then OM's
    om = logits[num_models:, :n_train].mean(0)
    splits = split_indices(n_train, n_test, forget.array)
    return Problem(forget, out[:num_models], out[num_models:], torch.as_tensor(om, device=device), contribution, splits,
                   accuracies(torch.as_tensor(logits[:num_models]), torch.as_tensor(labels), splits))


def resampled_scores(values: np.ndarray, splits: dict[str, np.ndarray], seed: int, draws: int = SE_DRAWS) -> np.ndarray:
    """:func:`selection_score` of per-example KLoM ``values`` (n_all,) on ``draws`` resamples of
    each split's examples (with replacement, from ``seed``: the same draws for every point of a
    set, so two points' differences are paired): (draws,)."""
    rng = np.random.default_rng([seed, 44])
    per_split = [np.percentile(values[idx[rng.integers(0, len(idx), (draws, len(idx)))]], 95, axis=1) for idx in splits.values()]
    return np.max(per_split, axis=0)


def score_point(logits: torch.Tensor, y_all: torch.Tensor, oracle_margins: np.ndarray, splits: dict[str, np.ndarray],
                klom_params: dict) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """KLoM summary and accuracy per split of one point, its per-example KLoM (n_all,) and the
    margins (M', n_all) of its M' models that did not diverge; a diverged model (non-finite
    logits) is dropped and counted in ``diverged``. NaN throughout (and no margins) when every
    model diverged."""
    finite = torch.isfinite(logits).flatten(1).all(1)
    diverged = int((~finite).sum())
    if not finite.any():
        nan = {s: {"p95": float("nan"), "p99": float("nan"), "mean": float("nan")} for s in splits}
        return ({"klom": nan, "accuracy": {s: float("nan") for s in splits}, "diverged": diverged},
                np.full(oracle_margins.shape[1], np.nan), None)
    logits = logits[finite]
    unlearned = margins(logits, y_all)
    values = klom(unlearned, oracle_margins, **klom_params)
    return ({"klom": klom_summary(values, splits), "accuracy": accuracies(logits, y_all, splits), "diverged": diverged}, values,
            unlearned)


def evaluate_methods(models: Sequence[nn.Module], own_logits: torch.Tensor, data: dict, problems: Sequence[Problem],
                     u: dict, plan: dict[str, dict[float, float]] | None = None, budgets: dict[str, Sequence[float]] | None = None,
                     progress: bool = True) -> dict:
    """Every fine-tuning method at each learning rate of ``plan`` ({method: {lr: largest budget}},
    default every rate of ``u['lrs']`` to the largest of ``u['budgets']``), recorded at each of the
    method's ``budgets`` (default ``u['budgets']``) up to that one, on each problem, plus do
    nothing, DM-direct and the floor.

    A budget is fine-tuning compute in epoch-equivalents (examples processed / n_train), so
    methods are compared at equal compute: each runs the steps that spend it
    (:func:`~datalens.applications.unlearning.budget_steps`, partial epochs included; OM's
    epoch over F and 3|F| retain examples is far cheaper than GD's over the whole retain set).
    Recorded compute (``finetune_epochs``) is what those steps spent, within one batch of the
    budget.

    own_logits: (M, n_all, C) the base models' logits; data: ``x_train``, ``y_train``, ``x_all``,
    ``y_all`` tensors. Returns {set name: {"floor", "do_nothing", "dm_direct": point,
    "points": [point, ...]}} where a point holds method, lr, budget, steps, ``finetune_epochs``
    (epoch-equivalents), KLoM per split and accuracy per split; per-example KLoM and margins
    are kept under ``"_values"`` for the figures (dropped by :func:`jsonable`)."""
    settings = settings_from_params(u)
    plan = plan or {m: dict.fromkeys(map(float, g), max(map(float, u["budgets"]))) for m, g in u["lrs"].items()}
    budgets = budgets or dict.fromkeys(plan, u["budgets"])
    kp = u["klom"]
    n_train = len(data["y_train"])
    total = sum(len(v) for v in plan.values()) * len(problems)
    bar = progress_bar(total=total, desc="unlearning runs", unit="run", disable=not progress)
    out = {}
    for prob in problems:
        sets = example_sets(n_train, prob.forget.array, settings)

        def point(logits, method, lr, steps=0, spent=0.0, budget=0.0):
            record, values, unlearned = score_point(logits, data["y_all"], prob.oracle_margins, prob.splits, kp)
            record.update(method=method, lr=lr, budget=budget, steps=steps, finetune_epochs=spent)
            record["_values"] = {"klom": values, "margins": None if unlearned is None else unlearned[:, prob.forget.array]}
            return record

        floor_values = klom(prob.independent_margins, prob.oracle_margins, **kp)
        predicted = predicted_logits(own_logits, prob.contribution)
        res = {"floor": {"klom": klom_summary(floor_values, prob.splits), "_values": {"klom": floor_values,
                                                                                    "margins": prob.oracle_margins[:, prob.forget.array]}},
               "do_nothing": point(own_logits, "do_nothing", 0.0),
               "dm_direct": point(predicted, "dm_direct", 0.0), "points": [], "_splits": prob.splits,
               "oracle_accuracy": prob.oracle_accuracy}
        targets = {"om": prob.om_targets, "dmm": predicted[:, :n_train]}
        for method, by_lr in plan.items():
            for lr, top in by_lr.items():
                spend = budget_steps(method, sets, [b for b in map(float, budgets[method]) if b <= top], settings, n_train)
                bar.set_postfix(set=prob.forget.name, method=method, lr=lr)
                logits = unlearn(models, data["x_train"], data["y_train"], data["x_all"], method, float(lr), list(spend),
                                 prob.forget.array, settings, targets.get(method))
                res["points"] += [point(logits[b], method, float(lr), steps, spent, b) for b, (steps, spent) in spend.items()]
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


def difference_ses(results: dict, select_sets: Sequence[str], method: str, best: tuple[float, float],
                   keys: Sequence[tuple[float, float]], seed: int = 0) -> dict[tuple[float, float], float]:
    """For each (lr, budget) in ``keys``, the standard error of its mean selection score minus
    ``best``'s over resamples of the select sets' examples (:func:`resampled_scores`, paired).
    0 where the points keep no per-example KLoM (``_values``) or a score is not finite."""
    diffs: dict[tuple[float, float], list[np.ndarray]] = {}
    for name in select_sets:
        res = results[name]
        by_key = {(pt["lr"], pt["budget"]): pt for pt in res["points"] if pt["method"] == method}
        if "_splits" not in res or "_values" not in by_key.get(best, {}):
            return dict.fromkeys(keys, 0.0)
        ref = resampled_scores(by_key[best]["_values"]["klom"], res["_splits"], seed)
        for k in keys:
            diffs.setdefault(k, []).append(resampled_scores(by_key[k]["_values"]["klom"], res["_splits"], seed) - ref)
    out = {k: float(np.mean(v, axis=0).std(ddof=1)) for k, v in diffs.items()}
    return {k: se if np.isfinite(se) else 0.0 for k, se in out.items()}


@dataclass
class Choice:
    """Hyperparameters chosen on select sets: per method, the learning rate for each budget
    (``per_budget[method][budget]``) and the single best (lr, budget) (``best[method]``)."""

    per_budget: dict[str, dict[float, float]]
    best: dict[str, tuple[float, float] | None]

    def plan(self) -> dict[str, dict[float, float]]:
        """What a reported set must run: per method, each learning rate chosen for some budget, up
        to the largest budget it is chosen for ({method: {lr: budget}})."""
        out: dict[str, dict[float, float]] = {}
        for m, per_budget in self.per_budget.items():
            for b, lr in per_budget.items():
                out.setdefault(m, {})[lr] = max(out.get(m, {}).get(lr, 0.0), b)
        return out


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
            table.append({"set": name, "method": method, "lr": pt["lr"], "budget": pt["budget"], "steps": pt["steps"], **_row(pt["klom"]),
                          "worst_p95": selection_score(pt), "diverged_models": pt["diverged"],
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


def extra_compute(om_oracles: int, train_epochs: int, attribution_models: int, alphas: Sequence[float]) -> dict[str, float]:
    """Epoch-equivalents of training beyond fine-tuning: OM's oracles (``om_oracles`` models of
    ``train_epochs`` on about the whole training set, per forget set) and the subset models that
    DMM's and DM-direct's datamodels were fit on (once, for every forget set): ``attribution_models``
    at each of ``alphas``, all of them charged, since choosing among them needed every one."""
    attribution = float(attribution_models * sum(alphas) * train_epochs)
    return {"om": float(om_oracles * train_epochs), "dmm": attribution, "dm_direct": attribution}


# -- the whole comparison, as the stage runs it ---------------------------------------------------

@dataclass
class Comparison:
    """Every method on the select sets (``selected``), the settings chosen on them per kind of set
    (``choices``), every method at those settings on each reported set (``reported``, in the
    params' order) with the choice that applies to it (``choice_of``), the summary, and per kind
    the search on its select sets (``searches``, :class:`Search`)."""

    selected: dict
    choices: dict[str, Choice]
    reported: dict
    choice_of: dict[str, Choice]
    summary: dict
    searches: dict[str, Search]
    dm_scale: dict[str, dict]  # per kind of set, the datamodels' alpha and scale chosen on the select sets (choose_dm_scale)

    @property
    def lr_grids(self) -> dict[str, dict[str, list[float]]]:
        """Per kind, per method, the learning rates tried after widening."""
        return {k: s.grids for k, s in self.searches.items()}

    @property
    def budgets(self) -> dict[str, dict[str, list[float]]]:
        """Per kind, per method, the budgets tried (the params' then each doubling)."""
        return {k: s.budgets for k, s in self.searches.items()}

    @property
    def lrs_on_edge(self) -> dict[str, dict[str, list[float]]]:
        """Per kind, chosen learning rates still on an edge (empty: every choice interior)."""
        return {k: s.lrs_on_edge for k, s in self.searches.items() if s.lrs_on_edge}

    @property
    def budgets_on_edge(self) -> dict[str, dict[str, float]]:
        """Per kind, methods whose best budget is still the largest tried and still gaining beyond
        the noise (empty: none)."""
        return {k: s.budget_on_edge for k, s in self.searches.items() if s.budget_on_edge}

    @property
    def budgets_flat(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per kind, methods whose best budget is the largest tried but whose last doubling gained
        no more than one standard error: {kind: {method: {"budget", "gain", "se"}}}."""
        return {k: s.budget_flat for k, s in self.searches.items() if s.budget_flat}


def choose_dm_scale(own_logits: torch.Tensor, data: dict, select: Sequence[Problem], scales: Sequence[float],
                    klom_params: dict, contributions: dict[float, dict[str, np.ndarray]] | None = None) -> dict[str, dict]:
    """The datamodels (fit at which alpha) and their scale m per kind of forget set, chosen on its
    select sets: DM-direct's outputs become ``own - m * contribution``, and the (alpha, m) whose
    outputs have the lowest :func:`selection_score` (mean over the kind's select sets) is chosen.
    m > 1 corrects datamodels that predict too small a shift (a coherent group's removal is not
    the sum of its members' effects measured at alpha = 0.5); datamodels fit at alpha near 1 are
    the other correction. DMM matches the same outputs, so they are chosen once for both.

    contributions: {alpha: {set name: (n_all * C,)}}; by default the problems' own, under alpha
    None. Returns {kind: {"alpha", "chosen" (m), "scores" {alpha: {m: score}}, "on_edge" (m's grid)}}."""
    grid = sorted(float(m) for m in scales)
    contributions = contributions or {None: {pr.forget.name: pr.contribution for pr in select}}
    out = {}
    for kind in sorted({pr.forget.kind for pr in select}):
        scores = {}
        for alpha, by_set in contributions.items():
            for m in grid:
                pts = [score_point(predicted_logits(own_logits, m * by_set[pr.forget.name]), data["y_all"], pr.oracle_margins,
                                   pr.splits, klom_params)[0] for pr in select if pr.forget.kind == kind]
                scores[alpha, m] = float(np.mean([selection_score(pt) for pt in pts]))
        alpha, chosen = min(scores, key=scores.get)
        out[kind] = {"alpha": alpha, "chosen": chosen, "on_edge": len(grid) > 1 and chosen in (grid[0], grid[-1]),
                     "scores": {str(a): {str(m): scores[a, m] for m in grid} for a in contributions}}
    return out


def run_comparison(models: Sequence[nn.Module], own_logits: torch.Tensor, data: dict, problems: Sequence[Problem], u: dict,
                   extra: dict[str, float], contributions: dict[float, dict[str, np.ndarray]] | None = None) -> Comparison:
    """Choose the datamodels (``contributions`` by alpha, see :func:`datamodel_contributions`; by
    default the problems' own) and their scale, then every learning rate, on the select sets; then
    evaluate each reported set at the choices for its kind."""
    dm_scale = choose_dm_scale(own_logits, data, [pr for pr in problems if pr.forget.select], u["dm_scales"], u["klom"],
                               contributions)
    if edges := {k: c["chosen"] for k, c in dm_scale.items() if c["on_edge"]}:
        print(f"unlearning.dm_scales: the chosen scale sits on the grid's edge for {edges}; widen the grid")

    def chosen(pr):
        c = dm_scale[pr.forget.kind]
        return c["chosen"] * (pr.contribution if contributions is None else contributions[c["alpha"]][pr.forget.name])

    problems = [replace(pr, contribution=chosen(pr)) if pr.forget.kind in dm_scale else pr for pr in problems]
    select = [pr for pr in problems if pr.forget.select]
    searches, selected = {}, {}
    for kind in sorted({pr.forget.kind for pr in select}):
        of_kind = [pr for pr in select if pr.forget.kind == kind]
        searches[kind] = widen_until_interior(
            u["lrs"], u["budgets"], lambda plan, budgets: evaluate_methods(models, own_logits, data, of_kind, u, plan, budgets),
            [pr.forget for pr in of_kind], int(u["max_grid_extensions"]), int(u["max_budget_extensions"]), int(u["seed"]))
        selected.update(searches[kind].results)
    choices = {kind: s.choice for kind, s in searches.items()}
    for kind, s in searches.items():
        if s.lrs_on_edge:
            print(f"unlearning.lrs: after {u['max_grid_extensions']} widenings (unlearning.max_grid_extensions) these chosen "
                  f"learning rates on {kind} sets still sit on their grid's edge: {s.lrs_on_edge}")
        if s.budget_on_edge:
            print(f"unlearning.budgets: after {u['max_budget_extensions']} doublings (unlearning.max_budget_extensions) the best "
                  f"setting of these methods on {kind} sets still spends the largest budget: {s.budget_on_edge}")
    reported = {}
    for kind, choice in choices.items():
        reported.update(evaluate_methods(models, own_logits, data, [pr for pr in problems if not pr.forget.select
                                                                    and pr.forget.kind == kind], u, choice.plan(),
                                         searches[kind].budgets))
    reported = {pr.forget.name: reported[pr.forget.name] for pr in problems if not pr.forget.select}
    choice_of = {pr.forget.name: choice_for(pr.forget, choices) for pr in problems if not pr.forget.select}
    selected = {pr.forget.name: selected[pr.forget.name] for pr in select}
    return Comparison(selected, choices, reported, choice_of, summarise(reported, choice_of, extra), searches, dm_scale)


def stage_metrics(num_models: int, u: dict, attribution: Attribution, lasso: dict, comparison: Comparison,
                  extra: dict[str, float]) -> dict:
    """Everything stage ``unlearning`` writes to its metrics file."""
    return {"num_models": num_models, "direction": u["klom"]["direction"], "attribution": {
                "margin_ridge": attribution.margin_ridge, "logit_ridge": attribution.logit_ridge, "seconds": attribution.seconds,
                "lasso_check": lasso},
            "selection": {kind: {"lr_per_budget": jsonable(c.per_budget), "best": c.best} for kind, c in comparison.choices.items()},
            "lr_grids": comparison.lr_grids, "lrs_on_edge": comparison.lrs_on_edge, "budgets": comparison.budgets,
            "budgets_on_edge": comparison.budgets_on_edge, "budgets_flat": comparison.budgets_flat, "dm_scale": comparison.dm_scale,
            "extra_epochs": extra, **jsonable({k: v for k, v in comparison.summary.items() if k != "curves"}),
            "sets": jsonable(comparison.reported), "select_sets": jsonable(comparison.selected)}


def base_outputs(models: Sequence[nn.Module], ds, task, device) -> tuple[dict, torch.Tensor]:
    """The data every method is run on (``x_train``, ``y_train`` and ``x_all``, ``y_all``: training
    then test examples, on ``device``) and the base models' logits on all of it, (M, n + t, C),
    streamed in chunks of examples."""
    x_tr, y_tr, x_te, y_te = ds.tensors(device)
    data = {"x_train": x_tr, "y_train": y_tr, "x_all": torch.cat([x_tr, x_te]), "y_all": torch.cat([y_tr, y_te])}
    return data, torch.stack([raw_outputs(m, data["x_all"], data["y_all"], task) for m in models])
