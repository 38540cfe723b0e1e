"""The training engine: many models of any task (:class:`datalens.tasks.base.Task`), each on
its own subset, in as few kernel calls as the architecture allows. No I/O, no figures.
The task gives the loss; the engine only indexes the examples (inputs and targets) and
steps the optimiser.

Models without buffers (MLP, small CNN) train *stacked*: a stack's weights are
stacked and one forward trains all of them. Adam and SGD act elementwise and the
summed loss separates over models, so this equals training each model alone (a test
checks it): :class:`ModelStack`, which unlearning's fine-tuning uses too. MLPs use a
hand-laid ``baddbmm`` path when the task offers a loss in that layout
(:meth:`~datalens.tasks.base.Task.classes_first_loss`); other buffer-free models use
``torch.func.vmap``. Models with batch norm (ResNet-9) train in a plain loop.

Every random draw of a model (initialisation, data order, augmentation) comes from its
own seed (:mod:`datalens.core.sampling`), and its steps per epoch from its own subset size,
so a model's result never depends on which block or stack it trained in. Models are
stacked only with models of the same number of steps, so they share the learning-rate
schedule.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from datalens.core.models import batchable
from datalens.core.sampling import augmentation_generator, epoch_batches
from datalens.tasks.base import Task


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from handing every freed tensor buffer straight back to the OS.

    glibc serves blocks above its mmap threshold (128 KiB, rising to 32 MiB) with mmap
    and unmaps them on free, so a loop that frees and reallocates megabyte temporaries
    every step page-faults them back in each time: that cost 2.5x in a bfloat16 training
    step on 2 cores. Raising the mmap and trim thresholds keeps such blocks in the heap
    (PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason).
    Linux with glibc only; once per process; ``DATALENS_MALLOC_TUNING=0`` turns it off.
    Returns whether it applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("DATALENS_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 256 << 20)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation hyperparameters shared by every model of a run.

    ``batch_size=0`` means full-batch training on the model's whole subset; otherwise
    an epoch is one pass over the model's own subset in ``ceil(|S| / batch_size)``
    near-equal batches. ``schedule='triangular'`` ramps the learning rate linearly from
    0 to ``lr`` at ``peak_epoch`` and back to 0 at the end (the CIFAR-10 recipe).
    ``augment`` is the standard CIFAR recipe per image: zero-pad by H/8 (4 pixels at
    32x32), a random HxW crop, a random horizontal flip (image inputs only).
    """

    epochs: int = 100
    lr: float = 1e-2
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 0
    label_smoothing: float = 0.0  # read by the task (ClassificationTask), not by the engine
    schedule: str = "constant"
    peak_epoch: float = 5.0
    augment: bool = False
    precision: str = "float32"  # or "bfloat16": mixed precision, see train_models

    @classmethod
    def from_params(cls, train: dict) -> "TrainSettings":
        return cls(**{k: train[k] for k in cls.__dataclass_fields__})

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bfloat16" else torch.float32

    def steps_per_epoch(self, subset_size: int) -> int:
        return 1 if self.batch_size == 0 else max(1, math.ceil(subset_size / self.batch_size))


def lr_factor(settings: TrainSettings, step: int, total_steps: int, steps_per_epoch: int) -> float:
    if settings.schedule == "constant":
        return 1.0
    peak = max(1, int(settings.peak_epoch * steps_per_epoch))
    if step < peak:
        return (step + 1) / peak
    return max(0.0, (total_steps - step) / max(1, total_steps - peak))


