"""The paper profile's heavy steps on synthetic CIFAR-size data, in minutes: a first GPU run
measures instead of debugging. Run it through ``benchmarks/gpu_smoke.sh`` (README, "GPU smoke").

1. Writes learnable synthetic 32x32 colour images in the CIFAR-10 tarball's format
   (:mod:`datalens.core.synthetic`) and trains ``--models`` subset models with the profile's
   recipe (ResNet-9, its epochs, batch size, augmentation, precision) through the same engine,
   store and reader as ``dvc repro``: models per second and test accuracy.
2. Featurises ``--trak-models`` checkpoints at ``--proj-dim`` and scores TRAK for every test
   target: seconds per checkpoint and for scoring, and the LDS of the scores against the
   trained models themselves (a sanity check: they are not held-out models).
3. Fits datamodels for the first ``--targets`` test targets on those models: seconds.

Writes one JSON (``reports/bench/gpu_smoke.json``, or in ``--out``) with the device,
the peak device memory of each step and every time above. The tests run it on the CPU at
tiny sizes, so the script cannot rot between GPU runs.

    python benchmarks/gpu_smoke.py [--device cuda] [--models 128] [--n-train 5000] [--epochs N]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, write_result
from datalens.attribution import datamodels, trak
from datalens.core import synthetic
from datalens.core.config import get_dotted, load_params, stage_params
from datalens.evaluation.metrics import linear_datamodeling_score
from datalens.training import runs


def peak_memory(device: str) -> float | None:
    """Peak device memory (GiB) since the last reset, or None on the CPU."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def overrides_for(args, work: Path, profile: dict) -> dict:
    """Sizes and places only: the recipe stays the profile's unless --epochs or --width says otherwise."""
    out = {"device": args.device, "data.dataset": "cifar10", "data.root": str(work / "data"),
           "train.num_models": args.models, "train.block_size": min(args.block_size, args.models),
           "train.num_checkpoints": args.trak_models, "train.store": str(work / "stores" / "train"),
           "execution.backend": "local", "execution.num_gpus_per_task": 0}
    if args.epochs is not None:
        out["train.epochs"] = args.epochs
        out["train.peak_epoch"] = min(get_dotted(profile, "train.peak_epoch"), args.epochs)
    if args.width is not None:
        out["model.width"] = args.width
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=str(ROOT / "profiles" / "cifar10.yaml"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", type=int, default=128, help="subset models to train")
    ap.add_argument("--block-size", type=int, default=32, help="models per store block (a block is the unit of resumption)")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=None, help="default: the profile's train.epochs")
    ap.add_argument("--width", type=int, default=None, help="default: the profile's model.width")
    ap.add_argument("--trak-models", type=int, default=4)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--ridge", type=float, default=0.1, help="TRAK's ridge (relative, as trak.ridge_grid)")
    ap.add_argument("--targets", type=int, default=200, help="test targets the datamodels are fit for")
    ap.add_argument("--workdir", default=None, help="where data and stores go (default: a temporary folder, removed)")
    ap.add_argument("--out", default=None, help="the folder the JSON goes to (default: reports/bench)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device (use --device cpu to try it here)")
    if args.targets > args.n_test:
        raise SystemExit(f"--targets {args.targets} is more than --n-test {args.n_test}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_smoke_"))
    try:
        (work / "data").mkdir(parents=True, exist_ok=True)
        synthetic.write_cifar_tarball(work / "data", synthetic.learnable_images(args.n_train, seed=1),
                                      synthetic.learnable_images(args.n_test, seed=2))
        profile = load_params(args.profile)
        run = runs.SubsetRun.from_params(stage_params("train_subsets", args.profile, overrides_for(args, work, profile)))
        d = profile["datamodels"]
        result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  "settings": {**{k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
                               "model": run.model, **run.model_kwargs, "epochs": run.settings.epochs,
                               "batch_size": run.settings.batch_size, "precision": run.settings.precision,
                               "augment": run.settings.augment, "alpha": run.alpha}}

        reset_peak(args.device)
        t0 = time.perf_counter()
        store = runs.train_subset_models(run)
        seconds = time.perf_counter() - t0
        result["train"] = {"models": args.models, "seconds": seconds, "models_per_second": args.models / seconds,
                           "test_accuracy_mean": float(store.read("test_metric").mean()), "peak_device_gib": peak_memory(args.device)}

        reset_peak(args.device)
        job = trak.FeatureJob(run, str(work / "stores" / "trak"), (args.proj_dim,), profile["trak"]["proj_type"])
        t0 = time.perf_counter()
        features = trak.featurize_checkpoints(job, args.trak_models)
        featurise = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = trak.trak_scores(features.features(range(args.trak_models), args.proj_dim), args.ridge)
        score = time.perf_counter() - t0
        masks, margins = store.read("masks"), store.read("test_outputs")
        result["trak"] = {"checkpoints": args.trak_models, "proj_dim": args.proj_dim, "seconds_featurise": featurise,
                          "seconds_per_checkpoint": featurise / args.trak_models, "seconds_score": score,
                          "lds_on_the_training_models": linear_datamodeling_score(scores, masks, margins),
                          "peak_device_gib": peak_memory(args.device)}

        reset_peak(args.device)
        t0 = time.perf_counter()
        dm, _ = datamodels.fit_from_store(store, val_fraction=d["val_fraction"], seed=0, measure=lambda v: v[:, :args.targets],
                                          num_lambdas=d["num_lambdas"], eps=d["eps"], max_iter=d["max_iter"], tol=d["tol"],
                                          device=args.device, progress=False)
        result["datamodels"] = {"targets": args.targets, "models": args.models, "seconds": time.perf_counter() - t0,
                                "nonzero_fraction": float((dm.weight != 0).mean()), "peak_device_gib": peak_memory(args.device)}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return json.loads(write_result("gpu_smoke", result, args.out).read_text())


if __name__ == "__main__":
    main()
