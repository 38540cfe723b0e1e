"""Every number in the README's results section comes from a metrics file the pipeline wrote:
this test rebuilds each claim from `reports/*/results.json` and fails when the README disagrees
(rerun the pipeline, then update the README from the metrics). Wall-clock seconds are left out:
they differ on every machine and run, so a local `make repro` must not make this test fail; every
other number here is deterministic (a fresh clone reproduces them exactly)."""
import json
import re

import pytest
import yaml


def _metrics(root) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in (root / "reports").glob("*/results.json")}


def _trak(a, k):
    return {r["models_used"]: r for r in a["records"] if r["method"] == "trak" and r["proj_dim"] == k}


def _one(a, method, models_used=1):
    return next(r for r in a["records"] if r["method"] == method and r["models_used"] == models_used)


def claims(m: dict) -> list[str]:
    t, e, f, c, a, d = (m[s] for s in ("train_subsets", "eval_models", "fit_datamodels", "counterfactuals",
                                       "attribution_comparison", "modeldiff"))
    ag, br = c["agreement"], c["brittleness"]
    k_last = list(br["fraction_flipped_predicted"])[-1]
    t512, t2048 = _trak(a, 512), _trak(a, 2048)
    over = a["datamodels_overtake_trak"]
    pl = d["planted"]
    rec = pl
    va, vb = pl["variance_a"][pl["chosen_direction"] - 1], pl["variance_b"][pl["chosen_direction"] - 1]
    effects = pl["intervention"]["planted_b"]
    nat = d["natural"]
    return [
        f"mean test accuracy {t['test_accuracy_mean']:.3f} (± {t['test_accuracy_std']:.3f})",
        f"agree at r = {e['seed_agreement']:.3f}", f"√r = {e['single_model_ceiling']:.3f}",
        f"LDS {f['lds_mean']:.3f} (mean over seeds) and {f['lds_single']:.3f} (single model)",
        f"mean per-target Pearson {f['per_target_pearson_mean']:.3f} / {f['per_target_pearson_single']:.3f}",
        f"{f['pearson_mean']:.3f} / {f['pearson_single']:.3f}, is mostly differences between targets",
        " / ".join(f"{v['lds_mean']:.2f}" for v in f["growth"].values()) + " at " + " / ".join(f["growth"]),
        f"r = {ag['top_positive']['pearson']:.3f} for top-positive removals, {ag['top_negative']['pearson']:.3f} for "
        f"top-negative and {ag['random']['pearson']:.3f} for random ones (Spearman {ag['random']['spearman']:.2f}",
        f"{ag['pooled']['pearson']:.3f} pooled",
        f"removing at most {k_last} examples is *predicted* to flip {100 * br['fraction_flipped_predicted'][k_last]:.1f}%",
        f"confirms {round(br['confirmed_flip_rate'] * br['confirmed_sample_size'])} of {br['confirmed_sample_size']} sampled",
        f"about {100 * br['fraction_flipped_confirmed'][k_last]:.1f}%",
        "LDS " + " / ".join(f"{r['lds']:.2f}" for r in t2048.values()) + " at M = " + " / ".join(map(str, t2048)) + " for k = 2048",
        " / ".join(f"{r['lds']:.2f}" for r in t512.values()) + " for k = 512",
        f"EK-FAC influence {_one(a, 'ekfac_influence')['lds']:.2f} ({_one(a, 'ekfac_influence', 10)['lds']:.2f} averaged over 10 models)",
        f"CG over all parameters {_one(a, 'influence_cg')['lds']:.2f}, explicit Hessian over the last layer {_one(a, 'influence_explicit')['lds']:.2f}",
        f"grad-dot {_one(a, 'grad_dot')['lds']:.2f} ({_one(a, 'grad_dot', 10)['lds']:.2f} over 10 models)",
        f"grad-cosine {_one(a, 'grad_cosine')['lds']:.2f}", f"TracIn {_one(a, 'tracin')['lds']:.2f}",
        f"representation similarity {_one(a, 'representation_similarity')['lds']:.2f}",
        f"empirical influence from 3000 subset models {_one(a, 'empirical_influence', 3000)['lds']:.2f}",
        f"the {a['selection_models']} validation models",
        f"TRAK leads at small budgets: {t512[10]['lds']:.2f} in", f"and {t512[25]['lds']:.2f} in",
        f"any budget ({max(r['lds'] for r in a['records'] if r['method'] == 'trak'):.3f}) from **{over['models']} models**, "
        f"with {over['lds']:.3f} at",
        f"explains {100 * vb:.1f}% of B's attribution variance and {100 * va:.2f}% of A's (ratio {vb / va:.1f})",
        f"AUROC {rec['auroc']:.2f} (precision {rec['precision_at_planted']:.1f} at {pl['count']})",
        f"{100 * pl['top_targets_with_patch']:.0f}% of its top {pl['test_count']} targets",
        " / ".join(f"{x['probability_change']['mean']:.3f}" for x in effects),
        " / ".join(f"[{x['probability_change']['low']:.3f}, {x['probability_change']['high']:.3f}]" for x in effects),
        "{mean:.2f} [{low:.2f}, {high:.2f}] at full strength".format(**effects[-1]["margin_change"]),
        f"largest variance ratio is {d['control']['null']['largest_variance_ratio']:.2f}",
        *(f"{case} p = {d[case]['null']['p_value']:.2f} (null 95th percentile {d[case]['null']['null_p95']:.2f})"
          for case in ("planted", "control", "natural")),
        f"direction (ratio {1 / nat['inferred']['variance_ratio']:.2f}) contrasts",
        "contrasts training {}s with {}s".format(*nat["inferred"]["contrasts_classes"]),
        f"{nat['intervention']['b_over_a_contrasted']:.2f} times as much", f"against {nat['intervention']['b_over_a_other']:.2f} times",
    ]


