"""Stage diffusion: TRAK for denoising diffusion models, the Journey paper's step-wise attribution
(Georgiev et al., 2023) and D-TRAK's output functions (Zheng et al., 2024), in miniature.

The ``diffusion`` section of the params is a run of its own (:data:`datalens.core.config.SECTIONS`).

1. A *reference* DDPM trained on the whole training set (``denoising.reference_store``, its own
   stream) generates ``denoising.num_generated`` samples from seeded noise (:func:`generate`); they
   join the test split, so every subset model records its denoising loss on validation images and
   on generated samples alike (:class:`datalens.tasks.diffusion.DiffusionTask`: the loss at each
   target's fixed draws, the LDS ground truth).
2. TRAK for each output function of ``denoising.outputs`` (the loss, TRAK's and the Journey
   paper's; D-TRAK's alternatives) at each number of timesteps K of ``denoising.timesteps``, and
   datamodels, empirical influence and grad-dot/grad-cosine, all scored by LDS under stage 05's
   accounting, on validation images and generated samples apart (:func:`run_methods`).
3. Step-wise attribution: for ``denoising.trajectories`` generated samples, TRAK scores of the
   denoising loss of the reference model's x_0 prediction at each step of ``denoising.steps``,
   re-noised to that step (:func:`step_scores`), and how the top training images change along
   the trajectory: their overlap between steps and how many share the final sample's class, by a
   fixed classifier (:func:`stepwise_summary`).
4. The counterfactual: remove the top-k training images attributed at step s (or k at random),
   retrain, resample from the same x_s with the same noise, and measure how far the new final
   sample moves and whether the classifier's class changes, against the model retrained on the
   full set with the same seed (common random numbers) from the same x_s (:func:`counterfactual`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.svm import SVC

from datalens.applications import comparison
from datalens.attribution import datamodels, projection
from datalens.attribution.trak import FeatureJob, FeatureStore, ModelFeatures, featurize_checkpoints, kernel_terms, target_features
from datalens.core.config import resolve_location
from datalens.core.data import resolve_callable
from datalens.core.sampling import model_seed
from datalens.core.store import identity_hash
from datalens.evaluation.metrics import linear_datamodeling_score, noise_ceiling, seed_agreement
from datalens.tasks.diffusion import sample, sampling_noise, step_targets
from datalens.training.engine import resolve_device
from datalens.training.runs import SubsetRun, trained_on_masks, train_subset_models


def _local(location: str) -> Path:
    if location.startswith("file://"):
        return Path(location[len("file://"):])
    if "://" in location:
        raise ValueError(f"diffusion.denoising.reference_store={location!r}: generated samples are written to a local folder; give a path")
    return Path(location)


def check(run: SubsetRun, dp: dict) -> None:
    """What the params ask of the data, before any training: the loss among ``denoising.outputs``
    (step-wise attribution uses it), every K of ``denoising.timesteps`` at most the draws each
    example carries. One line naming the param."""
    if "loss" not in dp["outputs"]:
        raise ValueError(f"diffusion.denoising.outputs={dp['outputs']!r} is not allowed; it must include loss (step-wise attribution uses it)")
    available = run.dataset_().y_train.shape[1]
    if max(dp["timesteps"]) > available:
        raise ValueError(f"diffusion.denoising.timesteps={dp['timesteps']!r} is not allowed; data.dataset={run.dataset!r} carries "
                         f"{available} fixed draws per example, so every K must be in [1, {available}]")


def noise_ceilings(per_mask: np.ndarray, groups: dict[str, np.ndarray], repeats: int) -> dict[str, dict]:
    """The noise ceiling (:func:`datalens.evaluation.metrics.noise_ceiling`) of each target group, from
    held-out outputs (masks, repeats, t)."""
    return {name: noise_ceiling(per_mask[:, 0, cols], per_mask[:, 1, cols], repeats) for name, cols in groups.items()}


def mask_bootstrap(scores: np.ndarray, ground: comparison.Ground, per_mask: np.ndarray, draws: int, seed: int) -> dict[str, dict]:
    """How much the held-out masks alone move two numbers of each target group: the standard
    deviation, over ``draws`` resamplings of the evaluation masks with replacement (seeded), of the
    LDS of ``scores`` (n, t) and of the seed agreement of ``per_mask`` (masks, repeats, t)."""
    rng = np.random.default_rng([seed, 43])
    out = {}
    for name, cols in ground.groups.items():
        lds, agreement = [], []
        for _ in range(draws):
            rows = rng.integers(0, len(ground.masks), len(ground.masks))
            lds.append(linear_datamodeling_score(scores[:, cols], ground.masks[rows], ground.actual_mean[rows][:, cols]))
            agreement.append(seed_agreement(per_mask[rows, 0][:, cols], per_mask[rows, 1][:, cols]))
        out[name] = {"lds": linear_datamodeling_score(scores[:, cols], ground.masks, ground.actual_mean[:, cols]),
                     "lds_se": float(np.std(lds)), "seed_agreement_se": float(np.std(agreement)), "draws": draws}
    return out


def reference_run(run: SubsetRun, dp: dict, root: str) -> SubsetRun:
    """The reference model: one model of ``run``'s recipe on the whole training set, its own stream."""
    return replace(run, alpha=1.0, num_models=1, block_size=1, num_checkpoints=1, stream="diffusion_reference",
                   store=resolve_location({"_root": root}, dp["reference_store"]), generated=None)


