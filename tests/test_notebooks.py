"""Each stage notebook runs end to end through papermill at a tiny size, through the
same params path `dvc repro` uses, from the notebooks/ folder as JupyterLab runs them (no path edited), with every store given as a ``file://`` URL (fsspec);
committed notebooks carry no outputs."""
import json
import re
import struct
import subprocess
import warnings

import numpy as np
import papermill as pm
import pytest
import yaml
import zarr
from scipy import stats

from browser import open_offline
from rank_bm25 import BM25Okapi

from datalens.core.facts import fact_corpus, pair_corpus
from datalens.reporting import plots, reports
from datalens.reporting.report_page import render_html
from datalens.training import runs

COMMON = {"device": "cpu", "model.hidden": [16], "train.epochs": 5, "train.stack_size": 8}
TRAIN = {"train.num_models": 80, "train.block_size": 40, "train.num_checkpoints": 4}
EVAL = {"evaluation.num_masks": 12, "evaluation.repeats": 2}  # what stage 02 trains, for every stage that reads it
TINY = {  # the pipeline in order; each stage reads what the one before wrote
    "01_train_subsets": {**COMMON, **TRAIN},
    "02_eval_models": {**COMMON, **EVAL, "train.block_size": 12},
    "03_fit_datamodels": {**COMMON, **TRAIN, **EVAL, "datamodels.model_counts": [60], "datamodels.num_lambdas": 6, "datamodels.max_iter": 20},
    "04_counterfactuals": {**COMMON, "counterfactuals.num_targets": 2, "counterfactuals.ks": [2, 4], "counterfactuals.num_retrains": 1},
    "05_attribution_comparison": {
        **COMMON, **TRAIN, **EVAL, "datamodels.model_counts": [60],
        "trak.num_models": [1, 2], "trak.proj_dims": [16, 32], "trak.ridge_grid": [0.1, 1.0], "attribution.selection_models": 20,
        "attribution.ensemble_sizes": [1, 2], "attribution.dampings": [1.0, 10.0], "attribution.tracin_epochs": [2, 5],
        "attribution.ekfac_dampings": [0.01, 1.0],
    },
    "06_modeldiff_train": {**COMMON, **TRAIN, "modeldiff.num_models": 40, "modeldiff.num_checkpoints": 4, "modeldiff.trak_models": 2,
                           "modeldiff.patch": {"label": 3, "count": 10, "test_count": 4, "size": 2, "row": 0, "col": 0, "value": 4.0, "seed": 0},
                           "modeldiff.natural_b": {"train.weight_decay": 0.0}},
}
TINY["06_modeldiff"] = {**TINY["06_modeldiff_train"], "modeldiff.num_components": 2, "modeldiff.blend_intensities": [0.2],
                        "datamodels.num_lambdas": 6, "datamodels.max_iter": 20}
TINY["09_clip"] = {
    "device": "cpu", "clip.model.dim": 8, "clip.model.image_hidden": 16, "clip.model.text_hidden": 16,
    "clip.train.num_models": 60, "clip.train.block_size": 30, "clip.train.num_checkpoints": 4, "clip.train.epochs": 3, "clip.train.peak_epoch": 1,
    "clip.train.stack_size": 8, "clip.evaluation.num_masks": 8, "clip.evaluation.repeats": 2, "clip.trak.num_models": [1, 2],
    "clip.trak.proj_dims": [16, 32], "clip.trak.ridge_grid": [0.1, 1.0], "clip.attribution.ensemble_sizes": [1, 2],
    "clip.attribution.tracin_epochs": [1, 3], "clip.attribution.selection_models": 10, "clip.attribution.num_targets": 30,
    "clip.datamodels.model_counts": [30], "clip.datamodels.val_fraction": 0.2, "clip.datamodels.num_lambdas": 6,
    "clip.datamodels.max_iter": 20, "clip.counterfactuals.num_targets": 2, "clip.counterfactuals.ks": [5, 20],
    "clip.counterfactuals.num_retrains": 1}
