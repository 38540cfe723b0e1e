"""Memory a run's largest arrays will take, checked against the machine before any work starts.

The configuration check (:func:`datalens.core.config.environment_problems`) calls
:func:`memory_problems` with the params a stage declares; each estimate below applies when the
params it needs are present, so a stage is refused only for the steps it runs. The estimates
count the arrays the code holds at its peak (the terms ``benchmarks/scale.py`` measures and
fits), not allocator slack: a refusal is certain to be right, a pass is not a promise.

``DATALENS_MEMORY_LIMIT_GIB`` caps what is taken to be available (host and device alike): for
a shared machine, or to see what a smaller one would refuse.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

GIB = 2 ** 30
LIMIT_ENV = "DATALENS_MEMORY_LIMIT_GIB"


def total_bytes(device: str) -> tuple[int, str] | None:
    """(bytes, name) of the memory ``device`` (cpu | cuda | auto) offers: a CUDA device's total
    memory, else the host's physical memory; capped by ``DATALENS_MEMORY_LIMIT_GIB``. None for
    ``cuda`` where no CUDA device is visible (the device check says so)."""
    if device == "cuda" and not torch.cuda.is_available():
        return None
    if _on_gpu(device):
        total, name = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "device 'cuda'"
    else:
        total, name = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the host"
    limit = os.environ.get(LIMIT_ENV)
    return (min(total, int(float(limit) * GIB)), f"{name} ({LIMIT_ENV}={limit})") if limit else (total, name)


def _on_gpu(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _needs(flat: dict[str, Any], n: int, t: int) -> list[tuple[str, str, str, int, str]]:
    """(param to change, where: "device" | "host", what, bytes, what to do) for each estimated step."""
    device = flat.get("device", "cpu")
    solve = 4 if _on_gpu(device) else 8  # the lasso's precision (datamodels.fit_datamodels)
    found = []
    if "datamodels.max_iter" in flat:  # the masks' Gram counts (train, validation) and the standardised Gram, beside the
        found.append(("data.dataset", "device", f"the datamodels fit over n = {n:,} training examples (three n x n arrays)",
                      n * n * (4 + 4 + solve) + 2 * 8 * n * t, "a smaller training set"))  # and two (n, t) float64 cross moments
    if "unlearning.ridge_grid" in flat:  # ridge_set_contributions: counts, the float64 Gram and its factor
        found.append(("data.dataset", "device", f"unlearning's ridge datamodels over n = {n:,} training examples "
                      "(three n x n arrays)", n * n * (4 + 8 + 8), "a smaller training set"))
    if "trak.proj_dims" in flat:  # one model's features, the k x k kernel and its factor
        k = max(flat["trak.proj_dims"])
        found.append(("trak.proj_dims", "device", f"TRAK at k = {k:,} (one model's (n + t) x k features, three k x k arrays)",
                      4 * (n + t) * k + 3 * 8 * k * k, "smaller trak.proj_dims"))
    if "attribution.num_targets" in flat and "trak.ridge_grid" in flat:  # stage 05: per ridge a running sum and a candidate
        scored = flat["attribution.num_targets"] or t
        copies = 2 * len(flat["trak.ridge_grid"]) + 6  # and the chosen scores, thresholds, the method being scored
        found.append(("attribution.num_targets", "host", f"the method comparison on {scored:,} targets ({copies} n x t float64 "
                      "score arrays)", copies * 8 * n * scored, "a sample of targets (attribution.num_targets, 0 = all)"))
    return found


def memory_problems(flat: dict[str, Any], sizes: Callable[[str], tuple[int, int]], prefix: str = "") -> list[str]:
    """One line per step of these params whose largest arrays exceed the memory it runs in;
    ``sizes(dataset)`` gives (n_train, n_test); a section's params are named with ``prefix``."""
    if "data.dataset" not in flat:
        return []
    n, t = sizes(flat["data.dataset"])
    found = []
    for param, where, what, need, remedy in _needs(flat, n, t):
        offered = total_bytes(flat.get("device", "cpu") if where == "device" else "cpu")
        if offered is None:
            continue
        total, name = offered
        if need > total:
            found.append(f"{prefix}{param}={flat[param]!r} is not allowed here: {what} needs about {_size(need)}, more than the "
                         f"{_size(total)} of {name}; choose {remedy} or a machine with more memory")
    return found


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GIB:,.1f} GiB" if num_bytes >= GIB else f"{num_bytes / 2 ** 20:,.0f} MiB"
