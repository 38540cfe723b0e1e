"""The task interface: what every layer above needs to know about one kind of model.

A task says, for one kind of model (in the spirit of kronfluence's ``Task`` and traker's
model-output classes):

* how a batch's raw outputs are made from its examples (:meth:`Task.forward`);
* the training loss per example (:meth:`Task.loss`), so the engine trains any task;
* the output f(z) that attribution explains, per example (:meth:`Task.output`), and its
  out-to-loss term Q (:meth:`Task.out_to_loss`; TRAK, Park et al. 2023, Algorithm 1);
* the measurement recorded for every subset model: f on every train and test example (the
  LDS ground truth) and one per-model test metric (:meth:`Task.metric`).

Examples are two tensors indexed along their first axis: ``inputs`` (n, ...) and
``targets`` (n, ...). For classification they are images and labels; another task may
put token ids, caption ids or noise seeds in either. Nothing below this layer knows what
they mean: :mod:`datalens.training.engine` only indexes them and calls the task.

Shapes: every method takes ``outputs`` (..., B, *raw) — a leading stack of models is
allowed — and ``targets`` (B, ...), and returns (..., B) per example ((...,) for
:meth:`Task.metric`).
"""
from __future__ import annotations

from typing import Callable

import torch


class Task:
    """One kind of model. Subclass and implement :meth:`loss`, :meth:`output` and
    :meth:`out_to_loss`; the rest has defaults."""

    name = "task"
    metric_name = "metric"
    draws_per_step = False  # True: every training step draws the targets afresh (:meth:`draw`)

    def forward(self, model: Callable[..., torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Raw outputs (B, *raw) of ``model`` (a module or a functional call) on a batch."""
        return model(inputs)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss per example, float32: (..., B)."""
        raise NotImplementedError

    def batch_loss(self, outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per example (..., B), the loss times ``weights`` (B,): the engine sums it for each stacked
        model's batch, whose padding has weight 0. A task whose loss couples the examples of a
        batch (contrastive) keeps the padding out of it here."""
        return self.loss(outputs, targets) * weights

    def draw(self, inputs: torch.Tensor, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """With :attr:`draws_per_step`, the targets (B, ...) of one training step of a batch, drawn from
        ``gen``, the model's own generator for the epoch (a diffusion model's timesteps and noise), so
        they depend only on the model's seed, never on which stack or block it trained in."""
        return targets

    def training_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """What training sees of the targets (n, ...); by default all of them."""
        return targets

    def mean_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean training loss (a scalar); the engine's one-model path and the
        Hessian-based baselines minimise this."""
        return self.loss(outputs, targets).mean()

    def output(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The output f attributed (and measured for the LDS), per example: (..., B)."""
        raise NotImplementedError

    def out_to_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Q per example, (..., B): dLoss/df = -Q, so ``-grad L = Q grad f`` (TRAK's Q)."""
        raise NotImplementedError

    def metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One number per model over a set of examples, (...,): by default the mean output."""
        return self.output(outputs, targets).float().mean(-1)

    def embeddings(self, model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The model's own representation of each example (B, E, dim), E embeddings per example,
        for embedding similarity."""
        raise NotImplementedError(f"task {self.name!r} defines no embeddings; embedding similarity needs them")

    def sample_targets(self, outputs: torch.Tensor) -> torch.Tensor:
        """Targets drawn from the model's own predictive distribution (the true Fisher of EK-FAC)."""
        raise NotImplementedError(f"task {self.name!r} defines no predictive distribution; EK-FAC needs sample_targets")

    def classes_first_loss(self) -> tuple[Callable, Callable] | None:
        """Optional fast path for stacked MLPs in the engine's (models, outputs, examples) layout:
        ``(encode, loss)`` with ``encode(targets (M, L)) -> encoded`` and
        ``loss(h (M, C, L) float32, encoded) -> (M, L)`` equal to :meth:`loss`. None: no fast path."""
        return None
