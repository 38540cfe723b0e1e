"""A scale model of the pipeline: each heavy step's peak memory and time, measured here at growing
sizes, fitted to the terms its algorithm says it grows by, and extrapolated to the paper profile
(CIFAR-10, ResNet-9) and to an ImageNet-sized case (1.2M images, ResNet-18).

Every point runs in fresh processes (so one point's freed memory cannot hide the next one's peak):
one for its time (the second of two runs, warm), one for its peak memory. Peak memory is the growth of the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over what it held before the step, plus the peak of
``torch.cuda.max_memory_allocated`` on a GPU. A step's memory is fitted as
``a + sum_j b_j * term_j`` (non-negative least squares over the points) with the terms in bytes
the code allocates (the ``b_j`` read as "how many such arrays are alive at the peak"), its time as
``a + sum_j c_j * work_j``. Both fits and their largest relative residuals go into the JSON.

Time on a GPU is the extrapolated CPU time scaled by the ratio of a dense GEMM's rate measured here,
in the same run and in the step's precision, to an assumed GPU rate (``GPU_RATES``: an A100's
peak tensor/FP64 rates at the stated utilisation): an assumption that holds only for steps bound
by matrix products, which is what every step here is.

    python benchmarks/scale.py [--steps STEP ...]   # measures, writes reports/bench/scale.json
    python benchmarks/scale.py --table              # the README's table from that JSON
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _common import ROOT, write_result
from datalens.applications.comparison import Comparison, Ground, run_trak
from datalens.attribution.baselines import grad_dot, influence_cg, params_within
from datalens.attribution.datamodels import Moments, fit_datamodels, ridge_set_contributions, split_models, target_block
from datalens.attribution.trak import ModelFeatures, featurize, gradient_chunk, trak_scores
from datalens.core.models import mlp, resnet9
from datalens.tasks.classification import ClassificationTask
from datalens.training.engine import TrainSettings, train_models

# The cases extrapolated to. d: parameters of the model; n: training examples; t: test targets;
# N: subset models the datamodels fit on; M, k: TRAK's checkpoints and largest projection;
# Nu, Tc, S: unlearning's models, logit columns ((n + t) x classes) and forget sets. pixels: the
# first stage's feature map, what activations grow by (ResNet-18's stem takes 224 x 224 to 56 x 56).
# scored: the targets stage 05 compares methods on (attribution.num_targets); lambdas, max_iter: the lasso path's.
CASES = {
    "paper (CIFAR-10, ResNet-9)": {"n": 50_000, "t": 10_000, "N": 50_000, "T": 10_000, "M": 100, "k": 8192,
                                   "d": None, "model": "resnet9", "classes": 10, "batch": 512, "epochs": 24,
                                   "pixels": 32 * 32, "image_pixels": 32 * 32, "subset": 25_000, "scored": 2000,
                                   "lambdas": 50, "max_iter": 300,
                                   "Nu": 100, "Tc": 600_000, "S": 8},
    "ImageNet-sized (ResNet-18)": {"n": 1_200_000, "t": 50_000, "N": 50_000, "T": 50_000, "M": 100, "k": 8192,
                                   "d": 11_689_512, "model": "resnet18", "classes": 1000, "batch": 512, "epochs": 16,
                                   "pixels": 56 * 56, "image_pixels": 224 * 224, "subset": 600_000, "scored": 2000,
                                   "lambdas": 50, "max_iter": 300,
                                   "Nu": 100, "Tc": 1_250_000_000, "S": 8},
}
# Assumed sustained GPU rates (FLOP/s): A100 peaks (312 TFLOP/s bf16 tensor, 19.5 fp32, 19.5 fp64 tensor)
# at 50% utilisation. On an H100 divide times by about 3.
GPU_RATES = {"bfloat16": 0.5 * 312e12, "float32": 0.5 * 19.5e12, "float64": 0.5 * 19.5e12}
HOST_LIMIT_GIB, DEVICE_LIMIT_GIB = 24, 80
# ResNet-18 at 224 x 224: 1.82G multiply-adds forward (He et al., 2016), x 2 FLOPs each, x 3 for forward + backward
RESNET18_TRAIN_FLOPS = 1.82e9 * 2 * 3


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(step: str, size: dict, what: str, queue) -> None:
    """Child process: prepare ``STEPS[step]``'s inputs at ``size`` and run it; ``what`` = "memory":
    once, reporting its peak GiB; "time": twice, reporting the second (warm: libraries loaded,
    kernels compiled) run's seconds."""
    counted = _rss_kib("VmRSS")  # inputs the pipeline holds in memory during the step count towards its peak
    prepared = STEPS[step]["prepare"](**size)
    if what == "time":
        STEPS[step]["run"](prepared)
        t0 = time.perf_counter()
        STEPS[step]["run"](prepared)
        queue.put(time.perf_counter() - t0)
        return
    before = counted if STEPS[step].get("count_inputs") else _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    STEPS[step]["run"](prepared)
    queue.put((_rss_kib("VmHWM") - before) / 2 ** 20)


