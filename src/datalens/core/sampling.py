"""Masks, seeds and random streams: every random choice is a pure function of params
and a model's index, never of how models are grouped into blocks, stacks or workers.

* the mask of model ``j`` depends only on ``(seed, stream, j // repeats)``;
* its initialisation, data order and augmentation only on
  ``(seed, stream, j // repeats, j % repeats)`` (its *model seed*), then on the epoch.

``repeats > 1`` trains several models (different seeds) per mask, which the held-out
evaluation uses to average out training noise.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

STREAMS = {"train": 0, "eval": 1, "counterfactual": 2, "seed_agreement": 3, "unlearning_base": 4, "unlearning_oracle": 5,
           "unlearning_datamodels": 6, "diffusion_reference": 7}


def _stream_code(stream: str) -> int:
    if stream not in STREAMS:
        raise ValueError(f"stream={stream!r} is unknown; allowed values: {', '.join(STREAMS)}")
    return STREAMS[stream]


def subset_mask(seed: int, mask_index: int, n: int, alpha: float, stream: str = "train") -> np.ndarray:
    """The boolean mask (n,) of subset ``mask_index``: each example kept with probability ``alpha``."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha!r} is not allowed; it must be in (0, 1]")
    rng = np.random.default_rng([seed, _stream_code(stream), mask_index])
    return rng.random(n) < alpha


def subset_masks(seed: int, mask_indices: Sequence[int], n: int, alpha: float, stream: str = "train") -> np.ndarray:
    """Masks (len(mask_indices), n) bool."""
    if not len(mask_indices):
        return np.zeros((0, n), bool)
    return np.stack([subset_mask(seed, int(i), n, alpha, stream) for i in mask_indices])


def model_seed(seed: int, mask_index: int, repeat: int, stream: str = "train") -> int:
    """The seed of one model's initialisation, data order and augmentation."""
    return int(np.random.SeedSequence([seed, _stream_code(stream), mask_index, repeat, 7]).generate_state(1)[0])


def epoch_batches(subset: np.ndarray, model_seed_: int, epoch: int, steps: int) -> list[np.ndarray]:
    """The mini-batches (indices into the training set) of one model in one epoch:
    its subset shuffled by (model seed, epoch) and cut into ``steps`` near-equal parts."""
    rng = np.random.default_rng([model_seed_, epoch])
    return np.array_split(rng.permutation(subset), steps)


def augmentation_generator(model_seed_: int, epoch: int) -> torch.Generator:
    """The generator of one model's augmentation draws in one epoch (consumed batch by batch)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([model_seed_, epoch, 3]).generate_state(1)[0]))
