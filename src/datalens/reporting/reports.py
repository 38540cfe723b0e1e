"""Figures and metrics of finished stages, drawn from stores and results (never inside a method).

Each stage writes two files (:func:`write_results`): ``results.json``, everything it measured
(what the report and the README read), and ``metrics.json``, its headline numbers, a flat mapping
of a few dozen scalars at most (what ``dvc metrics show`` and ``dvc exp show`` put side by side).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from IPython.display import Image, Markdown, display

from datalens.reporting import plots
from datalens.core.store import SubsetStore


def report_subset_run(store: SubsetStore, fig_dir) -> dict:
    """Figures and metrics of a finished run: accuracy across models, margin distributions,
    and the mean margin of a target with and without the training example whose inclusion
    moves it most."""
    fig_dir = Path(fig_dir)
    test = store.read("test_outputs")
    masks = store.read("masks")
    acc = store.read("test_metric")
    target = int(np.argmin(np.abs(np.median(test, 0))))  # the least certain target shows effects best
    counts_in = masks.sum(0)
    mean_in = masks.T.astype(np.float64) @ test[:, target] / np.maximum(counts_in, 1)
    mean_out = (~masks).T.astype(np.float64) @ test[:, target] / np.maximum(len(masks) - counts_in, 1)
    train_index = int(np.argmax(np.abs(mean_in - mean_out)))
    plots.accuracy_histogram(acc, fig_dir / "test_accuracy.png")
    plots.margin_distributions(test, np.array([target, 0, 1]), fig_dir / "margin_distributions.png")
    plots.with_without(test[masks[:, train_index], target], test[~masks[:, train_index], target], target, train_index,
                       fig_dir / "with_without.png")
    return {
        "num_models": int(len(test)),
        "test_accuracy_mean": float(acc.mean()),
        "test_accuracy_std": float(acc.std()),
        "subset_size_mean": float(masks.sum(1).mean()),
        "example_target": target,
        "example_train_index": train_index,
        "example_margin_with": float(mean_in[train_index]),
        "example_margin_without": float(mean_out[train_index]),
        "n_train": int(masks.shape[1]),
        "n_test": int(test.shape[1]),
    }


def best_record(m: dict, method: str, **match) -> dict:
    """The record of ``method`` (matching ``match``) with the highest LDS in stage 05's results."""
    recs = [r for r in m["records"] if r["method"] == method and all(r.get(k) == v for k, v in match.items())]
    return max(recs, key=lambda r: r["lds"])


def mean_p95(m: dict, method: str, split: str = "forget") -> float:
    """Mean over the reported forget sets of a method's 95th-percentile KLoM on ``split`` at its chosen setting."""
    vals = [r[f"{split}_p95"] for r in m["table"] if r["method"].split(" ")[0] == method]
    return sum(vals) / len(vals)


UNLEARNING_METHODS = ("floor", "do_nothing", "gd", "ga", "ascent_descent", "scrub", "om", "dmm", "dm_direct")


def _scalars(r: dict) -> dict:
    return {k: v for k, v in r.items() if isinstance(v, (int, float, bool)) and not isinstance(v, str)}


def _counterfactuals(r: dict) -> dict:
    b = r["brittleness"]
    k = list(b["fraction_flipped_predicted"])[-1]
    return {**{f"pearson_{kind}": v["pearson"] for kind, v in r["agreement"].items()},
            f"flipped_predicted_k{k}": b["fraction_flipped_predicted"][k], f"flipped_confirmed_k{k}": b["fraction_flipped_confirmed"][k]}


def _attribution(r: dict) -> dict:
    over = r["datamodels_overtake_trak"]
    return {**_scalars(r), **{f"best_lds_{m}": v for m, v in r["best_lds"].items()},
            "datamodels_overtake_trak_at_models": over.get("models", -1)}


def _modeldiff(r: dict) -> dict:
    planted, nat = r["planted"], r["natural"]["intervention"]
    return {**{f"accuracy_{k}": v for k, v in r["accuracy"].items()}, "planted_auroc": planted["auroc"],
            "planted_precision": planted["precision_at_planted"], "control_largest_variance_ratio": r["control"]["null"]["largest_variance_ratio"],
            **{f"{case}_p_value": r[case]["null"]["p_value"] for case in ("planted", "control", "natural")},
            "natural_b_over_a_contrasted": nat["b_over_a_contrasted"], "natural_b_over_a_other": nat["b_over_a_other"]}


