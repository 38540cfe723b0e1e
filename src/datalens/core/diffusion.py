"""Data for denoising diffusion models (DDPM, Ho et al. 2020): images in [-1, 1] and, for every
example, fixed noise draws at which its denoising loss is measured.

A diffusion dataset's targets are not labels but **draws**: ``y`` (n, K, 1 + D) float32, for each
example K pairs (u, eps) with ``u`` in [0, 1) the timestep as a fraction of the schedule
(t = floor(u T), so the draws serve any number of steps T) and ``eps`` (D,) standard normal noise,
D the image size. The u of one example are stratified, ``u_k = (k + v_k) / K`` with v_k uniform,
so the K draws cover the schedule evenly; a subset of every (K / K')-th draw covers it evenly
too (:func:`spaced_draws`). Draws are a pure function of (seed, split, index), fixed once: the
measurement a subset model records (:class:`datalens.tasks.diffusion.DiffusionTask`), the
training-side features of TRAK and the target-side ones all read them, so the "noise fixed per
(target, timestep)" of D-TRAK (Zheng et al., 2024) holds by construction. Training draws fresh
(u, eps) at every step instead, from each model's own seed.

Datasets (``data.dataset``):

* ``datalens.core.diffusion:digits_denoising``: scikit-learn's digits (the fixed stratified
  1347 / 450 split of ``digits``) as 8x8 images in [-1, 1], 32 draws per example;
* ``datalens.core.diffusion:cifar10_denoising``: CIFAR-10 from the official tarball, 3x32x32 in
  [-1, 1], 10 draws per example (the Journey paper's case; 50,000 x 10 x 3,073 float32 draws
  are 6.1 GB of host memory).

Each carries ``labels(root)`` (the classes, which training never sees: a fixed classifier of the
counterfactual reads them), ``generated_targets(count)``, the draws of ``count`` generated
samples appended to the test split, and ``as_images(x)``, inputs as images in [0, 1] (``generated`` of :func:`datalens.core.data.load_dataset`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from datalens.core.data import Dataset, load_cifar, load_digits, missing_data, PUBLISHED_SIZES

SPLITS = {"train": 0, "test": 1, "generated": 2}


def cosine_alpha_bar(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal, 2021): ``alpha_bar_t`` (T,) float64 for t = 0..T-1,
    the product of ``1 - beta_s`` over s <= t, with ``beta_t = 1 - f(t+1)/f(t)`` clipped at
    ``max_beta`` and ``f(s) = cos((s/T + offset) / (1 + offset) * pi/2)^2``."""
    s = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)


def fixed_draws(seed: int, split: str, count: int, draws: int, dim: int) -> np.ndarray:
    """Draws (count, draws, 1 + dim) float32 of the module docstring, from ``[seed, split]``."""
    rng = np.random.default_rng([seed, SPLITS[split], count, draws, dim])
    u = (np.arange(draws) + rng.random((count, draws))) / draws
    eps = rng.standard_normal((count, draws, dim), dtype=np.float32)
    return np.concatenate([u[..., None].astype(np.float32), eps], -1)


def spaced_draws(available: int, used: int) -> np.ndarray:
    """Indices of ``used`` of ``available`` stratified draws, evenly spaced (the middle of each
    of ``used`` equal runs), so they cover the schedule evenly."""
    if not 1 <= used <= available:
        raise ValueError(f"{used} timesteps asked for, but the data carries {available} draws per example; "
                         f"use between 1 and {available}")
    return np.floor((np.arange(used) + 0.5) * available / used).astype(np.int64)


DIGITS_DRAWS, DIGITS_SEED = 32, 0


def digits_denoising(root: str | Path = "data") -> Dataset:
    """The digits as 8x8 images in [-1, 1] (flat, 64 values) with 32 fixed draws each."""
    ds = load_digits()
    x_train, x_test = ds.images_train.reshape(ds.n_train, -1) * 2 - 1, ds.images_test.reshape(ds.n_test, -1) * 2 - 1
    return Dataset.from_arrays("digits_denoising", x_train, fixed_draws(DIGITS_SEED, "train", ds.n_train, DIGITS_DRAWS, 64),
                               x_test, fixed_draws(DIGITS_SEED, "test", ds.n_test, DIGITS_DRAWS, 64), 0, (),
                               ds.images_train, ds.images_test)


digits_denoising.labels = lambda root="data": (load_digits().y_train, load_digits().y_test)
digits_denoising.generated_targets = lambda count: fixed_draws(DIGITS_SEED, "generated", count, DIGITS_DRAWS, 64)
digits_denoising.as_images = lambda x: ((np.asarray(x, np.float32).reshape(len(x), 8, 8) + 1) / 2).clip(0, 1)


CIFAR_DRAWS, CIFAR_SEED = 10, 0


def cifar10_denoising(root: str | Path = "data") -> Dataset:
    """CIFAR-10 as 3x32x32 images in [-1, 1] with 10 fixed draws each (the tarball of ``data.dvc``)."""
    ds = load_cifar(root)
    x_train, x_test = ds.images_train.transpose(0, 3, 1, 2) * 2 - 1, ds.images_test.transpose(0, 3, 1, 2) * 2 - 1
    dim = int(np.prod(x_train.shape[1:]))
    return Dataset.from_arrays("cifar10_denoising", x_train, fixed_draws(CIFAR_SEED, "train", ds.n_train, CIFAR_DRAWS, dim),
                               x_test, fixed_draws(CIFAR_SEED, "test", ds.n_test, CIFAR_DRAWS, dim), 0, (),
                               ds.images_train, ds.images_test)


cifar10_denoising.labels = lambda root="data": (load_cifar(root).y_train, load_cifar(root).y_test)
cifar10_denoising.generated_targets = lambda count: fixed_draws(CIFAR_SEED, "generated", count, CIFAR_DRAWS, 3 * 32 * 32)
cifar10_denoising.as_images = lambda x: ((np.asarray(x, np.float32).reshape(len(x), 3, 32, 32).transpose(0, 2, 3, 1) + 1) / 2).clip(0, 1)
cifar10_denoising.missing = lambda root: missing_data("cifar10", root)
cifar10_denoising.published_sizes = PUBLISHED_SIZES["cifar10"]