TINY["10_fact_tracing"] = {
    "device": "cpu", "fact_tracing.model.dim": 16, "fact_tracing.train.num_models": 60, "fact_tracing.train.block_size": 30,
    "fact_tracing.train.num_checkpoints": 3, "fact_tracing.train.epochs": 6, "fact_tracing.train.stack_size": 30,
    "fact_tracing.evaluation.num_masks": 8, "fact_tracing.evaluation.repeats": 2, "fact_tracing.trak.num_models": [1, 3],
    "fact_tracing.trak.proj_dims": [16, 32], "fact_tracing.trak.ridge_grid": [0.1, 1.0], "fact_tracing.attribution.ensemble_sizes": [1, 3],
    "fact_tracing.attribution.tracin_epochs": [3, 6], "fact_tracing.attribution.selection_models": 10,
    "fact_tracing.datamodels.model_counts": [30], "fact_tracing.datamodels.val_fraction": 0.2, "fact_tracing.datamodels.num_lambdas": 6,
    "fact_tracing.datamodels.max_iter": 20, "fact_tracing.counterfactuals.num_targets": 2, "fact_tracing.counterfactuals.ks": [3, 10],
    "fact_tracing.counterfactuals.num_retrains": 1}
TINY["11_text_classification"] = {
    "device": "cpu", "text_classification.model.dim": 16, "text_classification.train.num_models": 60,
    "text_classification.train.block_size": 30, "text_classification.train.num_checkpoints": 3, "text_classification.train.epochs": 6,
    "text_classification.train.stack_size": 30, "text_classification.evaluation.num_masks": 8, "text_classification.evaluation.repeats": 2,
    "text_classification.trak.num_models": [1, 3], "text_classification.trak.proj_dims": [16, 32], "text_classification.trak.ridge_grid": [0.1, 1.0],
    "text_classification.attribution.ensemble_sizes": [1, 3], "text_classification.attribution.tracin_epochs": [3, 6],
    "text_classification.attribution.selection_models": 10, "text_classification.attribution.ekfac_dampings": [0.01, 1.0],
    "text_classification.datamodels.model_counts": [30], "text_classification.datamodels.val_fraction": 0.2,
    "text_classification.datamodels.num_lambdas": 6, "text_classification.datamodels.max_iter": 20}
TINY["12_diffusion"] = {
    "device": "cpu", "diffusion.model.hidden": [32, 32], "diffusion.train.num_models": 30, "diffusion.train.block_size": 15,
    "diffusion.train.stack_size": 15, "diffusion.train.num_checkpoints": 3, "diffusion.train.epochs": 5, "diffusion.evaluation.num_masks": 6,
    "diffusion.evaluation.repeats": 2, "diffusion.trak.num_models": [1, 3], "diffusion.trak.proj_dims": [16, 32],
    "diffusion.trak.ridge_grid": [0.1, 1.0], "diffusion.attribution.ensemble_sizes": [1, 2], "diffusion.attribution.selection_models": 8,
    "diffusion.datamodels.model_counts": [20], "diffusion.datamodels.val_fraction": 0.25, "diffusion.datamodels.num_lambdas": 6,
    "diffusion.datamodels.max_iter": 20, "diffusion.counterfactuals.num_targets": 2, "diffusion.counterfactuals.ks": [5, 20], "diffusion.counterfactuals.steps": [80],
    "diffusion.denoising.num_generated": 6, "diffusion.denoising.trajectories": 3, "diffusion.denoising.steps": [80, 20],
    "diffusion.denoising.timesteps": [2, 8], "diffusion.denoising.step_draws": 4}