def generate(run: SubsetRun, dp: dict, root: str, executor=None) -> tuple[str, dict[str, torch.Tensor]]:
    """Train (or reopen) the reference model and sample ``dp["num_generated"]`` images from the noise
    of ``dp["sampling_seed"]``. Returns the .npy of the final samples (beside the reference store,
    named by what made them) and the trajectories (:func:`datalens.tasks.diffusion.sample`)."""
    ref = reference_run(run, dp, root)
    store = train_subset_models(ref, executor=executor)
    model = ref.load_checkpoint(store, 0, resolve_device(run.device))
    ds, task = ref.dataset_(), ref.make_task()
    noise = sampling_noise(dp["sampling_seed"], dp["num_generated"], task.steps, int(np.prod(ds.input_shape)))
    traj = sample(model, task, noise.to(resolve_device(run.device)), ds.input_shape)
    traj = {k: v.cpu() for k, v in traj.items()}
    path = _local(ref.store) / f"generated_{identity_hash({**ref.identity(), 'seed': dp['sampling_seed'], 'count': dp['num_generated']})}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, traj["final"].reshape(len(noise), *ds.input_shape).numpy())
    return str(path), {**traj, "noise": noise}


def target_groups(n_test: int, num_generated: int) -> dict[str, np.ndarray]:
    """The test columns of the validation images and of the generated samples (appended last)."""
    return {"validation": np.arange(n_test - num_generated), "generated": np.arange(n_test - num_generated, n_test)}


def feature_job(run: SubsetRun, cp: dict, output: str, draws: int) -> FeatureJob:
    """The TRAK features of ``output`` summed over ``draws`` timesteps: a store of their own in the
    ``trak.store`` folder (or beside an explicit ``.zarr`` store, named by the variant)."""
    tp = cp["trak"]
    location = resolve_location(cp, tp["store"])
    if location.rstrip("/").endswith(".zarr"):
        location = f"{location.rstrip('/')[:-len('.zarr')]}_{output}_K{draws}.zarr"
    return FeatureJob(run, location, tuple(tp["proj_dims"]), tp["proj_type"], run.seed,
                      backend=projection.projector_backend(resolve_device(run.device)),
                      task_options=(("output", output), ("draws", draws)))


@dataclass(frozen=True)
class MixedFeatures:
    """TRAK features whose training side comes from one feature store and whose target side from
    another (the same checkpoints and projections, another output), the targets' times ``sign``:
    the Journey paper's training side (the loss) with another output on the target side."""

    train: FeatureStore
    targets: FeatureStore
    sign: float = 1.0

    def features(self, models: list[int], proj_dim: int) -> list[ModelFeatures]:
        return [ModelFeatures(a.train, self.sign * b.targets, a.q)
                for a, b in zip(self.train.features(models, proj_dim), self.targets.features(models, proj_dim))]

    def seconds(self, models: int, proj_dim: int) -> np.ndarray:
        """Both stores' featurisation seconds: the loss's gradients for the training side, the output's for the targets."""
        return self.train.seconds(models, proj_dim) + self.targets.seconds(models, proj_dim)