UNLEARNING_COLUMNS = ("floor", "do_nothing", "gd", "ga", "ascent_descent", "scrub", "om", "dmm", "dm_direct")


def unlearning_claims(u: dict, params: dict) -> list[str]:
    """The unlearning table (forget- and validation-set KLoM per set and method) and its sentences."""
    rows = {}
    for r in u["table"]:
        rows.setdefault(r["set"], {})[r["method"].split(" ")[0]] = r
    out = []
    for name, by in rows.items():
        out.append(f"| {name} | " + " | ".join(f"{by[c]['forget_p95']:.2f}" for c in UNLEARNING_COLUMNS) + " |")
        out.append(f"| {name} | " + " | ".join(f"{by[c]['validation_p95']:.2f}" for c in UNLEARNING_COLUMNS) + " |")
    for name, v in u["verdict"].items():
        out.append(f"{name}: {v['forget_gap_do_nothing']:.2f} → {v['forget_gap_dm_direct']:.2f} (slope {v['predicted_shift_slope']:.2f})")
    acc = u["accuracy"]["forget"]
    out.append(f"GA's forget accuracy is {acc['ga']:.2f} against the oracles' {acc['oracle']:.2f}")
    best = {kind: c["best"]["dmm"][1] for kind, c in u["selection"].items()}
    out.append(f"The budgets chosen for DMM are {best['random']:g} and {best['component']:g} epoch-equivalents")
    ds = u["dm_scale"]
    out.append("datamodel scale m = " + " and ".join(f"{ds[k]['chosen']:g}" for k in ("random", "component")))
    out.append("datamodels at α = " + " and ".join(f"{ds[k]['alpha']:g}" for k in ("random", "component")))
    out.append(f"from {ds['random']['scores']['0.5']['1.0']:.2f} (α = 0.5, m = 1) to {ds['random']['scores']['0.9']['2.0']:.2f}")
    out.append(f"only from {min(ds['component']['scores']['0.5'].values()):.2f} (α = 0.5, best m) to "
               f"{ds['component']['scores']['0.9']['3.0']:.2f}")
    out.append("`lrs_on_edge` is empty" if not u["lrs_on_edge"] else f"`lrs_on_edge`: {u['lrs_on_edge']}")
    base = max(params["unlearning"]["budgets"])
    for kind, label in (("random", "random"), ("component", "coherent")):
        grown = {m: max(b) for m, b in u["budgets"][kind].items() if max(b) > base}
        out.append(f"on {label} sets: " + (", ".join(f"{m} to {b:g}" for m, b in sorted(grown.items())) if grown else "none"))
        flat = u["budgets_flat"].get(kind, {})
        out.append(f"flat on {label} sets: " + (", ".join(f"{m} at {f['budget']:g} (gain {f['gain']:.2f}, standard error {f['se']:.2f})"
                                                          for m, f in sorted(flat.items())) if flat else "none"))
    edge = u["budgets_on_edge"]
    out.append("`budgets_on_edge` is empty" if not edge else "`budgets_on_edge`: " + "; ".join(
        f"{', '.join(sorted(by))} on {'coherent' if k == 'component' else k} sets" for k, by in sorted(edge.items())))
    lc = u["attribution"]["lasso_check"]
    out += [f"Pearson {lc['ridge']['pearson']:.3f} for ridge and {lc['lasso']['pearson']:.3f} for the lasso",
            f"on {lc['targets']} logit targets"]  # the lasso's minutes are wall-clock, left out like every timing
    return out


