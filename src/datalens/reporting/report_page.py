"""The report of the thesis's figures (stage ``report``): every figure the stages drew, with a
caption that sets the number measured here beside the published one (``docs/published.yaml``,
never numbers in code), a summary table of headline metrics, rendered into one self-contained
HTML page that opens offline."""
from __future__ import annotations

import base64
import datetime
import html
import json
import re
import subprocess
from pathlib import Path

import nbformat
import yaml
from nbconvert import HTMLExporter
from nbconvert.preprocessors import TagRemovePreprocessor

from datalens.reporting.reports import best_record, mean_p95


NOTEBOOKS = {"train_subsets": "01_train_subsets", "eval_models": "02_eval_models", "fit_datamodels": "03_fit_datamodels",
             "counterfactuals": "04_counterfactuals", "attribution_comparison": "05_attribution_comparison",
             "modeldiff": "06_modeldiff", "unlearning": "07_unlearning", "clip": "09_clip",
             "fact_tracing": "10_fact_tracing", "text_classification": "11_text_classification", "diffusion": "12_diffusion"}
SECTIONS = [("Datamodels", ("train_subsets", "eval_models", "fit_datamodels", "counterfactuals")),
            ("TRAK and the method comparison", ("attribution_comparison",)),
            ("TRAK for contrastive image-text models (CLIP)", ("clip",)),
            ("TRAK for language models: fact tracing", ("fact_tracing",)),
            ("TRAK for language models: text classification", ("text_classification",)),
            ("TRAK for diffusion models", ("diffusion",)),
            ("ModelDiff", ("modeldiff",)),
            ("Unlearning", ("unlearning",))]
NOTEBOOK_ONLY = "notebook-only"  # a cell tag: left out of the rendered page
SCALE = "Here: scikit-learn digits and a one-hidden-layer MLP on 2 CPU cores; there: CIFAR-10 and ResNet-9."


def _unlearning_line(m: dict) -> str:
    names = {"floor": "floor", "do_nothing": "do nothing", "gd": "GD", "ga": "GA", "ascent_descent": "ascent-descent",
             "scrub": "SCRUB", "om": "OM", "dmm": "DMM", "dm_direct": "DM-direct"}
    return "forget-set KLoM p95, mean over reported sets: " + ", ".join(f"{v} {mean_p95(m, k):.2f}" for k, v in names.items())


def _clip_drops(m: dict) -> str:
    curves = m["counterfactual"]
    ks = [c["k"] for c in curves["trak"]]
    return "mean cosine drop at k = " + " / ".join(map(str, ks)) + ": " + "; ".join(
        f"{name.replace('_', ' ')} " + " / ".join(f"{c['mean']:.3f}" for c in curve) for name, curve in curves.items())


def _named(method: str) -> str:
    return {"trak": "TRAK", "bm25": "BM25", "tracin": "TracIn", "ekfac_influence": "EK-FAC influence"}.get(method, method.replace("_", " "))


def _section_lds(m: dict, rivals: dict[str, str]) -> str:
    """A section stage's LDS line: TRAK's best (with its M and k), datamodels', each rival's best
    ({method: name}) and the noise ceiling, then the accounting."""
    best = best_record(m, "trak")
    dm = best_record(m, "datamodels")["lds"] if "datamodels" in m["best_lds"] else float("nan")
    return (f"TRAK best {best['lds']:.3f} (M = {best['models_used']}, k = {best['proj_dim']}); datamodels {dm:.3f}; "
            + "; ".join(f"{name} {best_record(m, method)['lds']:.3f}" for method, name in rivals.items())
            + f"; noise ceiling against the mean of the repeats {m.get('mean_ceiling', float('nan')):.3f}. {m['accounting']}")


