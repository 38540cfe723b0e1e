"""Classification as a task: cross-entropy training, the margin as the attributed output.

**Margin**: ``logit_y - logsumexp_{j != y} logit_j`` (``= log p_y / (1 - p_y)``), the
definition TRAK and KLoM use, so one margin serves datamodels, TRAK's LDS and unlearning
alike. It is positive exactly when p_y > 1/2 (with many classes a correct argmax can
still have p_y < 1/2, so accuracy is recorded separately, from the argmax).

**Correct-class margin**: ``logit_y - max_{j != y} logit_j`` (Ilyas et al. 2022), positive
exactly when the argmax is y: brittleness counts a prediction as flipped by it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from datalens.tasks.base import Task


def margins_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logit_y - logsumexp_{j != y} logit_j`` for logits (..., n, C) and labels (n,): shape (..., n)."""
    y_idx = y.expand(logits.shape[:-1]).unsqueeze(-1)
    correct = logits.gather(-1, y_idx).squeeze(-1)
    others = logits.scatter(-1, y_idx, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def correct_class_margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logit_y - max_{j != y} logit_j`` for logits (..., n, C) and labels (n,): shape (..., n);
    positive exactly when the argmax is y (ties aside)."""
    y_idx = y.expand(logits.shape[:-1]).unsqueeze(-1)
    return logits.gather(-1, y_idx).squeeze(-1) - logits.scatter(-1, y_idx, float("-inf")).amax(-1)


class ClassificationTask(Task):
    """Inputs (n, ...) and integer labels (n,); outputs are class logits (..., n, C).

    loss: cross-entropy (with ``label_smoothing``); f = the margin
    ``logit_y - logsumexp_{j != y} logit_j = log(p / (1 - p))``; Q = 1 - p, so that
    dLoss/df = -Q for the cross-entropy loss (without smoothing); metric: argmax accuracy.
    """

    name = "classification"
    metric_name = "accuracy"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = float(label_smoothing)

    def loss(self, outputs, targets):
        flat = outputs.reshape(-1, outputs.shape[-1])
        per = F.cross_entropy(flat, targets.expand(outputs.shape[:-1]).reshape(-1), reduction="none",
                              label_smoothing=self.label_smoothing)
        return per.reshape(outputs.shape[:-1])

    def mean_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)

    def output(self, outputs, targets):
        return margins_from_logits(outputs, targets)

    def out_to_loss(self, outputs, targets):
        y_idx = targets.expand(outputs.shape[:-1]).unsqueeze(-1)
        return 1.0 - torch.softmax(outputs, -1).gather(-1, y_idx).squeeze(-1)

    def metric(self, outputs, targets):
        return (outputs.argmax(-1) == targets).float().mean(-1)

    def embeddings(self, model, inputs, targets):
        """A sequence classifier's own representation (B, 1, dim), its ``embedding(inputs)`` (the
        pooled final states of :class:`datalens.core.transformer.Transformer`); image classifiers
        have none here (representation similarity reads their penultimate features)."""
        if not hasattr(model, "embedding"):
            return super().embeddings(model, inputs, targets)
        return model.embedding(inputs).unsqueeze(-2)

    def sample_targets(self, outputs):
        return torch.multinomial(torch.softmax(outputs.detach().float(), -1), 1).flatten()

    def classes_first_loss(self):
        smoothing = self.label_smoothing

        def encode(targets, num_classes):  # (M, L) -> one-hot (M, C, L)
            return F.one_hot(targets, num_classes).transpose(1, 2)

        def loss(h, onehot):
            # on CPU this layout makes the ReLU and the softmax over a small class dimension
            # vectorise along examples, about twice as fast as the vmap layout
            lse = torch.logsumexp(h, 1)  # (M, L)
            per_example = lse - (1 - smoothing) * (h * onehot).sum(1)
            if smoothing:
                per_example = per_example - smoothing * h.mean(1)
            return per_example

        return encode, loss
