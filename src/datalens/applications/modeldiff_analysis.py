"""What stage modeldiff reports (ModelDiff, Shah et al. 2023): the planted case's recovery of the
patched training images, the patch intervention, the same-algorithm control, and the natural
case's inferred feature with its blending intervention. The method is
:mod:`datalens.applications.modeldiff`; figures are drawn by the notebook from these results."""
from __future__ import annotations

import numpy as np

from datalens.applications.modeldiff import (AttributionPair, Directions, blend_toward, contrasted_classes, intervention_effect,
                                             largest_variance_ratio, model_diff, model_swap_null, per_target_cosine,
                                             permutation_p_value, recovery)
from datalens.core.data import Dataset, stamp


def significance(pair: AttributionPair, a_minus_b: Directions, b_minus_a: Directions, k: int, permutations: int,
                 seed: int) -> dict:
    """The largest variance ratio of either residual beside its model-swap null
    (:func:`~datalens.applications.modeldiff.model_swap_null`): null quantiles and the p-value."""
    observed = largest_variance_ratio(a_minus_b, b_minus_a)
    null = model_swap_null(pair, k, permutations, seed)
    return {"largest_variance_ratio": observed, "null_median": float(np.median(null)), "null_p95": float(np.quantile(null, 0.95)),
            "null_max": float(null.max()), "permutations": int(permutations), "p_value": permutation_p_value(observed, null)}


def planted_case(pair: AttributionPair, ds: Dataset, k: int, permutations: int,
                 seed: int) -> tuple[dict, Directions, Directions, int]:
    """Directions of A minus B and B minus A (k each) for attributions (n, t) of the algorithm that
    cannot see the patch (A) and the one that can (B), ``pair``. The reported direction of B minus A is
    chosen without the planted labels: the one B's attributions explain most relative to A's
    (the largest variance ratio B/A). Its recovery of the planted training images is reported,
    with every direction's beside it, and its significance against the model-swap null."""
    a_minus_b, b_minus_a = model_diff(pair.theta_a, pair.theta_b, k)
    planted = ds.planted
    by_direction = [recovery(b_minus_a.components[c], planted) for c in range(k)]
    chosen = int(np.argmax(1 / b_minus_a.variance_ratio))  # B over A: no planted labels used
    result = {"count": int(len(planted)), "test_count": int(len(ds.planted_test)), "chosen_direction": chosen + 1,
              "chosen_by": "largest variance ratio B/A (no planted labels)", **by_direction[chosen],
              "recovery_by_direction": by_direction,
              "variance_a": b_minus_a.variance_a.tolist(), "variance_b": b_minus_a.variance_b.tolist(),
              "a_minus_b_variance_a": a_minus_b.variance_a.tolist(), "a_minus_b_variance_b": a_minus_b.variance_b.tolist(),
              "null": significance(pair, a_minus_b, b_minus_a, k, permutations, seed)}
    result["top_targets_with_patch"] = float(np.isin(b_minus_a.top_targets(chosen, len(ds.planted_test)), ds.planted_test).mean())
    return result, a_minus_b, b_minus_a, chosen


def patch_intervention(algos: dict, stores: dict, md: dict, ds: Dataset) -> dict[str, list[dict]]:
    """The patch stamped, at ``md['patch_intensities']`` of its value, on test images of the other
    classes: the change in the planted class's probability under each planted algorithm."""
    patch = md["patch"]
    others = ds.y_test != patch["label"]

    def with_patch(x, fraction):
        return stamp(x, patch["size"], patch["row"], patch["col"], fraction * patch["value"])

    return {name: intervention_effect(algos[name], stores[name], md["num_checkpoints"], ds.x_test[others], ds.y_test[others],
                                      with_patch, md["patch_intensities"], watch=patch["label"])
            for name in ("planted_a", "planted_b")}


def control_case(pair: AttributionPair, k: int, permutations: int, seed: int) -> tuple[dict, Directions, Directions]:
    """The negative control: one algorithm under two sets of seeds, ``pair``; its largest variance
    ratio against the model-swap null (a control that passes has a p-value that is not small)."""
    c1, c2 = model_diff(pair.theta_a, pair.theta_b, k)
    result = {"variance_ratios_1_minus_2": c1.variance_ratio.tolist(), "variance_ratios_2_minus_1": c2.variance_ratio.tolist(),
              "per_target_cosine_median": float(np.median(per_target_cosine(pair.theta_a, pair.theta_b))),
              "null": significance(pair, c1, c2, k, permutations, seed)}
    return result, c1, c2


def natural_case(pair: AttributionPair, k: int, permutations: int, seed: int) -> tuple[dict, Directions, Directions]:
    """Directions of A minus B and B minus A for two natural algorithms, with their variances and
    the significance of the largest ratio against the model-swap null."""
    n_a, n_b = model_diff(pair.theta_a, pair.theta_b, k)
    return ({"a_minus_b": {"variance_a": n_a.variance_a.tolist(), "variance_b": n_a.variance_b.tolist()},
             "b_minus_a": {"variance_a": n_b.variance_a.tolist(), "variance_b": n_b.variance_b.tolist()},
             "null": significance(pair, n_a, n_b, k, permutations, seed)}, n_a, n_b)


def per_target_cosines(pairs: dict[str, AttributionPair]) -> dict[str, np.ndarray]:
    """Per-target cosine of the two algorithms' attributions, for each case."""
    return {case: per_target_cosine(pair.theta_a, pair.theta_b) for case, pair in pairs.items()}


def natural_intervention(algos: dict, stores: dict, md: dict, base: Dataset, n_a: Directions, n_b: Directions) -> dict:
    """The feature the leading direction of the more asymmetric residual contrasts (training images
    of class ``first`` against ``second``), and its test: test images of ``first`` blended toward
    the mean training image of ``second`` and, as the yardstick, toward the mean of every other
    class, for both algorithms. Returns ``inferred``, ``intervention`` (what the metrics keep) and
    the effects per algorithm for the figure."""
    lead_name, lead = max((("A minus B", n_a), ("B minus A", n_b)), key=lambda t: max(t[1].variance_ratio[0], 1 / t[1].variance_ratio[0]))
    first, second = contrasted_classes(lead, 0, base.y_train)
    inferred = {"residual": lead_name, "variance_ratio": float(lead.variance_ratio[0]), "contrasts_classes": [first, second]}
    sel = base.y_test == first
    rest = (base.y_train != first) & (base.y_train != second)
    blend_effects, yardstick = {}, {}
    for name in ("natural_a", "natural_b"):
        for into, mean in ((blend_effects, base.x_train[base.y_train == second].mean(0)), (yardstick, base.x_train[rest].mean(0))):
            into[name] = intervention_effect(algos[name], stores[name], md["num_checkpoints"], base.x_test[sel], base.y_test[sel],
                                             blend_toward(mean), md["blend_intensities"])

    def ratio(eff):
        return eff["natural_b"][-1]["margin_change"]["mean"] / eff["natural_a"][-1]["margin_change"]["mean"]

    intervention = {"toward_contrasted_class": blend_effects, "toward_other_classes": yardstick,
                    "b_over_a_contrasted": ratio(blend_effects), "b_over_a_other": ratio(yardstick)}
    return {"inferred": inferred, "intervention": intervention, "first": first, "second": second, "lead": lead}