def _diffusion_lds(m: dict) -> str:
    """Stage diffusion's LDS line: each TRAK output's best on validation images and on generated
    samples (with its M and K), the baselines' best, and each group's noise ceiling."""
    rows = m["lds_table"]
    parts = []
    for method, name in (("trak_loss", "TRAK (loss)"), ("trak_square_norm", "D-TRAK (squared norm)"),
                         ("trak_loss_to_square_norm", "TRAK, loss to squared norm")):
        for group in m["ceiling"]:
            best = max((r for r in rows if r["method"] == method), key=lambda r: r[f"lds_{group}"], default=None)
            if best:
                parts.append(f"{name} on {group} {best[f'lds_{group}']:.3f} (M = {best['models']}, K = {best['timesteps']})")
    parts += [f"{_named(k)} {v:.3f}" for k, v in m["best_lds"].items() if not k.startswith("trak")]
    boot = m["bootstrap"]
    ceilings = ", ".join(f"{g} {c['mean_ceiling']:.3f} (seed agreement {c['seed_agreement']:.3f} ± {boot[g]['seed_agreement_se']:.3f})"
                         for g, c in m["ceiling"].items())
    spread = ", ".join(f"{g} ± {b['lds_se']:.3f}" for g, b in boot.items())
    return ("; ".join(parts) + f"; noise ceiling against the mean of the repeats: {ceilings}. The held-out masks alone move TRAK's "
            f"best LDS by {spread} (standard deviations over {next(iter(boot.values()))['draws']} resamplings of the masks). {m['accounting']}")


def _diffusion_steps(m: dict) -> str:
    st = m["stepwise"]
    return (f"share of the top {st['k']} training images with the final sample's class, by step " + ", ".join(
        f"{s}: {v:.2f}" for s, v in zip(st["steps"], st["same_class"])) + f" (that class's share of the training set: "
        f"{st['same_class_chance']:.2f}); overlap of consecutive steps' top {st['k']}: " + ", ".join(f"{v:.2f}" for v in st["overlap_with_next"]))


def _diffusion_counterfactual(m: dict, measure: str) -> str:
    return "; ".join(f"{method} (k = {k}): " + ", ".join(f"step {s} {v[measure]['mean']:.3f}" for s, v in by_s.items())
                     for method, by_k in m["counterfactual"].items() for k, by_s in by_k.items())


def _fact_drops(m: dict) -> str:
    out = []
    for measure, label in (("answer_probability", "answer probability"), ("recall", "recall")):
        curves = m["counterfactual"][measure]
        ks = [c["k"] for c in curves["trak"]]
        out.append(f"mean drop in {label} at k = " + " / ".join(map(str, ks)) + ": " + "; ".join(
            f"{_named(name)} " + " / ".join(f"{c['mean']:.3f}" for c in curve)
            for name, curve in curves.items()))
    return ". ".join(out) + f" (full-data recall of these queries {m['counterfactual_full_data']['recall']:.2f})"


def _trak_at(m: dict, models_used: int) -> float:
    k = max(r["proj_dim"] for r in m["records"] if r["method"] == "trak")
    return next(r["lds"] for r in m["records"] if r["method"] == "trak" and r["proj_dim"] == k and r["models_used"] == models_used)