def section_lds_claims(c: dict) -> list[str]:
    """The claims a section stage's bullet (clip, fact_tracing) shares: the seed agreement and noise
    ceiling, TRAK's LDS at k = 512 and 128, the datamodels' and empirical influence's, and the
    gradient baselines' at one model and at the most checkpoints."""
    by = {m: sorted((r for r in c["records"] if r["method"] == m), key=lambda r: r["models_used"]) for m in ("datamodels", "empirical_influence")}
    t512, t128 = _trak(c, 512), _trak(c, 128)
    most = max(r["models_used"] for r in c["records"] if r["method"] == "grad_dot")
    return [
        f"agree at r = {c['seed_agreement']:.3f}",
        f"the noise ceiling is {c['single_model_ceiling']:.2f} against one model and {c['mean_ceiling']:.2f} against the mean of the two",
        "LDS " + " / ".join(f"{r['lds']:.2f}" for r in t512.values()) + " at M = " + " / ".join(map(str, t512)) + " for k = 512",
        "(" + " / ".join(f"{r['lds']:.2f}" for r in t128.values()) + " for k = 128)",
        "Datamodels " + " / ".join(f"{r['lds']:.2f}" for r in by["datamodels"]) + " at "
        + " / ".join(str(r["models_used"]) for r in by["datamodels"]) + " models",
        "empirical influence " + " / ".join(f"{r['lds']:.2f}" for r in by["empirical_influence"]),
        f"grad-dot {_one(c, 'grad_dot')['lds']:.2f} ({_one(c, 'grad_dot', most)['lds']:.2f} over {most} models)",
        f"grad-cosine {_one(c, 'grad_cosine', most)['lds']:.2f} over {most}", f"TracIn {_one(c, 'tracin')['lds']:.2f}",
        f"embedding similarity {_one(c, 'embedding_similarity')['lds']:.2f} ({_one(c, 'embedding_similarity', most)['lds']:.2f} over {most} models)",
    ]


def clip_claims(c: dict) -> list[str]:
    """The CLIP bullet: retrieval accuracy, the shared LDS claims and the counterfactual drops."""
    cf = c["counterfactual"]
    return [
        f"test retrieval accuracy {c['test_retrieval_accuracy']:.3f}", *section_lds_claims(c),
        "at k = " + " / ".join(str(x["k"]) for x in cf["trak"]) + " is " + " / ".join(f"{x['mean']:.3f}" for x in cf["trak"]) + " for TRAK's top-k",
        " / ".join(f"{x['mean']:.3f}" for x in cf["embedding_similarity"]) + " for embedding similarity's",
        " / ".join(f"{x['mean']:.3f}" for x in cf["random"]) + " at random",
        *(f"[{t['low']:.3f}, {t['high']:.3f}] against [{e['low']:.3f}, {e['high']:.3f}]" for t, e in zip(cf["trak"], cf["embedding_similarity"])),
    ]


def fact_tracing_claims(f: dict) -> list[str]:
    """The fact-tracing bullet: recall, the shared LDS claims, BM25's, retrieval and the counterfactual drops."""
    cf, ret = f["counterfactual"], f["retrieval"]
    ks = " / ".join(str(x["k"]) for x in cf["recall"]["trak"])

    def drops(measure, method):
        return " / ".join(f"{x['mean']:.3f}" for x in cf[measure][method])

    return [
        f"query recall {f['test_recall']:.3f}", f"{f['full_data_recall']:.2f} for models trained on every sentence",
        *section_lds_claims(f), f"BM25 {_one(f, 'bm25', 0)['lds']:.2f}",
        *(f"{name} {ret[m]['mrr']:.2f} / {ret[m]['recall_at_10']:.2f}" for m, name in (("trak", "TRAK"), ("bm25", "BM25"),
          ("grad_cosine", "grad-cosine"), ("grad_dot", "grad-dot"), ("empirical_influence", "empirical influence"),
          ("embedding_similarity", "embedding similarity"), ("tracin", "TracIn"))),
        f"answer's probability at k = {ks} is {drops('answer_probability', 'trak')} for TRAK's top-k",
        f"{drops('answer_probability', 'bm25')} for BM25's", f"{drops('answer_probability', 'random')} at random",
        f"recall at k = {ks} is {drops('recall', 'trak')} for TRAK's top-k", f"{drops('recall', 'bm25')} for BM25's",
        f"{drops('recall', 'random')} at random",
    ]


