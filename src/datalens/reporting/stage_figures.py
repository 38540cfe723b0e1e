"""The figures of stages fit_datamodels, attribution_comparison, modeldiff and unlearning, each
drawn from that stage's results (never inside a method): the notebooks call these and show them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datalens.core.data import Dataset
from datalens.reporting import plots


# -- fit_datamodels ---------------------------------------------------------------------------

def datamodel_figures(dm, result: dict, masks: np.ndarray, actual_mean: np.ndarray, repeats: int, ds: Dataset, pairs,
                      proj: np.ndarray, seed: int, fig: Path) -> None:
    """Growth with the number of models, predicted vs actual on held-out models, sparsity, top
    training images of sampled targets, the leakage pairs and the embedding's extreme targets."""
    growth = {int(k): v for k, v in result["growth"].items()}
    plots.line(list(growth), {k: [g[k] for g in growth.values()] for k in ("lds_mean", "lds_single", "per_target_pearson_mean", "pearson_mean")},
               fig / "growth.png", "training models", "score on held-out models", logx=True)
    plots.scatter_predicted_actual(dm.predict(masks).ravel(), actual_mean.ravel(), fig / "predicted_vs_actual.png",
                                   title=f"held-out: pooled r = {result['pearson_mean']:.3f}, per target {result['per_target_pearson_mean']:.3f}",
                                   xlabel="datamodel prediction", ylabel=f"actual margin (mean of {repeats})")
    plots.histogram((dm.weight != 0).sum(0), fig / "sparsity.png", "non-zero weights per target")
    sampled = np.random.default_rng(seed).choice(ds.n_test, 4, replace=False)
    plots.top_attributed(dm.weight, sampled, ds.images_test, ds.images_train, ds.y_test, ds.y_train, fig / "top_training_images.png")
    imgs, titles = [], []
    for i, t in pairs:
        imgs += [ds.images_test[t], ds.images_train[i]]
        titles += [f"test #{t}", f"train #{i} w={dm.weight[i, t]:.2f}"]
    plots.image_grid(imgs, titles, fig / "leakage_pairs.png", ncols=4)
    imgs, titles = [], []
    for c in range(2):
        order = np.argsort(proj[:, c])
        for t in list(order[-6:][::-1]) + list(order[:6]):
            imgs.append(ds.images_test[t])
            titles.append(f"PC{c + 1} {proj[t, c]:+.2f}")
    plots.image_grid(imgs, titles, fig / "embedding_components.png", ncols=12)


# -- modeldiff --------------------------------------------------------------------------------

def planted_figures(a_minus_b, b_minus_a, chosen: int, auroc: float, ds: Dataset, fig: Path) -> None:
    planted = ds.planted
    plots.variance_scatter({"A minus B": (a_minus_b.variance_a, a_minus_b.variance_b), "B minus A": (b_minus_a.variance_a, b_minus_a.variance_b)},
                           fig / "planted_variance.png", "A (blanks the patch)", "B (sees it)")
    truth = np.zeros(ds.n_train, bool)
    truth[planted] = True
    plots.roc_curve(np.abs(b_minus_a.components[chosen]), truth, fig / "planted_recovery_roc.png",
                    f"B minus A, direction {chosen + 1}: AUROC {auroc:.3f}")
    pos, neg = b_minus_a.top_training_examples(chosen, 8)
    plots.image_grid([ds.images_train[i] for i in [*pos, *neg]],
                     [f"{'*' if i in planted else ''}+{b_minus_a.components[chosen][i]:.2f}" if j < 8 else f"{b_minus_a.components[chosen][i]:.2f}"
                      for j, i in enumerate([*pos, *neg])], fig / "planted_top_training.png", ncols=8)
    tops = b_minus_a.top_targets(chosen, 8)
    plots.image_grid([ds.images_test[t] for t in tops], [f"test #{t} y={ds.y_test[t]}" for t in tops], fig / "planted_top_targets.png", ncols=8)


def patch_figure(effects: dict, md: dict, fig: Path) -> None:
    patch = md["patch"]
    xs = [f * patch["value"] for f in md["patch_intensities"]]
    plots.dose_response(xs, {n: [e["probability_change"] for e in effects[n]] for n in effects}, fig / "planted_dose_response.png",
                        "patch value (standardised units)", f"change in p(class {patch['label']})", "patch on test images of other classes")