# (stage, file, what it shows, what it mirrors, measured here (from the stage's metrics), published keys)
FIGURES = [
    ("train_subsets", "test_accuracy.png", "Test accuracy of every subset model (alpha = 0.5).", "the ground truth of every later figure",
     lambda m: f"{m['num_models']} models, mean accuracy {m['test_accuracy_mean']:.3f} ± {m['test_accuracy_std']:.3f}", []),
    ("train_subsets", "margin_distributions.png", "Margins of a few test examples across subset models.", "datamodels paper, Section 2",
     lambda m: f"the least certain target is test #{m['example_target']}", []),
    ("train_subsets", "with_without.png", "Mean margin of one target over models with and without one training example.",
     "datamodels paper, Section 2 (the effect a datamodel weight estimates)",
     lambda m: f"{m['example_margin_with']:.2f} with vs {m['example_margin_without']:.2f} without", []),
    ("eval_models", "test_accuracy.png", "Test accuracy of the held-out evaluation models (fresh masks).", "the LDS ground truth",
     lambda m: f"{m['num_models']} models; seed agreement {m.get('seed_agreement', float('nan')):.3f}", []),
    ("fit_datamodels", "predicted_vs_actual.png", "Datamodel predictions against actual margins on held-out models.",
     "datamodels paper, Figure 3 (prediction quality)",
     lambda m: f"pooled Spearman {m['spearman_mean']:.3f} (mean of seeds), {m['spearman_single']:.3f} (single models); "
               f"per-target Pearson {m['per_target_pearson_mean']:.3f}", ["datamodels_spearman_mean", "datamodels_spearman_single"]),
    ("fit_datamodels", "growth.png", "Datamodel quality against the number of training models.", "datamodels paper, sample-size study",
     lambda m: "LDS " + " / ".join(f"{v['lds_mean']:.2f}" for v in m["growth"].values()) + " at " + " / ".join(m["growth"]) + " models", []),
    ("fit_datamodels", "sparsity.png", "Non-zero weights per target.", "datamodels paper (sparse datamodels)",
     lambda m: f"mean {m['mean_nonzero_weights']:.0f} non-zero weights", []),
    ("fit_datamodels", "top_training_images.png", "Test images with their most positive and negative training examples.",
     "datamodels paper, nearest-neighbour grids", lambda m: "", []),
    ("fit_datamodels", "leakage_pairs.png", "Train-test pairs with the largest weights.", "datamodels paper, train-test leakage",
     lambda m: f"top weight {m['top_pair_weight']:.2f}, pixel distance {m['top_pair_pixel_distance']:.3f} "
               f"(median nearest same-class distance {m['median_pixel_distance_same_class']:.3f})", []),
    ("fit_datamodels", "embedding_components.png", "Test images at the extremes of the first two principal components of datamodel weights.",
     "datamodels paper, datamodel embeddings", lambda m: f"explained variance {m['pca_explained_variance'][0]:.3f}, {m['pca_explained_variance'][1]:.3f}", []),
    ("counterfactuals", "counterfactual_predicted_vs_actual.png", "Predicted against actual margin change after removing k training examples.",
     "datamodels paper, counterfactual removals",
     lambda m: ", ".join(f"{k}: r = {v['pearson']:.2f}" for k, v in m["agreement"].items()), []),
    ("counterfactuals", "brittleness.png", "Fraction of test predictions flipped by removing at most k examples, predicted and confirmed.",
     "datamodels paper, data support / brittleness",
     lambda m: f"at k = {list(m['brittleness']['fraction_flipped_predicted'])[-1]}: predicted "
               f"{list(m['brittleness']['fraction_flipped_predicted'].values())[-1]:.3f}, confirmed "
               f"{list(m['brittleness']['fraction_flipped_confirmed'].values())[-1]:.3f}", []),
    ("attribution_comparison", "lds_vs_compute.png", "LDS of every method against charged compute.", "TRAK paper, Figure 1",
     lambda m: f"TRAK best {best_record(m, 'trak')['lds']:.3f}; datamodels best {best_record(m, 'datamodels')['lds']:.3f}; "
               f"TRAK from 1 model {_trak_at(m, 1):.3f}; influence functions {best_record(m, 'influence_cg')['lds']:.3f}; "
               f"TracIn {best_record(m, 'tracin')['lds']:.3f}. {m['accounting']}",
     ["trak_lds_1_model", "trak_lds_100_models", "datamodels_lds_best", "influence_lds", "tracin_lds"]),
    ("attribution_comparison", "trak_ablation_k_M.png", "TRAK's LDS against models ensembled, per projection dimension.",
     "TRAK paper, ablations over k and M", lambda m: f"best {best_record(m, 'trak')['lds']:.3f} at k = {best_record(m, 'trak')['proj_dim']}", []),
    ("attribution_comparison", "trak_ablation_ridge.png", "TRAK's LDS against the ridge, on validation and evaluation models.",
     "this repo's ridge (not in the paper)", lambda m: "", []),
    ("attribution_comparison", "trak_soft_threshold.png", "TRAK with and without soft-thresholding chosen on validation models.",
     "TRAK paper, Algorithm 1 (soft-thresholding)", lambda m: "", []),
    ("attribution_comparison", "trak_top_images.png", "Test images with their top TRAK-attributed training examples.",
     "TRAK paper, qualitative examples", lambda m: "", []),
    ("clip", "lds_vs_compute.png", "LDS of every method against charged compute, for two-tower models trained by InfoNCE on the "
     "digits paired with captions; the output is the CLIP output of each test pair against 15 fixed negatives.",
     "TRAK paper, CLIP on MS COCO (LDS of TRAK against the baselines)",
     lambda m: _section_lds(m, {"tracin": "TracIn", "grad_dot": "gradient dot product", "embedding_similarity": "embedding similarity"}),
     ["trak_clip_lds"]),
    ("clip", "counterfactual_cosine_drop.png", "Drop in a test pair's cosine similarity after removing its top-k training pairs "
     "by TRAK, by embedding similarity or at random and retraining on the rest (mean and 95% interval over targets and seeds).",
     "TRAK paper, CLIP counterfactual", _clip_drops, ["trak_clip_counterfactual"]),
    ("clip", "top_attributed_pairs.png", "Test pairs with their top training pairs by TRAK and by embedding similarity (image and caption).",
     "TRAK paper, CLIP qualitative examples", lambda m: "", []),
    ("fact_tracing", "lds_vs_compute.png", "LDS of every method against charged compute, for small causal transformers trained "
     "on sentences stating facts from ISO 3166-2; the output is each query's answer margin.",
     "TRAK paper, fact tracing with mT5 (LDS is not reported there)",
     lambda m: _section_lds(m, {"bm25": "BM25", "tracin": "TracIn"}), []),
    ("fact_tracing", "retrieval.png", "How well each method ranks the sentences that state a query's fact first (MRR, recall at 10).",
     "TRAK paper and FTRACE-TREx (Akyurek et al.): retrieval of a fact's proponents",
     lambda m: "MRR / recall at 10: " + ", ".join(f"{_named(k)} {v['mrr']:.3f} / {v['recall_at_10']:.3f}" for k, v in m["retrieval"].items()),
     ["ftrace_mrr_bm25", "ftrace_mrr_tracin", "ftrace_mrr_embedding", "trak_fact_tracing_mrr"]),
    ("fact_tracing", "counterfactual_answer_probability.png", "Drop in the answer's probability after removing a query's top-k "
     "sentences by TRAK, by BM25 or at random and retraining (mean and 95% interval over queries and seeds).",
     "TRAK paper, fact-tracing counterfactual", _fact_drops, ["trak_fact_tracing_counterfactual"]),
    ("fact_tracing", "counterfactual_recall.png", "Drop in the fraction of retrained models that still recall the fact.",
     "TRAK paper, fact-tracing counterfactual", lambda m: "", []),
    ("fact_tracing", "top_sentences.png", "A query with its top training sentences by TRAK, BM25 and embedding similarity; the "
     "sentences that state its fact are marked.", "TRAK paper, fact-tracing qualitative examples", lambda m: "", []),
    ("text_classification", "lds_vs_compute.png", "LDS of every method against charged compute, for small transformer encoders "
     "trained from scratch on question-sentence pairs from the fact corpus (does the sentence answer the question?); the output "
     "is each test pair's classification margin.", "TRAK paper, BERT fine-tuned on QNLI (LDS of TRAK against the baselines)",
     lambda m: _section_lds(m, {"ekfac_influence": "EK-FAC influence", "tracin": "TracIn", "grad_dot": "gradient dot product",
                                "embedding_similarity": "embedding similarity"}), ["trak_qnli_lds"]),
    ("text_classification", "top_pairs.png", "A test pair with its top training pairs by TRAK, EK-FAC influence and embedding "
     "similarity; the pairs about the same subject are marked.", "TRAK paper, qualitative examples",
     lambda m: "share of the top 5 about the test pair's subject: " + ", ".join(
         f"{_named(k)} {v['top_k']:.2f}" for k, v in m.get("same_subject_top5", {}).items())
     + (f" (all training pairs: {next(iter(m['same_subject_top5'].values()))['chance']:.3f})" if m.get("same_subject_top5") else ""), []),
    ("diffusion", "generated_samples.png", "Samples of the reference DDPM (trained on every training image): the generated targets.",
     "Journey and D-TRAK papers, generated samples",
     lambda m: "classes the fixed classifier gives them: " + ", ".join(f"{c}: {n}" for c, n in enumerate(m["generated_classes"]) if n), []),
    ("diffusion", "lds_vs_compute.png", "LDS of every method against charged compute, for small DDPMs on the digits; the output is "
     "each target's denoising loss at fixed noise, TRAK's with the loss or D-TRAK's squared norm as the output, at K timesteps.",
     "D-TRAK paper, LDS of TRAK and D-TRAK (CIFAR-2, validation and generated images)", _diffusion_lds,
     ["dtrak_trak_lds_k10_validation", "dtrak_trak_lds_k100_validation", "dtrak_trak_lds_k100_generated",
      "dtrak_square_lds_k10_validation", "dtrak_square_lds_k100_validation", "dtrak_square_lds_k100_generated"]),
    ("diffusion", "lds_vs_timesteps.png", "LDS against the number of timesteps K whose gradients TRAK sums, per output and target group.",
     "D-TRAK paper, K = 10 against K = 100", lambda m: "", []),
    ("diffusion", "stepwise_attribution.png", "Generated samples step by step: the state x_s, the model's x_0 prediction at s and the "
     "top training images attributed to that step (label and score).", "Journey paper, step-wise attribution", _diffusion_steps,
     ["journey_steps"]),
    ("diffusion", "stepwise_same_class.png", "Share of the top training images at each step that have the final sample's class.",
     "Journey paper, where features are decided", lambda m: "", []),
    ("diffusion", "counterfactual_class_changed.png", "Remove the top-k training images attributed at a step (or k at random), retrain, "
     "resample from the same x_s with the same noise: how often the fixed classifier's class of the final sample changes, against "
     "the full-data model of the same seed.", "Journey paper, counterfactual resampling",
     lambda m: _diffusion_counterfactual(m, "class_changed"), ["journey_counterfactual"]),
    ("diffusion", "counterfactual_distance.png", "The same counterfactual: L2 distance of the new final sample to the full-data model's.",
     "Journey paper, counterfactual resampling", lambda m: _diffusion_counterfactual(m, "distance"), []),
    ("diffusion", "counterfactual_moved_away.png", "The same counterfactual: how much farther the new final sample is from the removed "
     "images than the full-data model's (mean over them of the change in L2 distance).", "Journey paper, counterfactual resampling",
     lambda m: _diffusion_counterfactual(m, "moved_away"), []),
    ("modeldiff", "accuracy.png", "Mean test accuracy of every algorithm ModelDiff compares.", "ModelDiff paper, case-study setup",
     lambda m: ", ".join(f"{k} {v:.3f}" for k, v in m["accuracy"].items()), []),
    ("modeldiff", "planted_variance.png", "Explained variance of each distinguishing direction under A and under B (planted patch).",
     "ModelDiff paper, explained-variance plots",
     lambda m: f"B minus A, direction 1: {m['planted']['variance_b'][0]:.4f} under B vs {m['planted']['variance_a'][0]:.4f} under A", []),
    ("modeldiff", "planted_recovery_roc.png", "How well the direction's weights find the planted training images.", "a ground truth the paper does not have",
     lambda m: "AUROC {auroc:.3f}, precision {precision_at_planted:.2f}".format(**m["planted"]) + f", swap-null p = {m['planted']['null']['p_value']:.3f}", []),
    ("modeldiff", "planted_top_training.png", "Training images with the largest weights in the leading direction (* planted).",
     "ModelDiff paper, top training examples of a direction", lambda m: "", []),
    ("modeldiff", "planted_top_targets.png", "Test images whose residual projects most strongly on the leading direction.",
     "ModelDiff paper, top targets of a direction", lambda m: f"{m['planted'].get('top_targets_with_patch', float('nan')):.0%} carry the patch", []),
    ("modeldiff", "planted_dose_response.png", "Change in the probability of the patch's class when the patch is stamped on test images of other classes.",
     "ModelDiff paper, counterfactual verification (SGD-noise case study)",
     lambda m: "B: " + " / ".join(f"{e['probability_change']['mean']:+.3f}" for e in m["planted"]["intervention"]["planted_b"])
               + "; A: " + " / ".join(f"{e['probability_change']['mean']:+.3f}" for e in m["planted"]["intervention"]["planted_a"]),
     ["modeldiff_patch_low_noise", "modeldiff_patch_high_noise"]),
    ("modeldiff", "control_variance.png", "Negative control: the same algorithm with two seed streams.", "a control the paper does not report",
     lambda m: f"largest variance ratio {m['control']['null']['largest_variance_ratio']:.2f} (model-swap null 95th percentile "
               f"{m['control']['null']['null_p95']:.2f}, p = {m['control']['null']['p_value']:.2f})", []),
    ("modeldiff", "natural_variance.png", "Explained variance of the directions distinguishing weight decay from none.", "ModelDiff paper, explained-variance plots",
     lambda m: f"most asymmetric: {m['natural']['inferred']['residual']}, contrasting classes {m['natural']['inferred']['contrasts_classes']}", []),
    ("modeldiff", "natural_top_training.png", "Training images at the extremes of the leading directions (weight decay vs none).",
     "ModelDiff paper, top training examples", lambda m: "", []),
    ("modeldiff", "natural_top_targets.png", "Test images projecting most strongly on the leading directions.", "ModelDiff paper, top targets", lambda m: "", []),
    ("modeldiff", "per_target_cosine.png", "Cosine of each target's attributions under the two algorithms.", "ModelDiff paper (how similar the algorithms are)",
     lambda m: ", ".join(f"{k} median {v:.2f}" for k, v in m["per_target_cosine_median"].items()), []),
    ("modeldiff", "natural_blend_response.png", "Own-class margin change when test images are blended toward the contrasted class or toward the rest.",
     "ModelDiff paper, counterfactual verification",
     lambda m: f"B/A {m['natural']['intervention']['b_over_a_contrasted']:.2f} toward the contrasted class, "
               f"{m['natural']['intervention']['b_over_a_other']:.2f} toward the rest", []),
    ("unlearning", "klom_vs_compute.png", "KLoM on the forget set (95th percentile) against fine-tuning compute, per forget set: every method "
     "at the learning rate chosen for each budget on the select sets, DM-direct, the floor and the ceiling.",
     "Attribute-to-Delete paper (Georgiev et al. 2024), KLoM against compute on CIFAR-10 and ResNet-9, where DMM comes close to OM "
     "and below every baseline at equal compute (read from its plots; no number transcribed)", _unlearning_line, []),
    ("unlearning", "klom_distributions.png", "Per-example KLoM on the forget, retain and validation examples, each method at its chosen setting.",
     "Attribute-to-Delete paper, KLoM per split",
     lambda m: "retain KLoM p95, mean over sets: " + ", ".join(
         f"{k} {mean_p95(m, k, 'retain'):.2f}" for k in ("floor", "do_nothing", "om", "dmm", "dm_direct")), []),
    ("unlearning", "margin_histograms.png", "Margins over models of a few forget examples: oracles against unlearned models.",
     "Attribute-to-Delete paper, margin distributions", lambda m: "", []),
    ("unlearning", "accuracy.png", "Accuracy on forget, retain and validation examples of each method and of the oracles.",
     "Attribute-to-Delete paper (accuracy is not enough: KLoM)",
     lambda m: "forget accuracy: oracles {oracle:.3f}, do nothing {do_nothing:.3f}, OM {om:.3f}, DMM {dmm:.3f}".format(**m["accuracy"]["forget"]), []),
]


