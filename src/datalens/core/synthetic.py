"""Synthetic data in the CIFAR-10 python tarball's format, so that the paper profile's whole
path (the reader, ResNet-9, augmentation) runs where the real tarball is not: the tests' tiny
CIFAR-format data and ``benchmarks/gpu_smoke.py``'s CIFAR-size data.

``learnable_images`` draws images a classifier can learn: each class has a smooth random
colour template, and an image is its class's template, shifted a few pixels, plus noise, so
accuracy after training says the recipe learned something (uniform noise images cannot).
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np

from datalens.core.data import CIFAR_TARBALL

BATCHES = 5  # data_batch_1..5, as in the official tarball


def write_cifar_tarball(path: str | Path, train: tuple[np.ndarray, Sequence[int]], test: tuple[np.ndarray, Sequence[int]],
                        names: Sequence[str] | None = None) -> Path:
    """Write ``train`` and ``test`` = (uint8 rows (n, 3072), channel-major as the official
    files are; labels (n,)) as ``path`` (a folder gets ``cifar-10-python.tar.gz``), the training
    rows split over five batches. Returns the tarball's path."""
    path = Path(path)
    if path.is_dir():
        path = path / CIFAR_TARBALL
    x_train, y_train = np.asarray(train[0], np.uint8), [int(v) for v in train[1]]
    names = list(names) if names is not None else [f"class{i}" for i in range(10)]

    def add(tar, name, obj):
        blob = pickle.dumps(obj)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))

    with tarfile.open(path, "w:gz") as tar:
        add(tar, "batches.meta", {b"label_names": [n.encode() for n in names]})
        for b, rows in enumerate(np.array_split(np.arange(len(x_train)), BATCHES), start=1):
            add(tar, f"data_batch_{b}", {b"data": x_train[rows], b"labels": [y_train[i] for i in rows]})
        add(tar, "test_batch", {b"data": np.asarray(test[0], np.uint8), b"labels": [int(v) for v in test[1]]})
    return path


def learnable_images(count: int, seed: int, classes: int = 10, noise: float = 0.35, shift: int = 3,
                     templates_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images (uint8 rows (count, 3072), channel-major) and balanced labels (count,).
    Templates come from ``templates_seed`` (the same for a training and a test draw); labels,
    shifts and noise from ``seed``."""
    rng_t = np.random.default_rng([templates_seed, 7])
    coarse = rng_t.random((classes, 3, 4, 4))
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)  # (C, 3, 32, 32): blocks of 8 pixels
    rng = np.random.default_rng([seed, 8])
    labels = rng.permutation(np.arange(count) % classes)
    dx, dy = rng.integers(-shift, shift + 1, (2, count))
    images = np.stack([np.roll(templates[c], (a, b), axis=(1, 2)) for c, a, b in zip(labels, dx, dy)])
    images = np.clip(images + noise * rng.standard_normal(images.shape), 0.0, 1.0)
    return (images * 255).round().astype(np.uint8).reshape(count, -1), labels