def natural_figures(n_a, n_b, base: Dataset, cos: dict, fig: Path) -> None:
    plots.variance_scatter({"A minus B": (n_a.variance_a, n_a.variance_b), "B minus A": (n_b.variance_a, n_b.variance_b)},
                           fig / "natural_variance.png", "A (weight decay)", "B (none)")
    imgs, titles = [], []
    for label, dirs in (("A-B", n_a), ("B-A", n_b)):
        pos, neg = dirs.top_training_examples(0, 6)
        imgs += [base.images_train[i] for i in [*pos, *neg]]
        titles += ([f"{label} +{dirs.components[0][i]:.2f} y={base.y_train[i]}" for i in pos]
                   + [f"{label} {dirs.components[0][i]:.2f} y={base.y_train[i]}" for i in neg])
    plots.image_grid(imgs, titles, fig / "natural_top_training.png", ncols=12)
    imgs, titles = [], []
    for label, dirs in (("A-B", n_a), ("B-A", n_b)):
        imgs += [base.images_test[t] for t in dirs.top_targets(0, 6)]
        titles += [f"{label} test #{t} y={base.y_test[t]}" for t in dirs.top_targets(0, 6)]
    plots.image_grid(imgs, titles, fig / "natural_top_targets.png", ncols=6)
    plots.histograms(cos, fig / "per_target_cosine.png", "cosine of a target's attributions under the two algorithms")


def blend_figure(nat: dict, md: dict, fig: Path) -> None:
    first, second = nat["first"], nat["second"]
    curves = {}
    for key, where in (("toward_contrasted_class", f"{second}s"), ("toward_other_classes", "the rest")):
        effects = nat["intervention"][key]
        curves.update({f"{'A (weight decay)' if n == 'natural_a' else 'B (none)'} toward {where}": [e["margin_change"] for e in effects[n]]
                       for n in effects})
    plots.dose_response(md["blend_intensities"], curves, fig / "natural_blend_response.png", f"blend toward the mean {second}",
                        f"change in the margin of test {first}s", f"test {first}s blended toward {second}s")


# -- attribution_comparison -------------------------------------------------------------------

def comparison_figures(cmp, proj_dims: list[int], num_models: list[int], ridge_grid: list[float], ds: Dataset, seed: int,
                       fig: Path) -> None:
    """LDS against charged compute, TRAK's ablations over k, M, the ridge and soft-thresholding,
    and TRAK's top-attributed images of sampled targets."""
    recs, k_max = cmp.records, max(proj_dims)
    plots.lds_vs_compute(recs, fig / "lds_vs_compute.png", trak_proj_dim=k_max, caption=cmp.caption())
    trak_recs = [r for r in recs if r["method"] == "trak"]
    plots.line(num_models, {f"k={k}": [r["lds"] for r in trak_recs if r["proj_dim"] == k] for k in proj_dims},
               fig / "trak_ablation_k_M.png", "models ensembled (M)", "LDS", "TRAK: projection dimension and models", logx=True)
    top = next(r for r in trak_recs if r["proj_dim"] == k_max and r["models_used"] == max(num_models))
    plots.line(ridge_grid, {"evaluation LDS": list(top["eval_lds_by_ridge"].values()), "validation LDS": list(top["val_lds_by_ridge"].values())},
               fig / "trak_ablation_ridge.png", "ridge (relative to trace / k)", "LDS", f"TRAK M={top['models_used']}, k={k_max}", logx=True)
    plots.line(num_models, {"no threshold": [r["lds"] for r in trak_recs if r["proj_dim"] == k_max],
                            "soft threshold (chosen on validation)": [r["lds_soft_threshold"] for r in trak_recs if r["proj_dim"] == k_max]},
               fig / "trak_soft_threshold.png", "models ensembled (M)", "LDS", "TRAK soft-thresholding", logx=True)
    rng = np.random.default_rng(seed)
    scored = np.arange(ds.n_test) if cmp.ground.targets is None else cmp.ground.targets  # test example of each score column
    plots.top_attributed(cmp.scores[("trak", top["models_used"], k_max)], rng.choice(len(scored), 4, replace=False),
                         ds.images_test[scored], ds.images_train, ds.y_test[scored], ds.y_train, fig / "trak_top_images.png",
                         target_ids=scored)


# -- clip -------------------------------------------------------------------------------------