def interval_lrs(settings: TrainSettings, snapshot_epochs: Sequence[int], steps_per_epoch: int) -> list[float]:
    """TracIn's weight for each snapshot (taken after epoch e): the summed learning rate of the
    steps since the previous snapshot (Pruthi et al. 2020, TracInCP), under the schedule."""
    total, out, start = steps_per_epoch * settings.epochs, [], 0
    for epoch in snapshot_epochs:
        stop = int(epoch) * steps_per_epoch
        out.append(settings.lr * sum(lr_factor(settings, s, total, steps_per_epoch) for s in range(start, stop)))
        start = stop
    return out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pad-and-crop plus horizontal flip, drawn per image from ``gen``: (B, C, H, W) -> same.
    Other inputs (flat features) pass through unchanged."""
    if x.dim() != 4:
        return x
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    flip = torch.rand(b, generator=gen) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h)).to(x.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)  # (B, W)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _make_optimizer(params: list[torch.Tensor], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.momentum > 0)


class NonFiniteLossError(FloatingPointError):
    """Training diverged (NaN or inf loss)."""


@dataclass
class TrainedModels:
    """A group of trained models: ``state_dicts()`` and batched ``outputs(task, x, y)`` (M, n, *raw).

    Stacked models keep ``params`` (name -> (M, ...)); looped ones keep ``modules``.
    """

    base: nn.Module
    params: dict[str, torch.Tensor] | None = None
    modules: list[nn.Module] = field(default_factory=list)
    snapshots: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)  # per model, per snapshot epoch

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0] if self.params is not None else len(self.modules)

    @torch.no_grad()
    def outputs(self, task: Task, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Raw outputs of every model on examples (x, y), ``chunk`` examples per forward: (M, n, *raw)."""
        outs = []
        for start in range(0, x.shape[0], chunk):
            xb, yb = x[start:start + chunk], y[start:start + chunk]
            if self.params is not None:
                f = torch.vmap(lambda p, xx, yy: task.forward(lambda *a: functional_call(self.base, p, a), xx, yy),
                               in_dims=(0, None, None))
                outs.append(f(self.params, xb, yb))
            else:
                outs.append(torch.stack([task.forward(m.eval(), xb, yb) for m in self.modules]))
        return torch.cat(outs, dim=1)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        if self.params is not None:
            return [{k: v[i].detach().clone() for k, v in self.params.items()} for i in range(len(self))]
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]


def init_models(factory: Callable[[], nn.Module], seeds: Sequence[int]) -> list[nn.Module]:
    """One freshly initialised model per seed (the same seed always gives the same weights)."""
    models = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            models.append(factory())
    return models


def train_models(
    task: Task,
    models: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    masks: np.ndarray,
    seeds: Sequence[int],
    settings: TrainSettings,
    batched: bool | None = None,
    model_ids: Sequence[int] | None = None,
    stack_size: int = 8,
    snapshot_epochs: Sequence[int] = (),
) -> TrainedModels:
    """Train ``models[i]`` on examples ``masks[i]`` with model seed ``seeds[i]`` (in place for the
    loop path), minimising ``task``'s loss.

    x: (n, ...) inputs on the training device; y: (n, ...) targets; masks: (M, n) bool;
    seeds: (M,). ``batched=None`` stacks models when none has buffers, ``stack_size`` at
    a time (on 2 CPU cores 8 is fastest in float32 and 16 in bfloat16; GPUs like more).
    ``model_ids`` name the models in error messages. ``snapshot_epochs`` (loop path only)
    keeps each model's weights after those epochs (1-based) in ``TrainedModels.snapshots``.

    ``settings.precision='bfloat16'`` is mixed precision as in ``torch.autocast``: weights,
    gradients and optimizer state stay float32; matrix products and the activations
    between them run in bfloat16; the loss is float32. Evaluation is always float32.
    """
    if x.device.type == "cpu":
        keep_freed_memory()
    y = task.training_targets(y)
    if batched is None:
        batched = all(batchable(m) for m in models)
    if snapshot_epochs:
        batched = False
    model_ids = list(model_ids) if model_ids is not None else list(range(len(models)))
    subsets = [np.flatnonzero(m) for m in masks]
    if any(len(s) == 0 for s in subsets):
        empty = [model_ids[i] for i, s in enumerate(subsets) if len(s) == 0]
        raise ValueError(f"models {empty} have empty subsets; raise train.alpha or the training set size")
    steps = [settings.steps_per_epoch(len(s)) for s in subsets]
    if not batched:
        snapshots = [_train_alone(task, models[i], x, y, subsets[i], int(seeds[i]), settings, steps[i], model_ids[i], snapshot_epochs)
                     for i in range(len(models))]
        return TrainedModels(base=models[0], modules=models, snapshots=snapshots)
    # stacks of models with equal steps per epoch, in order; results go back in the callers' order
    stacks = [g[a:a + stack_size] for s in sorted(set(steps)) for g in [[i for i in range(len(models)) if steps[i] == s]]
              for a in range(0, len(g), stack_size)]
    parts = [_train_stack(task, [models[i] for i in st], x, y, [subsets[i] for i in st], [int(seeds[i]) for i in st], settings,
                          steps[st[0]], [model_ids[i] for i in st]) for st in stacks]
    order = np.argsort(np.concatenate(stacks))
    return TrainedModels(base=parts[0].base, params={k: torch.cat([p.params[k] for p in parts])[order] for k in parts[0].params})