# For the memory run the resident set should follow live memory: glibc hands every allocation over
# 128 KiB back to the kernel when it is freed (a fixed threshold; glibc's sliding one keeps freed blocks
# on its heap, where they would count again), and datalens does not raise it. The time run keeps the
# allocator as the pipeline runs it.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "DATALENS_MALLOC_TUNING": "0"}


def _in_child(step: str, size: dict, what: str, env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned child starts with the parent's environment as it is now
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(step, size, what, queue))
        proc.start()
        value = queue.get()
        proc.join()
        return value
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def measure(step: str, size: dict) -> dict:
    """One point: peak memory from a fresh process under :data:`MEMORY_ENV`, time from another."""
    return {**size, "seconds": _in_child(step, size, "time", {}), "peak_gib": _in_child(step, size, "memory", MEMORY_ENV)}


# --- the steps: prepare(**size) builds the inputs the pipeline would hold, run(prepared) is timed ---

def _masks(num: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((num, n)) < 0.5


def prep_datamodels(n: int, N: int, T: int, B: int) -> dict:
    rng = np.random.default_rng(0)
    masks = _masks(N, n, 1)
    w = rng.normal(size=(n, T)) * (rng.random((n, T)) < 20 / n)
    return {"masks": masks, "outputs": masks @ w + rng.normal(size=(N, T)), "block": B}


# The benchmark's lasso path: every solve runs all its iterations (tol < 0 stops no column), so a fit makes
# exactly FIT_ITERATIONS FISTA steps per block of targets: the path's, then the refit's 2 x max_iter.
BENCH_LAMBDAS, BENCH_MAX_ITER = 5, 20
FIT_ITERATIONS = BENCH_LAMBDAS * BENCH_MAX_ITER + 2 * BENCH_MAX_ITER


def run_datamodels(p: dict) -> None:
    """The fit as it runs on a GPU (float32 solves, targets in blocks of B), here on the CPU."""
    tr, va = split_models(len(p["masks"]), 0.1, 0)
    blocks = lambda rows: ((p["masks"][rows[a:a + 1000]], p["outputs"][rows[a:a + 1000]]) for a in range(0, len(rows), 1000))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every solve reaches max_iter here, by design
        fit_datamodels(Moments.from_blocks(blocks(tr)), Moments.from_blocks(blocks(va)), num_lambdas=BENCH_LAMBDAS,
                       max_iter=BENCH_MAX_ITER, tol=-1.0, progress=False, dtype=torch.float32, block=p["block"])


def prep_ridge_sets(n: int, N: int, Tc: int, S: int) -> dict:
    rng = np.random.default_rng(0)
    return {"masks": _masks(N, n, 1), "outputs": rng.normal(size=(N, Tc)).astype(np.float32), "sets": _masks(S, n, 2)}


def run_ridge_sets(p: dict) -> None:
    ridge_set_contributions(p["masks"], p["outputs"], p["sets"], 1.0)


class _GeneratedFeatures:
    """M models' features made when indexed (seeded by model), as a feature store reads them."""

    def __init__(self, n: int, t: int, k: int, M: int):
        self.shape, self.M = (n, t, k), M

    def __len__(self) -> int:
        return self.M

    def __getitem__(self, m: int):
        if m >= self.M:
            raise IndexError(m)
        n, t, k = self.shape
        g = torch.Generator().manual_seed(m)
        return ModelFeatures(torch.randn(n, k, generator=g), torch.randn(t, k, generator=g), torch.rand(n, generator=g))


def prep_trak_score(n: int, t: int, k: int, M: int) -> dict:
    return {"features": _GeneratedFeatures(n, t, k, M)}


def run_trak_score(p: dict) -> None:
    trak_scores(p["features"], 0.1)


class _FeatureReader(_GeneratedFeatures):
    """The same, read the way stage 05 reads a feature store: ``features([m], k)`` and ``seconds``."""

    def features(self, models, k):
        return [self[m] for m in models]

    def seconds(self, M, k):
        return np.zeros(M)


def prep_comparison(n: int, t: int, k: int, R: int) -> dict:
    rng = np.random.default_rng(0)
    masks, val = (rng.random((50, n)) < 0.5).astype(float), (rng.random((20, n)) < 0.5).astype(float)
    w = rng.normal(size=(n, t))
    ground = Ground(masks, masks @ w, masks @ w, val, val @ w)
    return {"cmp": Comparison(0.1, ground, keep={("trak", 2, k)}), "features": _FeatureReader(n, t, k, 2), "k": k,
            "ridges": list(np.geomspace(1e-3, 10, R))}


def run_comparison(p: dict) -> None:
    p["cmp"].records.clear()
    run_trak(p["cmp"], p["features"], [1, 2], [p["k"]], p["ridges"])


def _mlp_of_size(d_hidden: int, inputs: int = 64, classes: int = 10):
    torch.manual_seed(0)
    return mlp((inputs,), classes, hidden=(d_hidden, d_hidden))


def prep_gradients(n: int, t: int, hidden: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"task": ClassificationTask(), "model": _mlp_of_size(hidden), "x": torch.randn(n + t, 64, generator=g),
            "y": torch.randint(0, 10, (n + t,), generator=g), "n": n}


def run_grad_dot(p: dict) -> None:
    n = p["n"]
    names, _ = params_within(p["model"], len(p["x"]))  # as stage 05 runs it
    grad_dot(p["task"], p["model"], p["x"][:n], p["y"][:n], p["x"][n:], p["y"][n:], names)


def run_influence_cg(p: dict) -> None:
    n = p["n"]
    names, _ = params_within(p["model"], len(p["x"]))
    influence_cg(p["task"], p["model"], p["x"][:n], p["y"][:n], np.ones(n, bool), p["x"][n:], p["y"][n:], damping=[1.0, 10.0],
                 iters=5, param_names=names)


def gradient_params(case: dict) -> int:
    """Parameters the gradient baselines keep at ``case`` (``params_within``, as stage 05 chooses
    them); raises MemoryError where not even the output layer's last tensor fits."""
    if case["model"] == "resnet9":
        model = resnet9((3, 32, 32), 10, width=64)
    else:  # ResNet-18's trailing tensors (fc.weight 512 x 1000, fc.bias) after one standing for the rest
        model = nn.Module()
        model.body = nn.Parameter(torch.empty(case["d"] - 513_000))
        model.fc = nn.Linear(512, 1000)
    names, _ = params_within(model, case["n"] + case["t"])
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def prep_featurize(examples: int, width: int, k: int) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return {"task": ClassificationTask(), "model": resnet9((3, 32, 32), 10, width=width), "k": k,
            "x": torch.randn(examples, 3, 32, 32, generator=g), "y": torch.randint(0, 10, (examples,), generator=g)}


def run_featurize(p: dict) -> None:
    half = len(p["x"]) // 2
    featurize(p["task"], p["model"], p["x"][:half], p["y"][:half], p["x"][half:], p["y"][half:], p["k"], 0, 0)


def prep_train(n: int, batch: int, width: int) -> dict:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    settings = TrainSettings(epochs=1, lr=0.5, optimizer="sgd", batch_size=batch, schedule="triangular", peak_epoch=0.5,
                             augment=True, precision="bfloat16", label_smoothing=0.1)
    return {"task": ClassificationTask(0.1), "model": resnet9((3, 32, 32), 10, width=width), "settings": settings,
            "x": torch.randn(n, 3, 32, 32, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}


def run_train(p: dict) -> None:
    train_models(p["task"], [p["model"]], p["x"], p["y"], np.ones((1, len(p["x"])), bool), [0], p["settings"], batched=False)


def resnet_params(name: str, width: int = 64) -> int:
    if name != "resnet9":
        raise ValueError(name)
    return sum(p.numel() for p in resnet9((3, 32, 32), 10, width=width).parameters())


def train_flops_per_image(width: int = 64) -> float:
    """Forward + backward FLOPs of one 32x32 image through ResNet-9 (torch's FLOP counter)."""
    model = resnet9((3, 32, 32), 10, width=width)
    x = torch.randn(8, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 8


# Each step: where it runs in the pipeline, its sweep, the terms memory and time grow by (functions of
# the size, in bytes and in multiply-adds), and its precision (for the GPU rate).
STEPS = {
    "datamodels_fit": {
        "prepare": prep_datamodels, "run": run_datamodels,
        "where": "run.device (moments, Gram, solves: float32, B = target_block(n) targets at a time); host: the (n, T) results",
        "dtype": "float32",
        "sweep": [{"n": 2000, "N": 2000, "T": 50, "B": 50}, {"n": 4000, "N": 2000, "T": 20, "B": 20},
                  {"n": 6000, "N": 2000, "T": 20, "B": 20}, {"n": 2000, "N": 2000, "T": 1000, "B": 50},
                  {"n": 4000, "N": 2000, "T": 400, "B": 20}, {"n": 2000, "N": 2000, "T": 400, "B": 400},
                  {"n": 2000, "N": 4000, "T": 50, "B": 50}],
        "memory": {"n x n float32": lambda s: 4 * s["n"] ** 2, "n x T float64": lambda s: 8 * s["n"] * s["T"],
                   "n x B float32 (a block's solver)": lambda s: 4 * s["n"] * s["B"],
                   "block x n float64 (1000 models' masks)": lambda s: 8 * 1000 * s["n"],
                   "block x T float64 (1000 models' outputs)": lambda s: 8 * 1000 * s["T"]},
        "time": {"N n^2 (Gram)": lambda s: s["N"] * s["n"] ** 2, "I n^2 T (I FISTA steps)": lambda s: s["I"] * s["n"] ** 2 * s["T"]},
    },
    "unlearning_attribution": {
        "prepare": prep_ridge_sets, "run": run_ridge_sets, "where": "run.device (ridge_set_contributions)",
        "dtype": "float64",
        "sweep": [{"n": 500, "N": 100, "Tc": 4000, "S": 8}, {"n": 1000, "N": 100, "Tc": 4000, "S": 8},
                  {"n": 2000, "N": 100, "Tc": 4000, "S": 8}, {"n": 1000, "N": 100, "Tc": 32000, "S": 8}],
        "memory": {"n x n float64": lambda s: 8 * s["n"] ** 2, "S x Tc float64": lambda s: 8 * s["S"] * s["Tc"]},
        "time": {"n^3 (solve)": lambda s: s["n"] ** 3, "N S Tc": lambda s: s["N"] * s["S"] * s["Tc"]},
    },
    "trak_score": {
        "prepare": prep_trak_score, "run": run_trak_score, "where": "run.device (trak_scores over a lazy FeatureStore.features)",
        "dtype": "float32",
        "sweep": [{"n": 4000, "t": 1000, "k": 1024, "M": 2}, {"n": 8000, "t": 1000, "k": 1024, "M": 2},
                  {"n": 4000, "t": 4000, "k": 1024, "M": 2}, {"n": 4000, "t": 1000, "k": 2048, "M": 2},
                  {"n": 4000, "t": 1000, "k": 1024, "M": 4}],
        "memory": {"M (n+t) k float32 (every model's features)": lambda s: 4 * s["M"] * (s["n"] + s["t"]) * s["k"],
                   "(n+t) k float32 (one model's features)": lambda s: 4 * (s["n"] + s["t"]) * s["k"],
                   "n t float64 (scores)": lambda s: 8 * s["n"] * s["t"], "k^2 float64 (a factor)": lambda s: 8 * s["k"] ** 2},
        "time": {"M n k^2": lambda s: s["M"] * s["n"] * s["k"] ** 2, "M n t k": lambda s: s["M"] * s["n"] * s["t"] * s["k"],
                 "M k^3": lambda s: s["M"] * s["k"] ** 3, "M (n+t) k (reading features)": lambda s: s["M"] * (s["n"] + s["t"]) * s["k"]},
    },
    "comparison_trak": {
        "prepare": prep_comparison, "run": run_comparison,
        "where": "host (stage 05's run_trak: TRAK chosen and scored on attribution.num_targets targets)", "dtype": "float64",
        "sweep": [{"n": 2000, "t": 200, "k": 256, "R": 5}, {"n": 4000, "t": 200, "k": 256, "R": 5},
                  {"n": 2000, "t": 400, "k": 256, "R": 5}, {"n": 2000, "t": 200, "k": 512, "R": 5},
                  {"n": 2000, "t": 200, "k": 256, "R": 2}],
        "memory": {"R n t float64 (a sum and a candidate per ridge)": lambda s: 8 * s["R"] * s["n"] * s["t"],
                   "n t float64 (chosen scores, thresholds)": lambda s: 8 * s["n"] * s["t"],
                   "(n + t) k float32 (one model's features)": lambda s: 4 * (s["n"] + s["t"]) * s["k"],
                   "k^2 float64 (the kernel)": lambda s: 8 * s["k"] ** 2},
        "time": {"M n k^2": lambda s: 2 * s["n"] * s["k"] ** 2, "R M n t k": lambda s: 2 * s["R"] * s["n"] * s["t"] * s["k"],
                 "R n t (selection, LDS)": lambda s: s["R"] * s["n"] * s["t"]},
    },
    "grad_dot": {
        "prepare": prep_gradients, "run": run_grad_dot, "where": "run.device (the parameters whose gradients fit 8 GiB)",
        "dtype": "float64",
        "sweep": [{"n": 400, "t": 100, "hidden": 64}, {"n": 400, "t": 100, "hidden": 128}, {"n": 400, "t": 100, "hidden": 256},
                  {"n": 800, "t": 100, "hidden": 128}, {"n": 400, "t": 400, "hidden": 128}],
        "memory": {"(n + t) d float64": lambda s: 8 * (s["n"] + s["t"]) * s["d"]},
        "time": {"(n + t) d": lambda s: (s["n"] + s["t"]) * s["d"], "n t d": lambda s: s["n"] * s["t"] * s["d"]},
    },
    "influence_cg": {
        "prepare": prep_gradients, "run": run_influence_cg, "where": "run.device (the same parameters, all targets at once)",
        "dtype": "float64",
        "sweep": [{"n": 400, "t": 50, "hidden": 64}, {"n": 400, "t": 50, "hidden": 128}, {"n": 400, "t": 50, "hidden": 256},
                  {"n": 400, "t": 200, "hidden": 128}, {"n": 800, "t": 50, "hidden": 128}],
        "memory": {"(n + t) d float64": lambda s: 8 * (s["n"] + s["t"]) * s["d"], "d t float64 (Krylov)": lambda s: 8 * s["d"] * s["t"]},
        "time": {"n d t (HVPs)": lambda s: s["n"] * s["d"] * s["t"], "(n + t) d": lambda s: (s["n"] + s["t"]) * s["d"]},
    },
    "trak_featurize": {
        "prepare": prep_featurize, "run": run_featurize, "where": "run.device (per checkpoint, chunks of gradient_chunk(d) examples)",
        "dtype": "float32",
        "sweep": [{"examples": 64, "width": 8, "k": 256}, {"examples": 64, "width": 16, "k": 256},
                  {"examples": 64, "width": 32, "k": 256}, {"examples": 128, "width": 16, "k": 256},
                  {"examples": 64, "width": 16, "k": 2048}, {"examples": 512, "width": 8, "k": 2048}],
        "memory": {"chunk d float32 (gradients)": lambda s: 4 * min(s["examples"], s["chunk"]) * s["d"],
                   "16384 k float32 (a block of P)": lambda s: 4 * 16384 * s["k"],
                   "examples k float32 (features)": lambda s: 4 * s["examples"] * s["k"]},
        "time": {"examples d (gradients)": lambda s: s["examples"] * s["d"], "examples d k (projection)": lambda s: s["examples"] * s["d"] * s["k"]},
    },
    "train_per_model": {
        "prepare": prep_train, "run": run_train, "where": "run.device (one model, one epoch here)",
        "dtype": "bfloat16", "count_inputs": True,  # the training images stay on the device
        "sweep": [{"n": 128, "batch": 64, "width": 32}, {"n": 256, "batch": 64, "width": 32}, {"n": 512, "batch": 64, "width": 32},
                  {"n": 256, "batch": 128, "width": 32}, {"n": 256, "batch": 64, "width": 64}],
        "memory": {"batch width pixels float32": lambda s: 4 * s["batch"] * s["width"] * s.get("pixels", 32 * 32),
                   "n images float32 (data on the device)": lambda s: 4 * s["n"] * 3 * s.get("image_pixels", 32 * 32)},
        "time": {"subset epochs FLOPs": lambda s: s["subset"] * s.get("epochs", 1) * s["flops_per_image"]},
    },
}


def derived(step: str, size: dict) -> dict:
    """Sizes the terms need beyond the sweep's knobs (parameters, chunk, FLOPs per image)."""
    s = dict(size)
    if "hidden" in s:
        s["d"] = sum(p.numel() for p in _mlp_of_size(s["hidden"]).parameters())
    if step == "trak_featurize":
        s["d"] = resnet_params("resnet9", s["width"])
        s["chunk"] = gradient_chunk(s["d"])
    if step == "datamodels_fit":
        s["I"] = FIT_ITERATIONS
    if step == "train_per_model":
        s["d"] = resnet_params("resnet9", s["width"])
        s["flops_per_image"] = train_flops_per_image(s["width"])
        s["subset"] = s["n"]  # every image in the mask here
    return s


def fit(points: list[dict], terms: dict, key: str) -> dict:
    """Non-negative least squares of ``key`` on [1, term_j(point)], weighted so that every point
    counts by its relative error; returns the intercept, coefficients and the largest relative residual."""
    a = np.array([[1.0] + [f(p) for f in terms.values()] for p in points])
    y = np.array([p[key] for p in points])
    scale = np.maximum(a.max(0), 1e-300)
    w = 1 / np.maximum(y, 1e-9)
    coef, _ = scipy.optimize.nnls(a / scale * w[:, None], y * w)
    coef = coef / scale
    resid = np.abs(a @ coef - y) / np.maximum(y, 1e-9)
    return {"intercept": float(coef[0]), "coefficients": dict(zip(terms, map(float, coef[1:]))),
            "max_relative_residual": float(resid.max())}


def predict(f: dict, terms: dict, size: dict) -> float:
    return f["intercept"] + sum(f["coefficients"][name] * fn(size) for name, fn in terms.items())


def gemm_rate(dtype: torch.dtype, n: int = 1024) -> float:
    """Multiply-add FLOP/s of a dense n x n GEMM here (best of 3)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def case_sizes(step: str, case: dict) -> dict:
    s = dict(case)
    if s["d"] is None:
        s["d"] = resnet_params(s["model"])
    s["examples"] = s["n"] + s["t"]
    if step == "comparison_trak":
        s["t"], s["R"] = s["scored"], 5  # attribution.num_targets of the profile; trak.ridge_grid's five values
    if step == "datamodels_fit":  # at most: every target runs every step of the profile's path and refit (no early stop)
        s["B"] = min(s["T"], target_block(s["n"], torch.float32))
        s["I"] = s["lambdas"] * s["max_iter"] + 2 * s["max_iter"]
    if step == "unlearning_attribution":
        s["N"] = s["Nu"]
    if step in ("grad_dot", "influence_cg"):
        s["d"] = gradient_params(s)
    if step == "trak_featurize":
        s["chunk"] = gradient_chunk(s["d"])
    if step == "train_per_model":
        s["width"] = 64
        s["flops_per_image"] = train_flops_per_image(64) if s["model"] == "resnet9" else RESNET18_TRAIN_FLOPS
    return s


def table(result: dict) -> str:
    """The README's scale table (markdown) from a ``scale.json``: per step and case, the predicted
    peak memory, where it lives, the predicted GPU time, and whether it fits the limits."""
    lines = ["| step | where | memory fit (max residual) | " + " | ".join(f"{c}: peak GiB, GPU time" for c in CASES) + " |",
             "|---" * (3 + len(CASES)) + "|"]
    for step, r in result["steps"].items():
        limit = HOST_LIMIT_GIB if r["where"].startswith("host") else DEVICE_LIMIT_GIB
        cells = []
        for case in CASES:
            e = r["extrapolated"][case]
            if "refused" in e:
                cells.append("refused before any work (MemoryError)")
                continue
            flag = "" if e["peak_gib"] <= limit else " **over**"
            cells.append(f"{e['peak_gib']:,.1f}{flag}, {_duration(e['gpu_seconds'])}")
        terms = ", ".join(f"{v:.2g} x {k}" for k, v in r["memory_fit"]["coefficients"].items() if v > 0)
        lines.append(f"| `{step}` | {r['where']} | {terms} ({100 * r['memory_fit']['max_relative_residual']:.0f}%) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2g} s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", nargs="*", default=list(STEPS), choices=list(STEPS))
    ap.add_argument("--table", action="store_true", help="print the README table from reports/bench/scale.json and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads((ROOT / "reports" / "bench" / "scale.json").read_text())))
        return
    rates = {name: gemm_rate(dt) for name, dt in (("float32", torch.float32), ("float64", torch.float64), ("bfloat16", torch.bfloat16))}
    out = {"cpu_gemm_flops": rates, "gpu_rates_assumed": GPU_RATES, "limits_gib": {"host": HOST_LIMIT_GIB, "device": DEVICE_LIMIT_GIB},
           "steps": {}}
    previous = ROOT / "reports" / "bench" / "scale.json"
    if set(args.steps) != set(STEPS) and previous.exists():  # remeasure some steps: the others stay as they were measured
        out["steps"] = json.loads(previous.read_text())["steps"]
    for step in args.steps:
        spec = STEPS[step]
        points = []
        for size in spec["sweep"]:
            point = measure(step, size)
            points.append(derived(step, point))
            print(step, {k: v for k, v in point.items()}, flush=True)
        mem = fit([{**p, "peak_bytes": p["peak_gib"] * 2 ** 30} for p in points], spec["memory"], "peak_bytes")
        tim = fit(points, spec["time"], "seconds")
        cases = {}
        for name, case in CASES.items():
            try:
                s = case_sizes(step, case)
            except MemoryError as e:  # the step refuses before any work, as it would in the pipeline
                cases[name] = {"refused": str(e)}
                continue
            cpu_seconds = predict(tim, spec["time"], s)
            cases[name] = {"peak_gib": predict(mem, spec["memory"], s) / 2 ** 30, "cpu_seconds": cpu_seconds,
                           "gpu_seconds": cpu_seconds * rates[spec["dtype"]] / GPU_RATES[spec["dtype"]]}
            if step == "train_per_model":  # the FLOP count itself, at the assumed rate (no CPU efficiency carried over)
                flops = s["subset"] * s["epochs"] * s["flops_per_image"]
                cases[name].update(flops_per_model=flops, gpu_seconds_from_flops=flops / GPU_RATES["bfloat16"])
        out["steps"][step] = {"where": spec["where"], "dtype": spec["dtype"], "points": points, "memory_fit": mem,
                              "time_fit": tim, "extrapolated": cases, "cpu_gemm_flops": rates}
    write_result("scale", out)
    print(table(out))


if __name__ == "__main__":
    main()
