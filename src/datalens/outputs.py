"""What a model outputs for attribution: the margin, a task's output and its
out-to-loss term, and per-example gradients of that output (``torch.func``).

**Margin**: ``logit_y - logsumexp_{j != y} logit_j`` (``= log p_y / (1 - p_y)``), the
definition TRAK and KLoM use, so one margin serves datamodels, TRAK's LDS and unlearning
alike. It is positive exactly when p_y > 1/2 (with many classes a correct argmax can
still have p_y < 1/2, so accuracy is recorded separately, from the argmax).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def margins_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logit_y - logsumexp_{j != y} logit_j`` for logits (..., n, C) and labels (n,): shape (..., n)."""
    y_idx = y.expand(logits.shape[:-1]).unsqueeze(-1)
    correct = logits.gather(-1, y_idx).squeeze(-1)
    others = logits.scatter(-1, y_idx, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


class ModelOutput:
    """What the model outputs for attribution, and its out-to-loss term.

    Subclass for other tasks: ``output`` returns one scalar per example (the function
    attributed), ``out_to_loss`` the derivative factor Q of the loss in that output.
    """

    def output(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def out_to_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClassificationMargin(ModelOutput):
    """f = logit_y - logsumexp_{j != y} logit_j = log(p / (1 - p)); Q = 1 - p, so that
    dLoss/df = -Q for the cross-entropy loss."""

    def output(self, logits, y):
        return margins_from_logits(logits, y)

    def out_to_loss(self, logits, y):
        return 1.0 - torch.softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: ModelOutput | None = None,
                          param_names: Sequence[str] | None = None, chunk: int = 256,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gradients of ``task.output`` per example w.r.t. the named parameters (all by default).

    x: (n, *input_shape); y: (n,). Returns (n, d) with d the total size of those
    parameters, in ``named_parameters`` order. Only the asked-for gradients are
    computed: other parameters enter as constants.
    """
    task = task or ClassificationMargin()
    model = model.eval()
    all_params = dict(model.named_parameters())
    names = list(param_names) if param_names is not None else list(all_params)
    unknown = [n for n in names if n not in all_params]
    if unknown:
        raise ValueError(f"param_names {unknown} are not parameters of the model; it has: {', '.join(all_params)}")
    wrt = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in wrt}
    frozen.update(dict(model.named_buffers()))

    def f(p, xi, yi):
        logits = functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),))
        return task.output(logits, yi.unsqueeze(0))[0]

    g = vmap(grad(f), in_dims=(None, 0, 0))
    out = []
    for a in range(0, len(x), chunk):
        grads = g(wrt, x[a:a + chunk], y[a:a + chunk])
        out.append(torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1).to(dtype))
    return torch.cat(out)


def out_to_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: ModelOutput | None = None) -> torch.Tensor:
    task = task or ClassificationMargin()
    with torch.no_grad():
        return task.out_to_loss(model.eval()(x), y)