def clip_figures(cmp, summary: dict, top_scores: dict[str, np.ndarray], shown: np.ndarray, ds: Dataset, caption_of, fig: Path,
                 k: int = 4) -> None:
    """LDS against charged compute, the counterfactual cosine drops against k, and for the
    ``shown`` score columns each method's top-attributed training pairs (image and caption):
    ``top_scores`` {method: (n, t)}; ``caption_of(tokens)`` renders a caption."""
    plots.lds_vs_compute(cmp.records, fig / "lds_vs_compute.png", trak_proj_dim=max(r.get("proj_dim") or 0 for r in cmp.records),
                         caption=cmp.caption())
    curves = summary["counterfactual"]
    plots.dose_response([c["k"] for c in next(iter(curves.values()))], curves, fig / "counterfactual_cosine_drop.png",
                        "training pairs removed (k)", "drop in the pair's cosine similarity",
                        "Remove the top-k, retrain: mean and 95% interval")
    scored = np.arange(ds.n_test) if cmp.ground.targets is None else cmp.ground.targets
    imgs, titles = [], []
    for col in shown:
        t = scored[col]
        for method, scores in top_scores.items():
            imgs.append(ds.images_test[t]); titles.append(f"test #{t} ({method})\n{caption_of(ds.y_test[t])}")
            for i in np.argsort(-scores[:, col], kind="stable")[:k]:
                imgs.append(ds.images_train[i]); titles.append(f"{scores[i, col]:+.3g}\n{caption_of(ds.y_train[i])}")
    plots.image_grid(imgs, titles, fig / "top_attributed_pairs.png", ncols=1 + k, size=2.0)


# -- fact_tracing -----------------------------------------------------------------------------

def fact_tracing_figures(cmp, summary: dict, top_scores: dict[str, np.ndarray], shown: int, train_texts: list[str],
                         query_texts: list[str], relevant: list, fig: Path, k: int = 6) -> None:
    """LDS against charged compute; MRR and recall at 10 per method; the counterfactual drops in
    answer probability and recall against k; and for the ``shown`` score column each method of
    ``top_scores`` {method: (n, t)}'s top-k training sentences, the ground truth (``relevant``
    per column) marked."""
    plots.lds_vs_compute(cmp.records, fig / "lds_vs_compute.png", trak_proj_dim=max(r.get("proj_dim") or 0 for r in cmp.records),
                         caption=cmp.caption())
    table = summary["retrieval"]
    plots.grouped_bars({metric: {m: table[m][metric] for m in table} for metric in next(iter(table.values()))}, fig / "retrieval.png",
                       "score", caption="Retrieval of the sentences that state each query's fact, over every query.")
    for measure, label in (("answer_probability", "drop in the answer's probability"), ("recall", "drop in the fraction of models recalling it")):
        curves = summary["counterfactual"][measure]
        plots.dose_response([c["k"] for c in next(iter(curves.values()))], curves, fig / f"counterfactual_{measure}.png",
                            "training sentences removed (k)", label, "Remove the top-k, retrain: mean and 95% interval")
    columns = {method: [(train_texts[i], float(s[i, shown]), bool(i in relevant[shown])) for i in np.argsort(-s[:, shown], kind="stable")[:k]]
               for method, s in top_scores.items()}
    plots.ranked_texts(query_texts[shown], columns, fig / "top_sentences.png")


# -- text_classification ----------------------------------------------------------------------

def text_classification_figures(cmp, top_scores: dict[str, np.ndarray], shown: int, texts: tuple[list[str], list[str]] | None,
                                facts: tuple[np.ndarray, np.ndarray] | None, fig: Path, k: int = 6) -> None:
    """LDS against charged compute and, where the dataset gives its pairs' ``texts`` (training,
    scored test pairs), the ``shown`` test pair's top-k training pairs by each method of
    ``top_scores`` {method: (n, t)}, those about the same subject (``facts``) marked."""
    plots.lds_vs_compute(cmp.records, fig / "lds_vs_compute.png", trak_proj_dim=max(r.get("proj_dim") or 0 for r in cmp.records),
                         caption=cmp.caption())
    if texts is None:
        return
    train, test = texts
    same = (lambda i: bool(facts[0][i] == facts[1][shown])) if facts is not None else (lambda i: False)  # noqa: E731
    columns = {method: [(train[i], float(s[i, shown]), same(i)) for i in np.argsort(-s[:, shown], kind="stable")[:k]]
               for method, s in top_scores.items()}
    plots.ranked_texts(test[shown], columns, fig / "top_pairs.png", mark="same subject")


# -- unlearning -------------------------------------------------------------------------------