def validation_sign(cmp: comparison.Comparison, features: MixedFeatures, proj_dim: int, ridge: float) -> float:
    """The sign of a mixed TRAK's scores, chosen on the validation models (a target-side output
    other than the loss has no sign convention relative to it): +1 unless the first checkpoint's
    scores at ``ridge`` correlate negatively with the validation models' outputs."""
    f = features.features([0], proj_dim)[0]
    f = ModelFeatures(f.train, f.targets[cmp.ground.cols], f.q)
    _, val = cmp.select({1.0: kernel_terms(f, ridge).numpy(), -1.0: -kernel_terms(f, ridge).numpy()})
    return 1.0 if val[1.0] >= val[-1.0] else -1.0


def run_methods(cmp: comparison.Comparison, run: SubsetRun, store, cp: dict, executor=None) -> None:
    """TRAK for every output of ``denoising.outputs`` at every K of ``denoising.timesteps``, the same
    output for training and target images as D-TRAK has it (method ``trak_<output>``, knob
    ``timesteps``) and, for an output other than the loss, the loss on the training side as in the
    Journey paper with the output on the target side (``trak_loss_to_<output>``, its sign chosen on
    validation models and the choice charged); datamodels at ``datamodels.model_counts`` and on
    every model (when the section has ``datamodels``), empirical influence at those counts, and
    grad-dot and grad-cosine (the loss over every draw) averaged over ``attribution.ensemble_sizes``
    checkpoints."""
    tp, dp, d, ap = cp["trak"], cp["denoising"], cp.get("datamodels"), cp["attribution"]
    trak = dict(num_models=tp["num_models"], proj_dims=tp["proj_dims"], ridges=tp["ridge_grid"])
    for draws in sorted(dp["timesteps"]):  # ascending: scores kept by (method, M, k) end as the largest K's
        stores = {output: featurize_checkpoints(feature_job(run, cp, output, draws), max(tp["num_models"]), executor=executor)
                  for output in dict.fromkeys(["loss", *dp["outputs"]])}
        for output in dp["outputs"]:
            comparison.run_trak(cmp, stores[output], **trak, method=f"trak_{output}", output=output, timesteps=draws)
            if output == "loss":
                continue
            t0, mixed = time.perf_counter(), MixedFeatures(stores["loss"], stores[output])
            mixed = replace(mixed, sign=validation_sign(cmp, mixed, max(tp["proj_dims"]), float(np.median(tp["ridge_grid"]))))
            chose = time.perf_counter() - t0
            first = len(cmp.records)
            comparison.run_trak(cmp, mixed, **trak, method=f"trak_loss_to_{output}", output=output, timesteps=draws, sign=mixed.sign)
            for rec in cmp.records[first:]:  # the sign's choice is charged to every point of it
                rec["own_seconds"] += chose
                rec["seconds"] += chose
    done = int(store.completed().sum())
    counts = sorted({n for n in (d["model_counts"] if d else []) if n <= done} | {done})
    if d:  # a section without datamodels (the paper profile) skips them
        solver = dict(num_lambdas=d["num_lambdas"], eps=d["eps"], max_iter=d["max_iter"], tol=d["tol"], device=str(resolve_device(run.device)))
        comparison.run_datamodels(cmp, ((n, dm, s) for n, dm, _, s in datamodels.timed_fits(store, counts, d["val_fraction"], run.seed, solver)))
    comparison.run_empirical_influence(cmp, store, counts)
    models, load = comparison.load_checkpoints(run, store, max(ap["ensemble_sizes"]))
    comparison.run_gradient_similarity(cmp, run, models, load, ap["ensemble_sizes"])


def lds_table(records: list[dict]) -> list[dict]:
    """One row per TRAK variant and model count at its largest k, and per baseline setting: the
    method, output, K, models, LDS (pooled, per group, single-model) and charged seconds."""
    top_k = max((r["proj_dim"] for r in records if r.get("proj_dim")), default=None)
    rows = []
    for r in records:
        if r.get("proj_dim") not in (None, top_k):
            continue
        rows.append({"method": r["method"], "timesteps": r.get("timesteps"), "models": r["models_used"], "lds": r["lds"],
                     "lds_single": r["lds_single"], **{f"lds_{g}": v for g, v in r.get("lds_by_group", {}).items()},
                     "seconds": r["seconds"]})
    return rows


