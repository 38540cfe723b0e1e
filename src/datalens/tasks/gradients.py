"""Per-example gradients of a task's output, and its Q, for any task (``torch.func``),
streamed in chunks of examples so no step holds more than (chunk, d) gradients or runs
more than ``chunk`` examples through a model at once."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from datalens.tasks.base import Task

CHUNK = 4096  # examples per forward when streaming (at digits scale the whole set is one chunk)


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                          param_names: Sequence[str] | None = None, chunk: int = 256,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gradients of ``task.output`` per example w.r.t. the named parameters (all by default).

    x: (n, ...); y: (n, ...). Returns (n, d) with d the total size of those parameters, in
    ``named_parameters`` order. Only the asked-for gradients are computed: other parameters
    enter as constants. The output is written per example, so attention masks and other
    batch-shaped internals must not mix examples (each call sees a batch of one).
    """
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
        call = lambda *a: functional_call(model, {**frozen, **p}, a)  # noqa: E731
        return task.output(task.forward(call, xi.unsqueeze(0), yi.unsqueeze(0)), yi.unsqueeze(0))[0]

    g = vmap(grad(f), in_dims=(None, 0, 0))
    out = []
    for a in range(0, len(x), chunk):
        grads = g(wrt, x[a:a + chunk], y[a:a + chunk])
        out.append(torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1).to(dtype))
    return torch.cat(out)


@torch.no_grad()
def raw_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task, chunk: int = CHUNK) -> torch.Tensor:
    """The model's raw outputs (n, *raw) in eval mode, ``chunk`` examples per forward."""
    model = model.eval()
    return torch.cat([task.forward(model, x[a:a + chunk], y[a:a + chunk]) for a in range(0, len(x), chunk)])


@torch.no_grad()
def out_to_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task, chunk: int = CHUNK) -> torch.Tensor:
    """Q (n,) of ``task`` on every example, ``chunk`` examples per forward."""
    model = model.eval()
    return torch.cat([task.out_to_loss(task.forward(model, x[a:a + chunk], y[a:a + chunk]), y[a:a + chunk])
                      for a in range(0, len(x), chunk)])