def unlearning_figures(summary: dict, pooled: dict, histogram: tuple, hist_set: str, u: dict, num_models: int,
                       subset_models: int, fig: Path):
    """KLoM against compute (returned, for the notebook to show), KLoM distributions, margin
    histograms of the forget examples of ``hist_set`` and accuracies."""
    direction = "KL(unlearned || oracle)" if u["klom"]["direction"] == "unlearned_oracle" else "KL(oracle || unlearned)"
    klom_fig = plots.klom_vs_compute(
        summary["curves"], summary["floor_p95"], summary["ceiling_p95"], summary["direct_p95"], fig / "klom_vs_compute.png",
        caption=f"KLoM = {direction} of margins over {num_models} models per example. Learning rates chosen per budget on the select sets. "
                f"Not on the x axis: OM trains {u['om_oracles']} oracles per forget set; DMM and DM-direct fit datamodels on "
                f"{subset_models} subset models, once for every set.")
    plots.klom_distributions(pooled, fig / "klom_distributions.png",
                             caption="Per-example KLoM of each method at its chosen setting, pooled over the reported forget sets.")
    oracle_m, unlearned_m, titles = histogram
    plots.margin_histograms(oracle_m, unlearned_m, titles, fig / "margin_histograms.png",
                            caption=f"Margins over models on the forget examples of {hist_set} that do nothing leaves furthest from the oracles.")
    plots.grouped_bars(summary["accuracy"], fig / "accuracy.png", ylabel="accuracy",
                       caption="Mean accuracy over models and reported forget sets, each method at its chosen setting, and the oracles'.")
    return klom_fig


# -- diffusion --------------------------------------------------------------------------------

def _as_image(ds: Dataset, x) -> np.ndarray:
    """A model input in [-1, 1] (flat or (C, H, W)) as the dataset's displayable image in [0, 1]."""
    shape = ds.images_train.shape[1:]
    image = np.asarray(x).reshape(shape) if len(shape) == 2 else np.asarray(x).reshape(shape[-1], *shape[:2]).transpose(1, 2, 0)
    return ((image + 1) / 2).clip(0, 1)


def diffusion_figures(cmp, summary: dict, traj: dict, ds: Dataset, step_scores: np.ndarray, train_labels: np.ndarray, fig: Path,
                      k: int = 5) -> None:
    """Generated samples; LDS against charged compute (each TRAK variant and K a line) and against
    K; for the attributed trajectories, each step's state, x_0 prediction and top-k training images
    by ``step_scores`` (n, trajectories x steps); the share of the top images of the final
    sample's class along the trajectory; the counterfactual's class changes and distances against
    the step. ``traj``: :func:`datalens.tasks.diffusion.sample`'s output for every generated sample."""
    generated = len(traj["final"])
    shown = min(generated, 30)
    plots.image_grid(list(ds.images_test[-generated:][:shown]), [f"sample {j}" for j in range(shown)], fig / "generated_samples.png", ncols=10)
    named = [{**r, "method": f"{r['method']} K={r['timesteps']}"} if r.get("timesteps") else r for r in cmp.records]
    plots.lds_vs_compute(named, fig / "lds_vs_compute.png", caption=cmp.caption())
    rows = [r for r in summary["lds_table"] if r["timesteps"] is not None]
    ks = sorted({r["timesteps"] for r in rows})
    top_m = max(r["models"] for r in rows)
    curves = {f"{m} on {g}": [next(r[f"lds_{g}"] for r in rows if r["method"] == m and r["timesteps"] == t and r["models"] == top_m) for t in ks]
              for m in sorted({r["method"] for r in rows}) for g in summary["ceiling"]}
    plots.line(ks, curves, fig / "lds_vs_timesteps.png", "timesteps K summed in TRAK's gradients", f"LDS (held-out models), M = {top_m}",
               logx=True)
    st = summary["stepwise"]
    steps, top = st["steps"], np.asarray(st["top"])
    imgs, titles = [], []
    for j in range(min(len(top), 3)):
        for i, s in enumerate(steps):
            imgs += [_as_image(ds, traj["states"][j, s]), _as_image(ds, traj["x0"][j, s])]
            titles += [f"sample {j}: x at step {s}", "its x0 prediction"]
            for idx in top[j, i, :k]:
                imgs.append(ds.images_train[idx]); titles.append(f"#{idx} ({train_labels[idx]}) {step_scores[idx, j * len(steps) + i]:+.2g}")
    plots.image_grid(imgs, titles, fig / "stepwise_attribution.png", ncols=2 + k, size=1.5)
    plots.line(steps, {f"top-{st['k']} training images of the final sample's class": st["same_class"],
                       "share of that class in the training set": [st["same_class_chance"]] * len(steps)},
               fig / "stepwise_same_class.png", "sampling step (of the schedule; high = noisy)", "fraction")
    cf_steps = list(next(iter(next(iter(summary["counterfactual"].values())).values())))
    for measure, label in (("class_changed", "class changed (fraction)"), ("distance", "L2 distance to the full-data sample"),
                           ("moved_away", "farther from the removed images by")):
        series = {f"{method}, k = {kk}": [by_s[s][measure] for s in cf_steps] for method, by_k in summary["counterfactual"].items()
                  for kk, by_s in by_k.items()}
        plots.dose_response([int(s) for s in cf_steps], series, fig / f"counterfactual_{measure}.png",
                            "sampling step whose top images are removed", label, "Retrained, resampled from x_s (95% interval)")