def kept_trak(cp: dict) -> tuple[str, int, int]:
    """The comparison key (method, models used, proj_dim) of TRAK with the loss at its most models and
    largest k, whose scores (at the largest K, :func:`run_methods` runs K ascending) the bootstrap reads."""
    return "trak_loss", max(cp["trak"]["num_models"]), max(cp["trak"]["proj_dims"])


def best_trak(records: list[dict], output: str = "loss") -> dict:
    """The record of TRAK with ``output`` at its most models, largest k and largest K: the setting
    step-wise attribution uses (its ridge chosen on validation models there)."""
    rs = [r for r in records if r["method"] == f"trak_{output}"]
    return max(rs, key=lambda r: (r["models_used"], r["proj_dim"], r["timesteps"]))


def train_labels(run: SubsetRun) -> np.ndarray:
    """The training images' classes (n,), from the dataset function's ``labels(root)`` (training never sees them)."""
    labels = getattr(resolve_callable(run.dataset, "data.dataset", run.repo), "labels", None)
    if labels is None:
        raise ValueError(f"data.dataset={run.dataset!r} gives no `labels(root)`: the diffusion stage's classifier needs them")
    return np.asarray(labels(run.data_root)[0])


def classifier(run: SubsetRun, most: int = 10_000) -> SVC:
    """The fixed classifier of generated images: an RBF SVM (scikit-learn's defaults) on the training
    images and their classes (at most ``most`` of them, a seeded sample: its fit grows as n^2)."""
    ds = run.dataset_()
    rows = np.arange(ds.n_train) if ds.n_train <= most else comparison.seeded_sample(ds.n_train, most, run.seed, 41)
    return SVC().fit(ds.x_train[rows].reshape(len(rows), -1), train_labels(run)[rows])