def load_published(path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def load_results(reports_dir) -> dict[str, dict]:
    """Every stage's results.json under ``reports_dir`` (stages that have not run are absent)."""
    out = {}
    for stage in NOTEBOOKS:
        path = Path(reports_dir) / stage / "results.json"
        if path.exists():
            out[stage] = json.loads(path.read_text())
    return out


def figure_entries(reports_dir, published: dict) -> list[dict]:
    """Per section, each figure that exists with its caption: what it shows, what it mirrors, the
    number measured here beside the published one (with the difference of scale), and the stage
    and notebook that made it."""
    metrics = load_results(reports_dir)
    entries = []
    for section, stages in SECTIONS:
        for stage, name, shows, mirrors, measured, keys in FIGURES:
            path = Path(reports_dir) / stage / "figures" / name
            if stage not in stages or stage not in metrics or not path.exists():
                continue
            by_source: dict[str, list[str]] = {}  # each paper cited once, after all its numbers
            for k in keys:  # a number, or a finding the paper shows only in a plot, stated in words
                if k in published["numbers"]:
                    number = published["numbers"][k]
                    by_source.setdefault(number["source"], []).append(f"{number['what']}: {number['value']} ({number['where']})")
                else:
                    found = published["findings"][k]
                    by_source.setdefault(found["source"], []).append(f"{found['finding']} ({found['where']})")
            pub = [f"{'; '.join(items)} ({published['sources'][source]})" for source, items in by_source.items()]
            entries.append({"section": section, "path": str(path), "shows": shows, "mirrors": mirrors,
                            "measured": measured(metrics[stage]), "published": pub, "scale": SCALE if pub else "",
                            "made_by": f"stage `{stage}`, notebook `notebooks/{NOTEBOOKS[stage]}.ipynb`"})
    return entries


def _sentence(text: str) -> str:
    """``text`` ending in exactly one full stop (markdown emphasis characters escaped)."""
    text = re.sub(r"([*_])", r"\\\1", text.strip())
    return text if text.endswith((".", "!", "?")) else text + "."


def caption(entry: dict) -> str:
    """A figure's caption as markdown: what it shows (bold), what it mirrors, the number measured
    here, the published one with the difference of scale, and the stage that made it."""
    parts = [f"**{_sentence(entry['shows'])}**", _sentence(f"Mirrors: {entry['mirrors']}")]
    if entry["measured"]:
        parts.append(_sentence(f"Measured here: {entry['measured']}"))
    if entry["published"]:
        parts += [_sentence("Published: " + "; ".join(entry["published"])), _sentence(entry["scale"])]
    parts.append(_sentence(f"Made by {entry['made_by']}"))
    return " ".join(parts)


def alt_text(entry: dict) -> str:
    """A figure's alternative text: what it shows and what was measured, as plain text."""
    measured = f"Measured here: {entry['measured']}" if entry["measured"] else ""
    return " ".join(x.strip() for x in (entry["shows"], measured) if x)


def figure_html(path, alt: str) -> str:
    """An ``<img>`` with the PNG at ``path`` embedded and ``alt`` as its alternative text."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}">'


def _trak_row(section: str, best: dict, ceiling: float, setting: str) -> dict:
    """A section stage's summary row: TRAK's best LDS with the noise ceiling, and its setting."""
    return {"metric": f"{section}: TRAK LDS, best (noise ceiling)", "value": f"{best['lds']:.3f} ({ceiling:.3f})",
            "params": f"k = {best['proj_dim']}, M = {best['models_used']}; {setting}"}


def headline_metrics(reports_dir, params: dict) -> list[dict]:
    """The summary table: every headline metric with its value and the params that produced it."""
    m = load_results(reports_dir)
    p, rows = params, []
    profile = f"{p['data']['dataset']}, {p['model']['name']}"
    if "fit_datamodels" in m:
        f = m["fit_datamodels"]
        rows += [{"metric": "datamodels LDS (mean of seeds / single model)", "value": f"{f['lds_mean']:.3f} / {f['lds_single']:.3f}",
                  "params": f"{profile}; N = {f['num_models']} models, alpha = {p['train']['alpha']}"}]
    if "eval_models" in m and "seed_agreement" in m["eval_models"]:
        rows += [{"metric": "seed agreement (noise ceiling)", "value": f"{m['eval_models']['seed_agreement']:.3f}",
                  "params": f"{p['evaluation']['num_masks']} masks x {p['evaluation']['repeats']} seeds"}]
    if "attribution_comparison" in m:
        a = m["attribution_comparison"]
        best = best_record(a, "trak")
        rows += [{"metric": "TRAK LDS, best", "value": f"{best['lds']:.3f}", "params": f"k = {best['proj_dim']}, M = {best['models_used']}"},
                 {"metric": "datamodels overtake TRAK's best from", "value": f"{a['datamodels_overtake_trak'].get('models', 'never')} models",
                  "params": f"selection models charged: {a['selection_models']}"}]
    if "clip" in m:
        c = m["clip"]
        best = best_record(c, "trak")
        rows += [_trak_row("CLIP", best, c.get("mean_ceiling", float("nan")), "two towers on the digits' captions")]
    if "fact_tracing" in m:
        f = m["fact_tracing"]
        best = best_record(f, "trak")
        rows += [_trak_row("fact tracing", best, f.get("mean_ceiling", float("nan")), "a causal transformer on the fact corpus"),
                 {"metric": "fact tracing: MRR (TRAK / BM25)", "value": f"{f['retrieval']['trak']['mrr']:.3f} / {f['retrieval']['bm25']['mrr']:.3f}",
                  "params": "against the sentences that state each fact"}]
    if "text_classification" in m:
        t = m["text_classification"]
        best = best_record(t, "trak")
        rows += [_trak_row("text classification", best, t.get("mean_ceiling", float("nan")), "a transformer encoder on question-sentence pairs")]
    if "diffusion" in m:
        d = m["diffusion"]
        best = best_record(d, "trak_loss")
        rows += [_trak_row("diffusion", best, d["ceiling"]["validation"]["mean_ceiling"],
                           f"K = {best['timesteps']}; DDPMs on the digits (ceiling of the validation images)")]
    if "modeldiff" in m:
        d = m["modeldiff"]
        r = d["planted"]
        rows += [{"metric": "ModelDiff planted recovery (AUROC / precision)", "value": f"{r['auroc']:.3f} / {r['precision_at_planted']:.2f}",
                  "params": f"{p['modeldiff']['num_models']} models per algorithm, {d['attribution']}, direction chosen by variance ratio"},
                 {"metric": "ModelDiff swap-null p-value (planted / control / natural)",
                  "value": " / ".join(f"{d[c]['null']['p_value']:.3f}" for c in ("planted", "control", "natural")),
                  "params": f"{d['control']['null']['permutations']} permutations"},
                 {"metric": "ModelDiff control, largest variance ratio", "value": f"{d['control']['null']['largest_variance_ratio']:.2f}", "params": ""}]
    if "unlearning" in m:
        u = m["unlearning"]
        rows += [{"metric": "unlearning: forget-set KLoM p95 (OM / DMM / DM-direct / do nothing / floor)",
                  "value": " / ".join(f"{mean_p95(u, k):.2f}" for k in ("om", "dmm", "dm_direct", "do_nothing", "floor")),
                  "params": f"N = {u['num_models']} models, {len(u['verdict'])} reported forget sets, {u['direction']}"}]
    return rows


def headline_values(reports_dir) -> dict[str, float]:
    """The headline metrics as one flat dict of numbers (``reports/report/headline.json``): what
    ``dvc exp show`` puts side by side for experiments."""
    m, out = load_results(reports_dir), {}
    if "fit_datamodels" in m:
        out.update(datamodels_lds=m["fit_datamodels"]["lds_mean"], datamodels_lds_single=m["fit_datamodels"]["lds_single"])
    if "eval_models" in m and "seed_agreement" in m["eval_models"]:
        out["seed_agreement"] = m["eval_models"]["seed_agreement"]
    if "attribution_comparison" in m:
        a = m["attribution_comparison"]
        out.update(trak_lds_best=best_record(a, "trak")["lds"], datamodels_lds_best=best_record(a, "datamodels")["lds"])
    if "clip" in m:
        out["clip_trak_lds_best"] = best_record(m["clip"], "trak")["lds"]
    if "fact_tracing" in m:
        out.update(fact_tracing_trak_lds_best=best_record(m["fact_tracing"], "trak")["lds"],
                   fact_tracing_mrr_trak=m["fact_tracing"]["retrieval"]["trak"]["mrr"], fact_tracing_mrr_bm25=m["fact_tracing"]["retrieval"]["bm25"]["mrr"])
    if "text_classification" in m:
        out["text_classification_trak_lds_best"] = best_record(m["text_classification"], "trak")["lds"]
    if "diffusion" in m:
        out.update(diffusion_trak_lds_best=best_record(m["diffusion"], "trak_loss")["lds"],
                   diffusion_dtrak_lds_best=best_record(m["diffusion"], "trak_square_norm")["lds"])
    if "modeldiff" in m:
        d = m["modeldiff"]
        out["modeldiff_planted_auroc"] = d["planted"]["auroc"]
        out["modeldiff_control_ratio"] = d["control"]["null"]["largest_variance_ratio"]
    if "unlearning" in m:
        out.update({f"unlearning_forget_klom_{k}": mean_p95(m["unlearning"], k) for k in ("om", "dmm", "dm_direct", "do_nothing", "floor")})
    return {k: round(float(v), 4) for k, v in out.items()}


def run_stamp(root) -> dict:
    """The date and the git commit of the run (``unknown`` outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"date": datetime.date.today().isoformat(), "commit": commit}


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
img {{ max-width: 100%; }} table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
pre {{ white-space: pre-wrap; }} .jp-InputPrompt, .jp-OutputPrompt {{ display: none; }}
</style></head>
<body>
{body}
<script>
/* marks, for the browser test, how many images decoded: all of them are data: URIs, nothing is fetched */
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""


def render_html(notebook_path, html_path, title: str = "datalens report") -> Path:
    """The executed report notebook as one self-contained HTML page: code hidden, images embedded as
    data URIs, no script or stylesheet from any network host (nbconvert's full templates load
    require.js and MathJax from a CDN, so the body comes from its ``basic`` template)."""
    nb = nbformat.read(str(notebook_path), as_version=4)
    exporter = HTMLExporter(template_name="basic", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True, exclude_anchor_links=True)
    # the notebook's own introduction (what it reads, how long it takes) is for the notebook, not the page
    exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags={NOTEBOOK_ONLY}, enabled=True), enabled=True)
    body, _ = exporter.from_notebook_node(nb)
    remote = re.findall(r'(?:src|href)="(https?:[^"]+)"', body)
    if remote:
        raise ValueError(f"the report would load {remote[:3]} from the network")
    html_path = Path(html_path)
    html_path.write_text(PAGE.format(title=title, body=body))
    return html_path


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m datalens.reporting.report_page EXECUTED_NOTEBOOK OUTPUT_HTML")
    print(f"report written to {render_html(sys.argv[1], sys.argv[2])}")