def text_classification_claims(t: dict) -> list[str]:
    """The text-classification bullet: accuracy and the majority rate, the shared LDS claims, EK-FAC's
    and the same-subject rates of the top 5."""
    most = max(r["models_used"] for r in t["records"] if r["method"] == "ekfac_influence")
    same = t["same_subject_top5"]
    return [
        f"test accuracy {t['test_accuracy']:.3f}", f"majority class {t['majority_rate']:.3f}", *section_lds_claims(t),
        f"EK-FAC influence {_one(t, 'ekfac_influence')['lds']:.2f} ({_one(t, 'ekfac_influence', most)['lds']:.2f} over {most} models)",
        *(f"{name} {same[m]['top_k']:.3f}" for m, name in (("trak", "TRAK"), ("ekfac_influence", "EK-FAC"),
                                                         ("embedding_similarity", "embedding similarity"))),
        f"{next(iter(same.values()))['chance']:.3f} of all training pairs",
    ]


DIFFUSION_NAMES = {"trak_loss": "loss → loss (TRAK, Journey)", "trak_square_norm": "squared norm → squared norm (D-TRAK)",
                   "trak_loss_to_square_norm": "loss → squared norm"}


def diffusion_table_rows(d: dict) -> list[str]:
    """The diffusion LDS table: per TRAK variant and K, the LDS at its most models on validation images
    and generated samples, then pooled at every M; per baseline its best setting."""
    rows, top_m = [], max(r["models"] for r in d["lds_table"] if r["timesteps"])
    for method, name in DIFFUSION_NAMES.items():
        for k in sorted({r["timesteps"] for r in d["lds_table"] if r["method"] == method}):
            rs = sorted((r for r in d["lds_table"] if r["method"] == method and r["timesteps"] == k), key=lambda r: r["models"])
            top = next(r for r in rs if r["models"] == top_m)
            rows.append(f"| {name} | {k} | {top['lds_validation']:.3f} | {top['lds_generated']:.3f} | "
                        + " / ".join(f"{r['lds']:.3f}" for r in rs) + " |")
    for method, name in (("datamodels", "datamodels"), ("empirical_influence", "empirical influence"), ("grad_dot", "grad-dot"),
                         ("grad_cosine", "grad-cosine")):
        best = max((r for r in d["lds_table"] if r["method"] == method), key=lambda r: r["lds"])
        rows.append(f"| {name} ({best['models']} models) | | {best['lds_validation']:.3f} | {best['lds_generated']:.3f} | {best['lds']:.3f} |")
    return rows


def diffusion_claims(d: dict) -> list[str]:
    """The diffusion bullet: the denoising loss, the ceilings, the LDS table, the step-wise class
    shares and overlaps, and the counterfactual."""
    c, st, cf = d["ceiling"], d["stepwise"], d["counterfactual"]
    k = next(iter(cf["top-k"]))

    def drop(measure, method):
        return " / ".join(f"{v[measure]['mean']:.3f}" for v in cf[method][k].values())

    return [
        f"mean test denoising loss {d['test_denoising_loss']:.3f}",
        f"agree at r = {c['validation']['seed_agreement']:.3f} on validation images and {c['generated']['seed_agreement']:.3f} on generated samples",
        f"{c['validation']['mean_ceiling']:.2f} and {c['generated']['mean_ceiling']:.2f} against the mean of the two",
        *diffusion_table_rows(d),
        "at steps " + " / ".join(map(str, st["steps"])) + ": " + " / ".join(f"{v:.2f}" for v in st["same_class"]),
        f"its share of the training set, {st['same_class_chance']:.2f}",
        "overlap " + " / ".join(f"{v:.2f}" for v in st["overlap_with_next"]),
        f"class changed at steps {' / '.join(cf['top-k'][k])}: {drop('class_changed', 'top-k')} for the top {k}, "
        f"{drop('class_changed', 'random')} for {k} at random",
        f"farther from the removed images by {drop('moved_away', 'top-k')} for the top {k}, {drop('moved_away', 'random')} for {k} at random",
    ]


def test_readme_results_agree_with_the_metrics_files(root):
    m = _metrics(root)
    missing = {"train_subsets", "eval_models", "fit_datamodels", "counterfactuals", "attribution_comparison", "modeldiff",
               "unlearning", "clip", "fact_tracing", "text_classification", "diffusion"} - set(m)
    if missing:
        pytest.fail(f"metrics files missing for {sorted(missing)}: run `make repro` and commit reports/*/results.json")
    text = (root / "README.md").read_text()
    section = text.split("## Results on the embedded profile")[1].split("\n## ")[0]
    flat = re.sub(r"\s+", " ", section)
    stale = [c for c in claims(m) + unlearning_claims(m["unlearning"], yaml.safe_load((root / "params.yaml").read_text())) + clip_claims(m["clip"])
             + fact_tracing_claims(m["fact_tracing"]) + text_classification_claims(m["text_classification"]) + diffusion_claims(m["diffusion"])
             if re.sub(r"\s+", " ", c) not in flat]
    assert not stale, "README results disagree with reports/*/results.json; expected to find:\n" + "\n".join(stale)