def step_inputs(traj: dict, shown: np.ndarray, steps: list[int], draws: int, seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-wise targets, trajectory by trajectory and step by step ((len(shown) * len(steps)), ...):
    inputs (of the model's input ``shape``) the reference model's x_0 prediction at the step,
    targets ``draws`` noise draws at it."""
    steps_total, dim = traj["x0"].shape[1], int(np.prod(shape))
    x = torch.stack([traj["x0"][j, s].reshape(shape) for j in shown for s in steps])
    y = torch.cat([step_targets(seed, steps_total, s, len(shown), draws, dim)[[i]] for i in range(len(shown)) for s in steps])
    return x, y


def step_scores(run: SubsetRun, cp: dict, chosen: dict, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """TRAK scores (n, len(x)) of the step-wise targets (x, y) with the ``chosen`` record's output,
    K, M, k and ridge: the training features of the stored checkpoints (K draws each), the
    targets' (every draw of their step) featurised by the same projections."""
    job = feature_job(run, cp, chosen["output"], chosen["timesteps"])
    store = featurize_checkpoints(job, chosen["models_used"], progress=False)
    total, q = 0.0, 0.0
    for m in range(chosen["models_used"]):
        stored = store.features([m], chosen["proj_dim"])[0]
        f = ModelFeatures(stored.train, target_features(job, m, x, y, chosen["proj_dim"], draws=None), stored.q)  # all the step's draws
        total = total + kernel_terms(f, chosen["ridge"])
        q = q + f.q.double()
    return ((q / chosen["models_used"])[:, None] * total / chosen["models_used"]).numpy()


def stepwise_summary(scores: np.ndarray, shown: np.ndarray, steps: list[int], train_labels: np.ndarray, final_classes: np.ndarray,
                     k: int) -> dict:
    """How the top-``k`` training images of the step-wise ``scores`` (n, len(shown) * len(steps))
    change along the trajectories: per step, the fraction of them whose label is the class the
    classifier gives the final sample (``final_classes`` per shown trajectory; the chance rate is
    that class's share of the training set), and their overlap (|A & B| / k) with the next step's."""
    top = np.argsort(-scores, axis=0, kind="stable")[:k].T.reshape(len(shown), len(steps), k)
    same = (train_labels[top] == final_classes[:, None, None]).mean(-1)  # (trajectories, steps)
    chance = np.array([np.mean(train_labels == c) for c in final_classes])
    overlap = [float(np.mean([len(set(top[j, i]) & set(top[j, i + 1])) / k for j in range(len(shown))])) for i in range(len(steps) - 1)]
    return {"steps": list(steps), "k": k, "same_class": same.mean(0).tolist(), "same_class_chance": float(chance.mean()),
            "same_class_per_trajectory": same.tolist(), "overlap_with_next": overlap, "top": top.tolist(),
            "final_classes": [int(c) for c in final_classes]}


def counterfactual(run: SubsetRun, traj: dict, shown: np.ndarray, steps: list[int], scores: np.ndarray, cf: dict,
                   clf: SVC) -> dict:
    """The counterfactual of the module docstring for trajectories ``shown`` at the steps
    ``cf["steps"]`` (a subset of ``steps``, the columns of the step-wise ``scores`` (n, len(shown) *
    len(steps)), trajectory-major): for each k of ``cf["ks"]``, the top-k or k random training
    images (seeded by ``cf["seed"]``) removed, ``cf["num_retrains"]`` seeds (each shared by every
    mask: common random numbers). Per method, k and step, with 95% intervals over trajectories and
    seeds: ``distance``, the L2 distance of the new final sample to the full-data retrain's;
    ``class_changed``, whether the classifier's class changed; ``moved_away``, how much farther the
    new sample is from the removed images than the full-data retrain's (the mean over them of
    ||new - x_i|| - ||base - x_i||)."""
    ds = run.dataset_()
    n, device = ds.n_train, resolve_device(run.device)
    x_train = torch.as_tensor(ds.x_train.reshape(n, -1))
    rng = np.random.default_rng([cf["seed"], 37])
    pairs = [(j, s) for j in range(len(shown)) for s in cf["steps"]]
    masks, removals = [np.ones(n, bool)], [None]
    for j, s in pairs:
        column = scores[:, j * len(steps) + steps.index(s)]
        for k in cf["ks"]:
            for method, removed in (("top-k", np.argsort(-column, kind="stable")[:k]), ("random", rng.choice(n, k, replace=False))):
                mask = np.ones(n, bool)
                mask[removed] = False
                masks.append(mask)
                removals.append((method, k, j, s, removed))
    task, noise = run.make_task(), traj["noise"].to(device)

    def resample(model, j: int, s: int) -> torch.Tensor:
        return sample(model, task, noise[[shown[j]]], ds.input_shape, start=s, x_start=traj["states"][[shown[j]], s].to(device))["final"][0].cpu()

    out: dict = {}
    for r in range(cf["num_retrains"]):
        models = retrained(run, np.stack(masks), [model_seed(run.seed, 0, r, "counterfactual")] * len(masks))
        base = {(j, s): resample(models[0], j, s) for j, s in pairs}
        for model, (method, k, j, s, removed) in zip(models[1:], removals[1:]):
            new, old = resample(model, j, s), base[(j, s)]
            rec = out.setdefault(method, {}).setdefault(str(k), {}).setdefault(str(s), {"distance": [], "class_changed": [], "moved_away": []})
            rec["distance"].append(float((new - old).norm()))
            rec["class_changed"].append(float(clf.predict(new[None].numpy())[0] != clf.predict(old[None].numpy())[0]))
            away = (x_train[removed] - new).norm(dim=1) - (x_train[removed] - old).norm(dim=1)
            rec["moved_away"].append(float(away.mean()))
    return {method: {k: {s: {m: _interval(v) for m, v in rec.items()} for s, rec in by_s.items()} for k, by_s in by_k.items()}
            for method, by_k in out.items()}


def _interval(values: list[float]) -> dict:
    v = np.asarray(values, float)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "low": float(v.mean() - half), "high": float(v.mean() + half), "count": int(len(v))}


def retrained(run: SubsetRun, masks: np.ndarray, seeds: list[int]) -> list:
    """Models (eval mode, on the run's device) trained on ``masks`` (m, n) with ``seeds``."""
    device = resolve_device(run.device)
    out = []
    for state in trained_on_masks(run, masks, seeds).state_dicts():
        model = run.build_model()
        model.load_state_dict(state)
        out.append(model.to(device).eval())
    return out