def _modeldiff_train(r: dict) -> dict:
    return {f"{name}_{k}": v for name, run in r.items() for k, v in _scalars(run).items()}


def _unlearning(r: dict) -> dict:
    return {"num_models": r["num_models"], **{f"forget_klom_p95_{m}": mean_p95(r, m) for m in UNLEARNING_METHODS},
            **{f"retain_klom_p95_{m}": mean_p95(r, m, "retain") for m in ("floor", "do_nothing", "om", "dmm", "dm_direct")},
            "diverged_models": sum(int(row.get("diverged_models", 0)) for row in r["table"])}


def _clip(r: dict) -> dict:
    drops = {f"cosine_drop_k{c['k']}_{m}": c["mean"] for m, curve in r["counterfactual"].items() for c in curve[-1:]}
    return {**_attribution(r), **drops}


def _fact_tracing(r: dict) -> dict:
    drops = {f"{measure}_drop_k{c['k']}_{m}": c["mean"] for measure, curves in r["counterfactual"].items()
             for m, curve in curves.items() for c in curve[-1:]}
    return {**_attribution(r), **{f"{metric}_{m}": v for m, row in r["retrieval"].items() for metric, v in row.items()}, **drops}


def _text_classification(r: dict) -> dict:
    same = {f"same_subject_top5_{m}": v["top_k"] for m, v in r.get("same_subject_top5", {}).items()}
    return {**_attribution(r), **same}


def _diffusion(r: dict) -> dict:
    groups = {f"best_lds_{g}_{m}": max(row[f"lds_{g}"] for row in r["lds_table"] if row["method"] == m)
              for m in ("trak_loss", "trak_square_norm", "trak_loss_to_square_norm") for g in r["ceiling"]
              if any(row["method"] == m for row in r["lds_table"])}
    ceilings = {f"{k}_{g}": c[k] for g, c in r["ceiling"].items() for k in ("seed_agreement", "mean_ceiling")}
    step = r["stepwise"]
    cf = {f"{measure}_step{s}_{m.replace('-', '_')}": v[measure]["mean"] for m, by_k in r["counterfactual"].items()
          for by_s in list(by_k.values())[-1:] for s, v in by_s.items() for measure in ("class_changed", "moved_away")}
    return {**_attribution(r), **groups, **ceilings, f"same_class_first_step{step['steps'][0]}": step["same_class"][0],
            f"same_class_last_step{step['steps'][-1]}": step["same_class"][-1], **cf}


HEADLINES = {"train_subsets": _scalars, "eval_models": _scalars, "fit_datamodels": _scalars, "counterfactuals": _counterfactuals,
             "attribution_comparison": _attribution, "modeldiff_train": _modeldiff_train, "modeldiff": _modeldiff,
             "unlearning": _unlearning, "clip": _clip,
             "fact_tracing": _fact_tracing, "text_classification": _text_classification, "diffusion": _diffusion}


def headline(stage: str, results: dict) -> dict[str, float | int | bool]:
    """A stage's headline numbers: flat, scalars only, rounded to 4 significant digits."""
    def rounded(v):
        return v if isinstance(v, (bool, int)) or not math.isfinite(v) else float(f"{v:.4g}")
    return {k: rounded(v) for k, v in HEADLINES[stage](results).items()}


def write_results(out_dir, stage: str, results: dict) -> dict:
    """Write ``results.json`` (everything) and ``metrics.json`` (the headline) into ``out_dir``;
    returns the headline, for the notebook to show."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    top = headline(stage, results)
    (out_dir / "metrics.json").write_text(json.dumps(top, indent=1))
    return top


def show_stage(out_dir, top: dict, root) -> None:
    """In the stage's notebook: its headline numbers as a table, then every figure it drew, each
    under its path relative to the repo (so the executed notebook shows what the stage made)."""
    out_dir, root = Path(out_dir).resolve(), Path(root).resolve()
    rel = out_dir.relative_to(root) if out_dir.is_relative_to(root) else out_dir
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in top.items())
    display(Markdown(f"**Headline numbers** (`{rel}/metrics.json`; everything in `{rel}/results.json`)\n\n"
                     f"| metric | value |\n|---|---|\n{rows}"))
    for png in sorted((out_dir / "figures").glob("*.png")):
        display(Markdown(f"`{rel}/figures/{png.name}`"))
        display(Image(filename=str(png)))