TINY["07_unlearning"] = {
    **COMMON, **TRAIN, "unlearning.num_models": 5, "unlearning.om_oracles": 2, "unlearning.budgets": [0.5, 1.0], "unlearning.lasso_targets": 20, "unlearning.max_grid_extensions": 1, "unlearning.max_budget_extensions": 1,
    "unlearning.forget_sets": [{"name": "r4", "kind": "random", "size": 4}, {"name": "pc1", "kind": "component", "component": 1, "size": 4},
                               {"name": "sel_r", "kind": "random", "size": 4, "select": True},
                               {"name": "sel_pc2", "kind": "component", "component": 2, "size": 4, "select": True}],
    "unlearning.lrs": {"gd": [0.01], "ga": [0.01], "ascent_descent": [0.01], "scrub": [0.01], "om": [0.003, 0.01], "dmm": [0.003, 0.01]},
    "datamodels.num_lambdas": 6, "datamodels.max_iter": 20}


def _png_text(path) -> dict[str, str]:
    """A PNG's tEXt chunks (matplotlib writes savefig's metadata there)."""
    data, out, at = path.read_bytes(), {}, 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"tEXt":
            key, _, value = data[at + 8:at + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        at += 12 + length
    return out


def _run(root, tmp_path, name, overrides, extra=None):
    from datalens.core.config import declared_params
    stage = name.split("_", 1)[1]
    declared = declared_params(stage, root)
    stores = {"train.store": f"file://{tmp_path}/train.zarr", "evaluation.store": f"file://{tmp_path}/eval.zarr",
              "trak.store": f"file://{tmp_path}/trak.zarr", "modeldiff.store_dir": f"file://{tmp_path}/modeldiff",
              "unlearning.store_dir": f"file://{tmp_path}/unlearning", "clip.train.store": f"file://{tmp_path}/clip_train.zarr",
              "clip.evaluation.store": f"file://{tmp_path}/clip_eval.zarr", "clip.trak.store": f"file://{tmp_path}/clip_trak.zarr",
              **{f"{section}.{k}.store": f"file://{tmp_path}/{section}_{k}.zarr" for section in ("fact_tracing", "text_classification", "diffusion")
                 for k in ("train", "evaluation", "trak")}, "diffusion.denoising.reference_store": f"file://{tmp_path}/diffusion_reference"}
    overrides = {**overrides, **{k: v for k, v in stores.items() if k in declared or k.split(".")[0] in declared}}
    for section in ("modeldiff", "unlearning"):  # a store folder that holds several stores
        if section in declared:
            overrides[f"{section}.store_dir"] = stores[f"{section}.store_dir"]
    out = tmp_path / stage
    pm.execute_notebook(
        str(root / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
        parameters={"overrides": overrides, "out_dir": str(out), **(extra or {})}, cwd=str(root / "notebooks"), progress_bar=False,
        kernel_name="python3",
    )
    results = json.loads((out / "results.json").read_text())
    # metrics.json is the headline: a few dozen flat scalars that dvc metrics show can print, taken from the results
    headline = json.loads((out / "metrics.json").read_text())
    assert headline == json.loads(json.dumps(reports.headline(stage, results))) and 0 < len(headline) <= 40
    assert all(isinstance(v, (int, float)) for v in headline.values()), headline
    executed = json.loads((tmp_path / f"{name}.ipynb").read_text())
    shown = sum("image/png" in o.get("data", {}) for c in executed["cells"] for o in c.get("outputs", []))
    if stage != "modeldiff_train":  # a training stage with no figures of its own
        figures = list((out / "figures").glob("*.png"))
        assert figures and all(f.stat().st_size > 1000 for f in figures)
        shown_pt = {f.name: float(_png_text(f)["Shown font pt"]) for f in figures}  # the smallest text as the report shows it
        assert min(shown_pt.values()) >= plots.MIN_SHOWN_PT, shown_pt
        assert shown >= len(figures), f"{name} shows {shown} of its {len(figures)} figures inline"
    return results


def test_pipeline_notebooks_run_end_to_end(root, tmp_path):
    extra = {"datamodels_path": str(tmp_path / "datamodels.npz"), "correct_class_path": str(tmp_path / "datamodels_correct_class.npz")}
    m1 = _run(root, tmp_path, "01_train_subsets", TINY["01_train_subsets"])
    assert m1["num_models"] == 80 and m1["test_accuracy_mean"] > 0.3  # 10 classes: chance is 0.1
    m2 = _run(root, tmp_path, "02_eval_models", TINY["02_eval_models"])
    # the stage's numbers against scipy on the store it wrote
    ev = zarr.open_group(str(tmp_path / "eval.zarr"), mode="r")
    margins = np.asarray(ev["test_outputs"]).reshape(12, 2, -1)
    agreement = np.mean([stats.pearsonr(margins[:, 0, j], margins[:, 1, j])[0] for j in range(margins.shape[2])])
    assert m2["num_models"] == 24 and m2["seed_agreement"] == pytest.approx(agreement, rel=1e-9)
    fits = {"fits_dir": str(tmp_path / "datamodels_by_count")}
    m3 = _run(root, tmp_path, "03_fit_datamodels", TINY["03_fit_datamodels"], {**extra, **fits})
    assert m3["num_models"] == 80 and set(m3["growth"]) == {"60", "80"}
    with np.load(tmp_path / "datamodels.npz") as dm:
        masks = np.asarray(ev["masks"])[::2].astype(float)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():  # a constant prediction scores 0 (metrics' convention)
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            lds = np.mean([np.nan_to_num(stats.spearmanr(masks @ dm["weight"][:, j], margins[:, :, j].mean(1))[0])
                           for j in range(margins.shape[2])])
        assert m3["lds_mean"] == pytest.approx(lds, rel=1e-9)
        assert m3["mean_nonzero_weights"] == pytest.approx((dm["weight"] != 0).sum(0).mean())
    # the correct-class datamodels are fit to logit_y - max other logit of the stored logits: their
    # prediction at the mean mask is (the intercept's definition) the mean of that margin over the models
    tr = zarr.open_group(str(tmp_path / "train.zarr"), mode="r")
    logits, y = np.asarray(tr["test_logits"]).astype(np.float64), np.asarray(runs.cached_dataset("digits", "data").y_test)
    own = np.take_along_axis(logits, np.broadcast_to(y[None, :, None], logits.shape[:2] + (1,)), -1)[..., 0]
    others = np.where(np.arange(logits.shape[2]) == y[:, None], -np.inf, logits).max(-1)
    with np.load(tmp_path / "datamodels_correct_class.npz") as cc:
        mean_prediction = np.asarray(tr["masks"]).mean(0) @ cc["weight"] + cc["bias"]
        np.testing.assert_allclose(mean_prediction, (own - others).mean(0), rtol=1e-6, atol=1e-6)
    m4 = _run(root, tmp_path, "04_counterfactuals", TINY["04_counterfactuals"], extra)
    assert set(m4["brittleness"]["fraction_flipped_predicted"]) == set(m4["brittleness"]["fraction_flipped_confirmed"]) == {"2", "4"}
    assert set(m4["agreement"]) == {"pooled", "top_positive", "top_negative", "random"}
    m5 = _run(root, tmp_path, "05_attribution_comparison", TINY["05_attribution_comparison"], fits)
    methods = {r["method"] for r in m5["records"]}
    assert methods >= {"trak", "datamodels", "empirical_influence", "grad_dot", "grad_cosine", "representation_similarity",
                       "influence_explicit", "tracin", "ekfac_influence"}  # influence_cg drops out only if every damping is indefinite
    assert len([r for r in m5["records"] if r["method"] == "trak"]) == 4  # every (M, k)
    assert all(r["seconds"] > 0 for r in m5["records"])
    for r in (r for r in m5["records"] if r["method"] == "datamodels"):  # the LDS of stage 03's fits, by scipy
        with np.load(tmp_path / "datamodels_by_count" / f"{r['models_used']}.npz") as dm, warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            lds = np.mean([np.nan_to_num(stats.spearmanr(masks @ dm["weight"][:, j], margins[:, :, j].mean(1))[0])
                           for j in range(margins.shape[2])])
        assert r["lds"] == pytest.approx(lds, rel=1e-9)
    # every method that chooses a hyperparameter on the 20 validation models is charged for them
    for r in m5["records"]:
        assert r["models"] == r["models_used"] + (20 if r["selects_on_validation"] else 0), r
    assert {r["method"] for r in m5["records"] if r["selects_on_validation"]} >= {"trak", "influence_explicit", "ekfac_influence"}
    assert not (tmp_path / "file:").exists()  # the URL stores were not taken for relative paths
    m6 = _run(root, tmp_path, "06_modeldiff_train", TINY["06_modeldiff_train"])
    assert set(m6) == {"planted_a", "planted_b", "natural_a", "natural_b", "control"}
    assert m6["natural_a"]["store"] == f"file://{tmp_path}/train.zarr"  # the base run's store is reused (a URL is shown as it is)
    assert all(m6[n]["models"] == 40 for n in ("planted_a", "planted_b", "natural_b", "control"))
    m7 = _run(root, tmp_path, "06_modeldiff", TINY["06_modeldiff"])
    planted = m7["planted"]  # the direction is the one B explains most relative to A, and its recovery is what is reported
    assert len(planted["recovery_by_direction"]) == 2
    assert planted["chosen_direction"] == 1 + int(np.argmax(np.divide(planted["variance_b"], planted["variance_a"])))
    assert planted["auroc"] == planted["recovery_by_direction"][planted["chosen_direction"] - 1]["auroc"]
    for case in ("planted", "control", "natural"):  # a p-value of a permutation test with 100 swaps: (1 + count) / 101
        null = m7[case]["null"]
        assert null["permutations"] == 100 and round(null["p_value"] * 101, 9) == int(round(null["p_value"] * 101))
    effect_a = m7["planted"]["intervention"]["planted_a"]
    assert [e["intensity"] for e in effect_a] == [0.25, 0.5, 1.0]
    assert all(abs(e["probability_change"]["mean"]) < 1e-6 for e in effect_a)  # A's preprocessing blanks the patch
    m8 = _run(root, tmp_path, "07_unlearning", TINY["07_unlearning"])
    # the floor on the test examples, from the oracle store alone: its first 5 models are the evaluated
    # oracles, the next 5 the independent ones; KLoM by scipy's entropy of floored histograms
    from test_unlearning import _reference_klom
    oracles = zarr.open_group(str(next((tmp_path / "unlearning" / "oracles_r4").glob("*.zarr"))), mode="r")
    test_margins = np.asarray(oracles["test_outputs"])[:10].astype(np.float64)
    floor = next(r for r in m8["table"] if r["set"] == "r4" and r["method"].startswith("floor"))
    assert floor["validation_p95"] == pytest.approx(np.percentile(_reference_klom(test_margins[5:], test_margins[:5]), 95), rel=1e-9)
    assert set(m8["verdict"]) == {"r4", "pc1"} and set(m8["select_sets"]) == {"sel_r", "sel_pc2"}  # select sets are not reported
    assert set(m8["selection"]) == {"random", "component"}
    rows = {r["method"].split(" ")[0] for r in m8["table"]}
    assert rows == {"floor", "do_nothing", "gd", "ga", "ascent_descent", "scrub", "om", "dmm", "dm_direct"}
    for r in m8["table"]:
        assert 0 <= r["forget_p95"] <= 12 and r["finetune_epochs"] >= 0  # KLoM is at most about ln(1e5)
    assert all(r["finetune_epochs"] > 0 for r in m8["table"] if r["method"] in ("gd", "om", "dmm"))
    # a store_dir holds a folder per run, and in it one store per identity
    assert len(list((tmp_path / "unlearning" / "oracles_pc1").glob("*.zarr"))) == 1
    assert len(list((tmp_path / "unlearning" / "base").glob("*.zarr"))) == 1
    assert len(list((tmp_path / "unlearning" / "datamodels").glob("*.zarr"))) == 1  # the alpha = 0.9 subset models
    for choice in m8["dm_scale"].values():  # DMM's datamodels and scale: the lowest select-set score over both alphas
        scores = {(a, m): v for a, by_m in choice["scores"].items() for m, v in by_m.items()}
        assert set(choice["scores"]) == {"0.5", "0.9"} and min(scores.values()) == scores[str(choice["alpha"]), str(choice["chosen"])]

    m9 = _run(root, tmp_path, "09_clip", TINY["09_clip"])
    assert {r["method"] for r in m9["records"]} == {"trak", "datamodels", "empirical_influence", "grad_dot", "grad_cosine",
                                                   "embedding_similarity", "tracin"}
    assert len([r for r in m9["records"] if r["method"] == "trak"]) == 4 and m9["counterfactual"]["random"][1]["k"] == 20
    # the CLIP ground truth and a baseline's LDS, recomputed from the stores the stage wrote: the seed agreement by scipy, and
    # empirical influence (mean output with an example minus without) scored by scipy's Spearman on the 30 sampled pairs
    clip_eval = zarr.open_group(str(tmp_path / "clip_eval.zarr"), mode="r")
    clip_margins = np.asarray(clip_eval["test_outputs"]).astype(np.float64).reshape(8, 2, -1)
    agreement = np.mean([stats.pearsonr(clip_margins[:, 0, j], clip_margins[:, 1, j])[0] for j in range(clip_margins.shape[2])])
    assert m9["seed_agreement"] == pytest.approx(agreement, rel=1e-9)
    clip_train = zarr.open_group(str(tmp_path / "clip_train.zarr"), mode="r")
    cols = np.sort(np.random.default_rng([0, 23]).choice(clip_margins.shape[2], 30, replace=False))
    tr_masks, tr_out = np.asarray(clip_train["masks"]).astype(bool), np.asarray(clip_train["test_outputs"]).astype(np.float64)[:, cols]
    influence = np.stack([tr_out[tr_masks[:, i]].mean(0) - tr_out[~tr_masks[:, i]].mean(0) for i in range(tr_masks.shape[1])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        expected = np.mean([np.nan_to_num(stats.spearmanr(np.asarray(clip_eval["masks"])[::2] @ influence[:, j],
                                                          clip_margins.mean(1)[:, cols[j]])[0]) for j in range(30)])
    recorded = next(r for r in m9["records"] if r["method"] == "empirical_influence" and r["models_used"] == 60)
    assert recorded["lds"] == pytest.approx(expected, rel=1e-6)

    # the report gathers every figure the stages drew, and opens offline in a browser with all of them
    report = {"evaluation.num_masks": 12, "evaluation.repeats": 2, "modeldiff.num_models": 40}
    pm.execute_notebook(str(root / "notebooks" / "08_report.ipynb"), str(tmp_path / "08_report.ipynb"),
                        parameters={"overrides": report, "out_dir": str(tmp_path / "report"), "reports_dir": str(tmp_path)},
                        cwd=str(root), progress_bar=False, kernel_name="python3")
    html = render_html(tmp_path / "08_report.ipynb", tmp_path / "index.html")
    headline = json.loads((tmp_path / "report" / "headline.json").read_text())
    assert headline["unlearning_forget_klom_om"] == round(sum(r["forget_p95"] for r in m8["table"] if r["method"] == "om") / 2, 4)
    assert {"datamodels_lds", "trak_lds_best", "modeldiff_planted_auroc", "unlearning_forget_klom_dmm"} <= set(headline)
    declared = [f.split("/", 1)[1] for f in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]]  # reports/<stage>/figures/x.png
    assert all((tmp_path / f).exists() for f in declared)
    text = html.read_text()
    first_heading = re.search(r"<h[1-6][^>]*>(.*?)</h[1-6]>", text, re.S).group(1)
    assert first_heading.startswith("datalens") and "Params read" not in text  # the page opens on its title, not the notebook's intro
    assert "No description has been provided" not in text and 'alt="Test accuracy of every subset model (alpha = 0.5). Measured here: ' in text
    captions = re.findall(r"<p>(<strong>.*?)</p>", text, re.S)
    assert captions and not [c for c in captions if ".." in c or "(<em>" in c or c.count("Park et al.") > 1], captions
    page = open_offline(html, tmp_path / "report.png")
    assert page == {"images": len(declared), "loaded": len(declared), "remote": []}


def test_fact_tracing_stage_runs_end_to_end_and_its_numbers_recompute(root, tmp_path):
    m = _run(root, tmp_path, "10_fact_tracing", TINY["10_fact_tracing"])
    assert {r["method"] for r in m["records"]} == {"trak", "datamodels", "empirical_influence", "grad_dot", "grad_cosine",
                                                  "embedding_similarity", "tracin", "bm25"}
    assert set(m["counterfactual"]) == {"answer_probability", "recall"} and m["counterfactual"]["recall"]["random"][1]["k"] == 10
    # the ceiling from the eval store by scipy; BM25's retrieval from rank_bm25 and the corpus by brute force
    ev = zarr.open_group(str(tmp_path / "fact_tracing_evaluation.zarr"), mode="r")
    margins = np.asarray(ev["test_outputs"]).astype(np.float64).reshape(8, 2, -1)
    agreement = np.mean([np.nan_to_num(stats.pearsonr(margins[:, 0, j], margins[:, 1, j])[0]) for j in range(margins.shape[2])])
    assert m["seed_agreement"] == pytest.approx(agreement, rel=1e-9)
    corpus = fact_corpus()
    index = BM25Okapi([t.split() for t in corpus.sentences])
    reciprocal = []
    for q, a, props in zip(corpus.queries, corpus.answers, corpus.proponents):
        scores = index.get_scores(f"{q} {a}".split())
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        reciprocal.append(1 / (1 + min(order.index(i) for i in props)))
    assert m["retrieval"]["bm25"]["mrr"] == pytest.approx(np.mean(reciprocal))
    # the counterfactual's targets are queries the full-data models recall
    assert m["counterfactual_full_data"]["recall"] >= 0.5 and len(m["counterfactual_targets"]) == 2


def test_text_classification_stage_runs_end_to_end_and_its_numbers_recompute(root, tmp_path):
    m = _run(root, tmp_path, "11_text_classification", TINY["11_text_classification"])
    assert {r["method"] for r in m["records"]} == {"trak", "datamodels", "empirical_influence", "grad_dot", "grad_cosine", "ekfac_influence",
                                                  "embedding_similarity", "tracin"}
    assert {r["damping"] for r in m["records"] if r["method"] == "ekfac_influence"} <= {0.01, 1.0}
    # the ceiling from the eval store by scipy; the chance rate and majority from the pairs themselves
    ev = zarr.open_group(str(tmp_path / "text_classification_evaluation.zarr"), mode="r")
    margins = np.asarray(ev["test_outputs"]).astype(np.float64).reshape(8, 2, -1)
    agreement = np.mean([np.nan_to_num(stats.pearsonr(margins[:, 0, j], margins[:, 1, j])[0]) for j in range(margins.shape[2])])
    assert m["seed_agreement"] == pytest.approx(agreement, rel=1e-9)
    pairs = pair_corpus()
    train, test = pairs.facts[pairs.train], pairs.facts[~pairs.train]
    chance = np.mean([np.mean(train == f) for f in test])
    assert all(v["chance"] == pytest.approx(chance) for v in m["same_subject_top5"].values())
    assert m["majority_rate"] == pytest.approx(max(np.mean(pairs.labels[~pairs.train]), 1 - np.mean(pairs.labels[~pairs.train])))


def test_diffusion_stage_runs_end_to_end_and_its_numbers_recompute(root, tmp_path):
    m = _run(root, tmp_path, "12_diffusion", TINY["12_diffusion"])
    assert {r["method"] for r in m["records"]} == {"trak_loss", "trak_square_norm", "trak_loss_to_square_norm", "datamodels",
                                                  "empirical_influence", "grad_dot", "grad_cosine"}
    assert {(r["method"], r["timesteps"]) for r in m["records"] if r["method"].startswith("trak")} == \
        {(o, k) for o in ("trak_loss", "trak_square_norm", "trak_loss_to_square_norm") for k in (2, 8)}
    # the mixed variant pairs the loss's training features with the squared norm's target features: charged both
    mixed = next(r for r in m["records"] if r["method"] == "trak_loss_to_square_norm" and r["models_used"] == 3 and r["proj_dim"] == 32)
    alone = [next(r for r in m["records"] if r["method"] == f"trak_{o}" and r["models_used"] == 3 and r["proj_dim"] == 32 and r["timesteps"] == mixed["timesteps"])
             for o in ("loss", "square_norm")]
    assert mixed["sign"] in (1.0, -1.0) and mixed["own_seconds"] > max(a["own_seconds"] for a in alone)
    # 450 validation images and 6 generated samples, each group's ceiling by scipy on the eval store
    ev = zarr.open_group(str(tmp_path / "diffusion_evaluation.zarr"), mode="r")
    outputs = np.asarray(ev["test_outputs"]).astype(np.float64).reshape(6, 2, -1)
    assert outputs.shape[2] == 456
    for group, cols in (("validation", range(450)), ("generated", range(450, 456))):
        agreement = np.mean([np.nan_to_num(stats.pearsonr(outputs[:, 0, j], outputs[:, 1, j])[0]) for j in cols])
        assert m["ceiling"][group]["seed_agreement"] == pytest.approx(agreement, rel=1e-9)
    # a record's LDS is the mean over targets of its groups' LDS, weighted by their sizes
    rec = next(r for r in m["records"] if r["method"] == "trak_loss")
    assert rec["lds"] == pytest.approx((450 * rec["lds_by_group"]["validation"] + 6 * rec["lds_by_group"]["generated"]) / 456, rel=1e-9)
    # the mask bootstrap reads TRAK (loss) at its most models, largest k and largest K: its LDS is that record's
    kept = next(r for r in m["records"] if r["method"] == "trak_loss" and r["models_used"] == 3 and r["proj_dim"] == 32 and r["timesteps"] == 8)
    assert all(m["bootstrap"][g]["lds"] == pytest.approx(kept["lds_by_group"][g], rel=1e-12) and m["bootstrap"][g]["lds_se"] > 0
               for g in ("validation", "generated"))
    # the step-wise class shares from the top images and the digits' labels
    from datalens.core.data import load_digits
    labels, st = load_digits().y_train, m["stepwise"]
    top = np.asarray(st["top"])
    assert top.shape == (3, 2, 10)
    final = np.asarray(st["final_classes"])
    same = (labels[top] == final[:, None, None]).mean(-1)
    assert np.allclose(st["same_class_per_trajectory"], same) and np.allclose(st["same_class"], same.mean(0))
    assert st["same_class_chance"] == pytest.approx(np.mean([np.mean(labels == c) for c in final]))
    overlap = np.mean([len(set(top[j, 0]) & set(top[j, 1])) / 10 for j in range(3)])
    assert st["overlap_with_next"] == [pytest.approx(overlap)]
    # the counterfactual: every method, k and step, one retrain per trajectory
    assert set(m["counterfactual"]) == {"top-k", "random"}
    assert all(set(by_s) == {"80"} and by_s["80"]["distance"]["count"] == 2 for by_k in m["counterfactual"].values() for by_s in by_k.values())


def test_committed_notebooks_have_no_outputs_and_one_parameters_cell(root):
    tracked = subprocess.run(["git", "ls-files", "notebooks/*.ipynb"], cwd=root, capture_output=True, text=True).stdout.split()
    paths = [root / t for t in tracked] or sorted((root / "notebooks").glob("*.ipynb"))
    assert paths
    for path in paths:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, path