def _autocast(device: torch.device, settings: TrainSettings):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bfloat16")


def _train_alone(task, model, x, y, subset, seed, settings, steps, model_id, snapshot_epochs) -> list[dict]:
    model.train()
    snapshots = []
    opt = _make_optimizer(list(model.parameters()), settings)
    total, step = steps * settings.epochs, 0
    for epoch in range(settings.epochs):
        gen = augmentation_generator(seed, epoch)
        for idx in epoch_batches(subset, seed, epoch, steps):
            for g in opt.param_groups:
                g["lr"] = settings.lr * lr_factor(settings, step, total, steps)
            idx_t = torch.as_tensor(idx, device=x.device)
            xb = augment(x[idx_t], gen) if settings.augment else x[idx_t]
            yb = task.draw(xb, y[idx_t], gen) if task.draws_per_step else y[idx_t]
            with _autocast(x.device, settings):
                out = task.forward(model, xb, yb)
            loss = task.mean_loss(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()} for model {model_id} at epoch {epoch}; lower train.lr")
        if epoch + 1 in snapshot_epochs:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    return snapshots


def _padded_batch(x: torch.Tensor, y: torch.Tensor, batch: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-model index sets into (M, width, ...) inputs, labels and weights
    (1/len for real entries, 0 for padding), so each model's loss is its batch mean.

    ``width`` is rounded up to a multiple of 64: oneDNN compiles a kernel per new shape
    (in bfloat16 that cost more than the training of the first few hundred models)."""
    width = -(-max(len(b) for b in batch) // 64) * 64
    idx = np.zeros((len(batch), width), dtype=np.int64)
    wts = np.zeros((len(batch), width), dtype=np.float32)
    for i, b in enumerate(batch):
        idx[i, : len(b)] = b
        wts[i, : len(b)] = 1.0 / len(b)
    idx_t = torch.as_tensor(idx, device=x.device)
    return x[idx_t], y[idx_t], torch.as_tensor(wts, device=x.device)


def mlp_linear_names(model: nn.Module) -> list[str] | None:
    """Names of the Linear layers of a plain MLP (``Sequential`` of Flatten, Linear, ReLU), else None."""
    if not isinstance(model, nn.Sequential):
        return None
    names = []
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            names.append(str(i))
        elif not isinstance(layer, (nn.ReLU, nn.Flatten)) or (isinstance(layer, nn.Flatten) and i != 0):
            return None
    return names


class ModelStack:
    """M models of one architecture as one: the stacked trainer of the engine and of every
    fine-tuning (unlearning).

    ``params``: name -> (M, ...) float32 leaves the optimiser steps; ``buffers``: name -> (M, ...)
    frozen (batch-norm statistics: give models in eval mode). The summed loss separates over
    models and Adam and SGD act elementwise, so a step of the stack is a step of each model
    alone (a test checks it), and a model whose loss turns non-finite spoils only its own
    weights: :meth:`step` marks it in ``failed`` (M,) bool.

    Plain MLPs also run a hand-laid classes-first path (:meth:`mlp`: ``baddbmm`` on
    (M, features, examples)), about twice as fast on CPU as ``torch.vmap`` over
    ``functional_call`` (:meth:`module`), which serves every other model.
    """

    def __init__(self, models: Sequence[nn.Module]):
        params, buffers = stack_module_state(list(models))
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.linear_names = mlp_linear_names(models[0])
        self.failed = torch.zeros(len(models), dtype=torch.bool, device=next(iter(self.params.values())).device)

    def __len__(self) -> int:
        return len(self.failed)

    def module(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None = None) -> Callable:
        """One model of the stack as a function of its inputs (call it inside ``torch.vmap``)."""
        state = params if not buffers else (params, buffers)
        return lambda *inputs: functional_call(self.base, state, inputs)

    def mlp(self, xt: torch.Tensor, dtype: torch.dtype = torch.float32, models: slice = slice(None)) -> torch.Tensor:
        """The MLPs' outputs classes-first: xt (M, d, L) (or (1, d, L), one batch for all) in
        ``dtype`` -> (M, C, L) in ``dtype``; products and activations run in ``dtype``.
        ``models``: only these models of the stack (xt then has their M, or 1)."""
        h = None
        for k, name in enumerate(self.linear_names):
            weight, bias = self.params[f"{name}.weight"][models], self.params[f"{name}.bias"][models]
            if h is None:
                h = xt.expand(len(weight), -1, -1) if xt.shape[0] == 1 else xt
            h = torch.baddbmm(bias.unsqueeze(-1).to(dtype), weight.to(dtype), h)
            if k < len(self.linear_names) - 1:
                h = h.relu_()  # in place: baddbmm's backward does not need its output, and a fresh
                # activation-sized buffer per layer costs more than the product at these sizes
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every model's raw outputs on one batch x (B, ...): (M, B, *out), float32."""
        if self.linear_names is not None:
            return self.mlp(x.reshape(len(x), -1).T.unsqueeze(0)).transpose(1, 2)
        return torch.vmap(lambda p, b: self.module(p, b)(x), in_dims=(0, 0))(self.params, self.buffers)

    def outputs(self, x: torch.Tensor, chunk: int = 4096, block: int = 2 ** 20) -> torch.Tensor:
        """:meth:`forward` without gradients, ``chunk`` examples at a time: (M, n, *out).

        MLPs run in blocks of models x examples whose widest activation holds about ``block``
        numbers (4 MB in float32), so it stays in cache: 100 digits MLPs on 1,797 examples took
        a fifth of the time of one (100, 128, 1797) pass on 2 CPU cores."""
        with torch.no_grad():
            if self.linear_names is None:
                return torch.cat([self.forward(x[i:i + chunk]) for i in range(0, len(x), chunk)], dim=1)
            xt = x.reshape(len(x), -1).T.unsqueeze(0)
            width = max(self.params[f"{name}.weight"].shape[1] for name in self.linear_names)
            chunk = min(chunk, 256)
            step = max(1, block // (width * chunk))
            rows = [torch.cat([self.mlp(xt[..., i:i + chunk], models=slice(a, a + step)) for i in range(0, len(x), chunk)], dim=2)
                    for a in range(0, len(self), step)]
            return torch.cat(rows).transpose(1, 2)

    def step(self, opt: torch.optim.Optimizer, lr: float, losses: torch.Tensor) -> None:
        """One optimiser step on the summed per-model ``losses`` (M,) at learning rate ``lr``."""
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        self.failed |= ~torch.isfinite(losses.detach())


def _train_stack(task, models, x, y, subsets, seeds, settings, steps, model_ids) -> TrainedModels:
    """Train models of equal ``steps`` per epoch as one :class:`ModelStack` (see the module docstring)."""
    stack = ModelStack(models)
    opt = _make_optimizer(list(stack.params.values()), settings)
    full_batch = settings.batch_size == 0
    total = steps * settings.epochs
    dtype = settings.compute_dtype

    def per_model_loss(p, xb, yb, wb):
        with _autocast(x.device, settings):
            out = task.forward(stack.module(p), xb, yb)
        return task.batch_loss(out.float(), yb, wb).sum()

    fast = task.classes_first_loss() if stack.linear_names is not None else None
    if fast is not None:
        encode, example_loss = fast
        num_outputs = stack.params[f"{stack.linear_names[-1]}.weight"].shape[1]

        def features_first(xb):  # (M, B, ...) -> (M, d, B) in the compute dtype
            return xb.reshape(xb.shape[0], xb.shape[1], -1).transpose(1, 2).to(dtype).contiguous()

        def loss_fn(xb, yb, wb):
            return (example_loss(stack.mlp(features_first(xb), dtype).float(), encode(yb, num_outputs).to(xb.dtype)) * wb).sum(1)
    else:
        vmapped = torch.vmap(per_model_loss, in_dims=(0, 0, 0, 0))
        loss_fn = lambda xb, yb, wb: vmapped(stack.params, xb, yb, wb)  # noqa: E731
    fresh = settings.augment or task.draws_per_step  # each model draws its own batch's augmentation or noise
    if full_batch and not fresh:
        # Gather each model's subset once (padded, zero weight): half the compute of
        # masking the whole training set at alpha = 0.5.
        x_full, y_full, w_full = _padded_batch(x, y, subsets)
        if fast is not None:  # the layout change is done once, not every epoch
            xt_full, y_full = features_first(x_full), encode(y_full, num_outputs).to(x.dtype)
            loss_fn = lambda xb, yb, wb: (example_loss(stack.mlp(xt_full, dtype).float(), yb) * wb).sum(1)  # noqa: E731
    step = 0
    for epoch in range(settings.epochs):
        gens = [augmentation_generator(s, epoch) for s in seeds]
        per_model = [epoch_batches(subsets[i], seeds[i], epoch, steps) for i in range(len(models))]
        for batch in zip(*per_model):
            if full_batch and not fresh:
                losses = loss_fn(x_full, y_full, w_full)
            else:
                batch = [np.asarray(b) for b in batch]
                xb, yb, wb = _padded_batch(x, y, batch)
                if settings.augment:  # each model augments its own batch with its own draws
                    xb = torch.stack([torch.cat([augment(xi[:len(b)], gen), xi[len(b):]]) for xi, b, gen in zip(xb, batch, gens)])
                if task.draws_per_step:  # and draws its own noise for its real examples (padding keeps its placeholder)
                    yb = torch.stack([torch.cat([task.draw(xi[:len(b)], yi[:len(b)], gen), yi[len(b):]])
                                      for xi, yi, b, gen in zip(xb, yb, batch, gens)])
                losses = loss_fn(xb, yb, wb)
            stack.step(opt, settings.lr * lr_factor(settings, step, total, steps), losses)
            step += 1
        if stack.failed.any():
            ids = [model_ids[i] for i in torch.nonzero(stack.failed).flatten().tolist()]
            raise NonFiniteLossError(f"loss became non-finite for models {ids} at epoch {epoch}; lower train.lr")
    return TrainedModels(base=stack.base, params={k: v.detach() for k, v in stack.params.items()})


def flatten_state(state: dict[str, torch.Tensor]) -> np.ndarray:
    """A state dict as one float32 vector (order of the dict), for checkpoint storage."""
    return torch.cat([v.detach().float().reshape(-1).cpu() for v in state.values()]).numpy()


def unflatten_state(vector: np.ndarray, like: nn.Module) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state` given a model of the same architecture."""
    out, pos = {}, 0
    for k, v in like.state_dict().items():
        size = v.numel()
        out[k] = torch.as_tensor(vector[pos:pos + size]).reshape(v.shape).to(v.dtype)
        pos += size
    if pos != len(vector):
        raise ValueError(f"checkpoint has {len(vector)} values but the model has {pos}")
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device: auto or cpu")
    return torch.device(name)
