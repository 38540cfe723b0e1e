"""Training many models on random subsets of the training set.

Every random choice is a pure function of params and the model index:

* the mask of model ``j`` depends only on ``(seed, stream, j // repeats)``;
* its initialisation and data order only on ``(seed, stream, j // repeats, j % repeats)``.

so results never depend on how models are grouped into blocks or spread over
workers. ``repeats > 1`` trains several models (different seeds) per mask, which
the held-out evaluation uses to average out training noise.

**Margin** (METHODS.md section 1, *choice*): ``logit_y - logsumexp_{j != y} logit_j``
(``= log p_y / (1 - p_y)``), the definition TRAK and KLoM use, so one margin
serves datamodels, TRAK's LDS and unlearning alike. It is positive exactly when
p_y > 1/2 (which implies a correct prediction; with many classes a correct one can
still have p_y < 1/2, so accuracy is recorded separately, from the argmax).

Models whose architecture has no buffers (MLP, small CNN) train *batched*: the
block's weights are stacked and one ``torch.func.vmap``-ed forward trains all of
them; since Adam and SGD act elementwise and the summed loss separates over
models, this equals training each model alone. Other models (ResNet-9, with batch
norm) fall back to a plain loop. Both paths draw the same mini-batches.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

STREAMS = {"train": 0, "eval": 1, "counterfactual": 2, "seed_agreement": 3}


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
    return np.stack([subset_mask(seed, int(i), n, alpha, stream) for i in mask_indices]) if len(mask_indices) else np.zeros((0, n), bool)


def model_seed(seed: int, mask_index: int, repeat: int, stream: str = "train") -> int:
    """The seed of one model's initialisation and data order."""
    return int(np.random.SeedSequence([seed, _stream_code(stream), mask_index, repeat, 7]).generate_state(1)[0])


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation hyperparameters shared by every model of a run.

    ``batch_size=0`` means full-batch training on the model's whole subset.
    ``schedule='triangular'`` ramps the learning rate linearly from 0 to ``lr`` at
    ``peak_epoch`` and back to 0 at the end (the CIFAR-10 recipe).
    """

    epochs: int = 100
    lr: float = 1e-2
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 0
    label_smoothing: float = 0.0
    schedule: str = "constant"
    peak_epoch: float = 5.0
    augment: bool = False
    precision: str = "float32"  # or "bfloat16": mixed precision, see train_models

    @classmethod
    def from_params(cls, train: dict) -> "TrainSettings":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in train.items() if k in names})

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bfloat16" else torch.float32

    def steps_per_epoch(self, subset_size: float) -> int:
        return 1 if self.batch_size == 0 else max(1, math.ceil(subset_size / self.batch_size))


def epoch_batches(subset: np.ndarray, model_seed_: int, epoch: int, steps: int) -> list[np.ndarray]:
    """The mini-batches (indices into the training set) of one model in one epoch:
    its subset shuffled by (model seed, epoch) and cut into ``steps`` near-equal parts."""
    rng = np.random.default_rng([model_seed_, epoch])
    return np.array_split(rng.permutation(subset), steps)


def _lr_factor(settings: TrainSettings, step: int, total_steps: int, steps_per_epoch: int) -> float:
    if settings.schedule == "constant":
        return 1.0
    peak = max(1, int(settings.peak_epoch * steps_per_epoch))
    if step < peak:
        return (step + 1) / peak
    return max(0.0, (total_steps - step) / max(1, total_steps - peak))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and translation by up to 2 pixels, for (B, C, H, W) images."""
    if x.dim() != 4:
        return x
    flip = torch.rand(x.shape[0], generator=gen, device="cpu") < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _make_optimizer(params: list[torch.Tensor], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.momentum > 0)


def margins_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logit_y - logsumexp_{j != y} logit_j`` for logits (..., n, C) and labels (n,): shape (..., n)."""
    y_idx = y.expand(logits.shape[:-1]).unsqueeze(-1)
    correct = logits.gather(-1, y_idx).squeeze(-1)
    others = logits.scatter(-1, y_idx, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


class NonFiniteLossError(FloatingPointError):
    """Training diverged (NaN or inf loss)."""


@dataclass
class TrainedModels:
    """A block of trained models: ``state_dicts()`` and batched ``logits(x)`` (M, n, C)."""

    base: nn.Module
    params: dict[str, torch.Tensor] | None = None  # stacked (M, ...) when batched
    modules: list[nn.Module] = field(default_factory=list)
    snapshots: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)  # per model, per snapshot epoch

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0] if self.params is not None else len(self.modules)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        outs = []
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            if self.params is not None:
                f = torch.vmap(lambda p, xx: functional_call(self.base, p, (xx,)), in_dims=(0, None))
                outs.append(f(self.params, xb))
            else:
                outs.append(torch.stack([m.eval()(xb) for m in self.modules]))
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
    """Train ``models[i]`` on ``x[masks[i]]`` (in place for the loop path).

    x: (n, *input_shape) on the training device; y: (n,) int64; masks: (M, n) bool;
    seeds: (M,) data-order seeds. ``batched=None`` picks the batched path when every
    model has no buffers; it trains ``stack_size`` models per stacked step (on 2 CPU
    cores 8 is fastest in float32 and 16 in bfloat16; GPUs like more).
    ``model_ids`` name the models in error messages. ``snapshot_epochs`` (loop path only)
    keeps each model's weights after those epochs (1-based) in ``TrainedModels.snapshots``.

    ``settings.precision='bfloat16'`` is mixed precision as in ``torch.autocast``: weights,
    gradients and optimizer state stay float32; matrix products and the activations
    between them run in bfloat16; the loss is float32. Evaluation is always float32.
    """
    from datalens.execution import keep_freed_memory
    from datalens.models import batchable

    if x.device.type == "cpu":
        keep_freed_memory()
    if batched is None:
        batched = all(batchable(m) for m in models)
    model_ids = list(model_ids) if model_ids is not None else list(range(len(models)))
    subsets = [np.flatnonzero(m) for m in masks]
    if any(len(s) == 0 for s in subsets):
        empty = [model_ids[i] for i, s in enumerate(subsets) if len(s) == 0]
        raise ValueError(f"models {empty} have empty subsets; raise train.alpha or the training set size")
    steps = settings.steps_per_epoch(float(np.mean([len(s) for s in subsets])))
    total = steps * settings.epochs
    aug_gen = torch.Generator().manual_seed(int(seeds[0]) if len(seeds) else 0)
    if snapshot_epochs:
        batched = False
    if batched:
        parts = [
            _train_batched(models[a:a + stack_size], x, y, masks[a:a + stack_size], subsets[a:a + stack_size],
                           seeds[a:a + stack_size], settings, steps, total, aug_gen, model_ids[a:a + stack_size])
            for a in range(0, len(models), stack_size)
        ]
        return TrainedModels(base=parts[0].base, params={k: torch.cat([p.params[k] for p in parts]) for k in parts[0].params})
    snapshots: list[list[dict]] = []
    for i, model in enumerate(models):
        model.train()
        snapshots.append([])
        opt = _make_optimizer(list(model.parameters()), settings)
        gen = torch.Generator().manual_seed(int(seeds[i]))
        step = 0
        for epoch in range(settings.epochs):
            for idx in epoch_batches(subsets[i], int(seeds[i]), epoch, steps):
                for g in opt.param_groups:
                    g["lr"] = settings.lr * _lr_factor(settings, step, total, steps)
                xb = x[torch.as_tensor(idx, device=x.device)]
                if settings.augment:
                    xb = _augment(xb, gen)
                with _autocast(x.device, settings):
                    logits = model(xb)
                loss = F.cross_entropy(logits.float(), y[torch.as_tensor(idx, device=x.device)], label_smoothing=settings.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss.item()} for model {model_ids[i]} at epoch {epoch}; lower train.lr")
            if epoch + 1 in snapshot_epochs:
                snapshots[i].append({k: v.detach().clone() for k, v in model.state_dict().items()})
        model.eval()
    return TrainedModels(base=models[0], modules=models, snapshots=snapshots)


def _autocast(device: torch.device, settings: TrainSettings):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bfloat16")


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
    return x[idx_t], y[idx_t], torch.as_tensor(wts, device=x.device, dtype=x.dtype)


def _mlp_linear_names(model: nn.Module) -> list[str] | None:
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


def _stacked_mlp_loss(linear_names: list[str], label_smoothing: float, dtype: torch.dtype = torch.float32):
    """Summed per-model losses of stacked MLPs, computed as (models, features, examples)
    with ``baddbmm``: on CPU this layout makes the ReLU and the softmax over a small
    class dimension vectorise along examples, about twice as fast as the vmap layout.
    Products and activations run in ``dtype`` (the inputs ``xb`` must already be in it),
    the loss in float32."""

    def loss(p, xb, yb, wb):
        h = xb  # (M, d, L), feature-major
        for k, name in enumerate(linear_names):
            h = torch.baddbmm(p[f"{name}.bias"].unsqueeze(-1).to(dtype), p[f"{name}.weight"].to(dtype), h)
            if k < len(linear_names) - 1:
                h = torch.relu(h)
        h = h.float()
        lse = torch.logsumexp(h, 1)  # (M, L)
        correct = (h * yb).sum(1)  # yb: (M, C, L) one-hot
        per_example = lse - (1 - label_smoothing) * correct
        if label_smoothing:
            per_example = per_example - label_smoothing * h.mean(1)
        return (per_example * wb).sum(1)

    return loss


def _train_batched(models, x, y, masks, subsets, seeds, settings, steps, total, aug_gen, model_ids) -> TrainedModels:
    params, _ = stack_module_state(models)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    opt = _make_optimizer(list(params.values()), settings)
    full_batch = settings.batch_size == 0

    def per_model_loss(p, xb, yb, wb):
        with _autocast(x.device, settings):
            logits = functional_call(base, p, (xb,))
        return (F.cross_entropy(logits.float(), yb, reduction="none", label_smoothing=settings.label_smoothing) * wb).sum()

    linear_names = _mlp_linear_names(models[0])
    if linear_names is not None:
        mlp_loss = _stacked_mlp_loss(linear_names, settings.label_smoothing, settings.compute_dtype)
        num_classes = params[f"{linear_names[-1]}.weight"].shape[1]

        def loss_fn(p, xb, yb, wb):
            xt = xb.reshape(xb.shape[0], xb.shape[1], -1).transpose(1, 2).to(settings.compute_dtype).contiguous()
            return mlp_loss(p, xt, F.one_hot(yb, num_classes).transpose(1, 2).to(xb.dtype), wb)
    else:
        loss_fn = torch.vmap(per_model_loss, in_dims=(0, 0, 0, 0))
    if full_batch:
        # Gather each model's subset once (padded, zero weight): half the compute of
        # masking the whole training set at alpha = 0.5.
        x_full, y_full, w_full = _padded_batch(x, y, subsets)
        if linear_names is not None:  # the layout change is done once, not every epoch
            xt_full = x_full.reshape(x_full.shape[0], x_full.shape[1], -1).transpose(1, 2).to(settings.compute_dtype).contiguous()
            y_full = F.one_hot(y_full, num_classes).transpose(1, 2).to(x.dtype)
            loss_fn = lambda p, xb, yb, wb: mlp_loss(p, xt_full, yb, wb)  # noqa: E731
    step = 0
    for epoch in range(settings.epochs):
        if full_batch:
            batches = [None]
        else:
            per_model = [epoch_batches(subsets[i], int(seeds[i]), epoch, steps) for i in range(len(models))]
            batches = list(zip(*per_model))
        for batch in batches:
            for g in opt.param_groups:
                g["lr"] = settings.lr * _lr_factor(settings, step, total, steps)
            if full_batch:
                losses = loss_fn(params, x_full, y_full, w_full)
            else:
                xb, yb, wb = _padded_batch(x, y, batch)
                if settings.augment:
                    xb = torch.stack([_augment(xi, aug_gen) for xi in xb])
                losses = loss_fn(params, xb, yb, wb)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            step += 1
        bad = ~torch.isfinite(losses.detach())
        if bad.any():
            ids = [model_ids[i] for i in torch.nonzero(bad).flatten().tolist()]
            raise NonFiniteLossError(f"loss became non-finite for models {ids} at epoch {epoch}; lower train.lr")
    return TrainedModels(base=base, params={k: v.detach() for k, v in params.items()})


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


# --- runs of many subset models -------------------------------------------

@dataclass(frozen=True)
class SubsetRun:
    """Everything that defines a run of subset models and where its results go.

    Model ``j`` trains on mask ``j // repeats`` of ``stream``; see the module docstring.
    Picklable, so block jobs can ship it to workers.
    """

    dataset: str
    data_root: str
    model: str
    model_kwargs: dict
    settings: TrainSettings
    alpha: float
    seed: int
    num_models: int
    block_size: int
    store: str
    num_checkpoints: int = 0
    device: str = "auto"
    stream: str = "train"
    repeats: int = 1
    stack_size: int = 8

    @classmethod
    def from_params(cls, p: dict, *, store: str | None = None, num_models: int | None = None, seed: int | None = None,
                    stream: str = "train", repeats: int = 1, num_checkpoints: int | None = None) -> "SubsetRun":
        """Build a run from a stage's nested params (``data``, ``model``, ``train``, ``device``)."""
        t, m = p["train"], p["model"]
        kwargs = {k: (list(v) if isinstance(v, list) else v) for k, v in m.items() if k != "name"}
        n = num_models if num_models is not None else t["num_models"]
        root = p.get("_root", ".")
        store_url = store if store is not None else t["store"]
        if "://" not in store_url and not store_url.startswith("/"):
            store_url = f"{root}/{store_url}"
        data_root = p["data"].get("root", "data")
        if not data_root.startswith("/"):
            data_root = f"{root}/{data_root}"
        return cls(
            dataset=p["data"]["dataset"], data_root=data_root, model=m["name"], model_kwargs=kwargs,
            settings=TrainSettings.from_params(t), alpha=float(t["alpha"]),
            seed=int(seed if seed is not None else t["seed"]), num_models=int(n),
            block_size=int(min(t.get("block_size", 100), n)), store=store_url,
            num_checkpoints=int(min(num_checkpoints if num_checkpoints is not None else t.get("num_checkpoints", 0), n)),
            device=p.get("device", "auto"), stream=stream, repeats=int(repeats), stack_size=int(t.get("stack_size", 8)),
        )

    def identity(self) -> dict:
        """The params that determine every model's results (not how many, nor where)."""
        return {
            "data.dataset": self.dataset, "model.name": self.model,
            **{f"model.{k}": v for k, v in sorted(self.model_kwargs.items())},
            **{f"train.{k}": v for k, v in asdict(self.settings).items()},
            "train.alpha": self.alpha, "seed": self.seed, "stream": self.stream, "repeats": self.repeats,
            "train.num_checkpoints": self.num_checkpoints,
        }

    def mask_indices(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop) // self.repeats

    def model_seeds(self, start: int, stop: int) -> list[int]:
        return [model_seed(self.seed, j // self.repeats, j % self.repeats, self.stream) for j in range(start, stop)]

    def build_model(self, dataset) -> nn.Module:
        from datalens.models import build_model
        return build_model(self.model, dataset.input_shape, dataset.num_classes, **self.model_kwargs)

    def load_checkpoint(self, store, index: int, device: str | torch.device = "cpu") -> nn.Module:
        """Model ``index`` of this run, rebuilt from the checkpoint in ``store``, in eval mode."""
        ds = cached_dataset(self.dataset, self.data_root)
        model = self.build_model(ds)
        model.load_state_dict(unflatten_state(store.checkpoint(index), model))
        return model.to(device).eval()


_DATA_CACHE: dict = {}


def cached_dataset(name: str, root: str):
    """Load each dataset once per process (block jobs in one worker share it)."""
    from datalens.data import load_dataset
    if (name, root) not in _DATA_CACHE:
        _DATA_CACHE[(name, root)] = load_dataset(name, root)
    return _DATA_CACHE[(name, root)]


def _train_and_score(run: SubsetRun, masks: np.ndarray, seeds: Sequence[int], model_ids: Sequence[int]) -> dict:
    """Train one model per mask with the given seeds; margins and accuracy as in :func:`train_range`."""
    ds = cached_dataset(run.dataset, run.data_root)
    device = resolve_device(run.device)
    x_tr, y_tr, x_te, y_te = ds.tensors(device)
    models = [mod.to(device) for mod in init_models(lambda: run.build_model(ds), seeds)]
    trained = train_models(models, x_tr, y_tr, np.asarray(masks, bool), seeds, run.settings, model_ids=model_ids,
                           stack_size=run.stack_size)
    logits_te = trained.logits(x_te)
    return {
        "masks": masks,
        "test_margins": margins_from_logits(logits_te, y_te).float().cpu().numpy(),
        "test_accuracy": (logits_te.argmax(-1) == y_te).float().mean(-1).cpu().numpy(),
        "train_margins": margins_from_logits(trained.logits(x_tr), y_tr).float().cpu().numpy(),
        "models": trained,
    }


def train_range(run: SubsetRun, start: int, stop: int) -> dict[str, np.ndarray | TrainedModels]:
    """Train models ``start..stop-1`` of ``run`` without touching any store.

    Returns ``masks`` (M, n) bool, ``test_margins`` (M, t), ``train_margins`` (M, n) float32,
    ``test_accuracy`` (M,), ``models`` (:class:`TrainedModels`).
    """
    ds = cached_dataset(run.dataset, run.data_root)
    masks = subset_masks(run.seed, run.mask_indices(start, stop), ds.n_train, run.alpha, run.stream)
    return _train_and_score(run, masks, run.model_seeds(start, stop), range(start, stop))


def train_block(run: SubsetRun, block: int) -> dict:
    """Train one block of ``run`` and write it to the run's store. Returns a small summary."""
    from datalens.store import open_existing

    store = open_existing(run.store, mode="r+")
    store.check_identity(run.identity())
    start, stop = store.block_range(block)
    out = train_range(run, start, stop)
    ckpts = {}
    if start < run.num_checkpoints:
        for j, state in zip(range(start, stop), out["models"].state_dicts()):
            if j < run.num_checkpoints:
                ckpts[j] = flatten_state(state)
    store.write_block(block, out, ckpts)
    return {"block": block, "start": start, "stop": stop, "test_accuracy": float(out["test_accuracy"].mean())}


def prepare_store(run: SubsetRun):
    """Create or reopen ``run``'s store (checking its params) before any training starts."""
    from datalens.store import StoreShape, SubsetStore
    ds = cached_dataset(run.dataset, run.data_root)
    num_params = sum(v.numel() for v in run.build_model(ds).state_dict().values()) if run.num_checkpoints else 0
    shape = StoreShape(run.num_models, ds.n_train, ds.n_test, run.block_size, run.num_checkpoints, num_params)
    return SubsetStore.open(run.store, run.identity(), shape)


def train_subset_models(run: SubsetRun, executor=None, progress: bool = True):
    """Train every model of ``run`` that its store does not hold yet, block by block,
    through ``executor`` (default: in-process). Resumable: rerun after any crash and
    only the missing blocks train. Returns the :class:`~datalens.store.SubsetStore`."""
    from tqdm.auto import tqdm
    from datalens.execution import LocalExecutor

    store = prepare_store(run)
    todo = store.missing_blocks()
    executor = executor or LocalExecutor()
    n_todo = sum(np.subtract(*store.block_range(b)[::-1]) for b in todo)
    with tqdm(total=store.num_models, initial=store.num_models - n_todo, unit="model", desc=f"train {run.stream}", disable=not progress) as bar:
        for summary in executor.map_unordered(train_block, [(run, b) for b in todo], describe=lambda a: f"models {store.block_range(a[1])[0]}..{store.block_range(a[1])[1] - 1}"):
            bar.update(summary["stop"] - summary["start"])
            bar.set_postfix(test_acc=f"{summary['test_accuracy']:.3f}")
    return store


def report_subset_run(store, run: SubsetRun, fig_dir) -> dict:
    """Figures and metrics of a finished run: accuracy across models, margin
    distributions, and the mean margin of a target with and without the training
    example whose inclusion moves it most."""
    from pathlib import Path
    from datalens import plots

    fig_dir = Path(fig_dir)
    ds = cached_dataset(run.dataset, run.data_root)
    test = store.read("test_margins")
    masks = store.read("masks")
    acc = store.read("test_accuracy")
    target = int(np.argmin(np.abs(np.median(test, 0))))  # the least certain target shows effects best
    counts_in = masks.sum(0)
    mean_in = masks.T.astype(np.float64) @ test[:, target] / np.maximum(counts_in, 1)
    mean_out = (~masks).T.astype(np.float64) @ test[:, target] / np.maximum(len(masks) - counts_in, 1)
    train_index = int(np.argmax(np.abs(mean_in - mean_out)))
    plots.accuracy_histogram(acc, fig_dir / "test_accuracy.png")
    plots.margin_distributions(test, np.array([target, 0, 1]), fig_dir / "margin_distributions.png")
    plots.with_without(test[masks[:, train_index], target], test[~masks[:, train_index], target], target, train_index,
                       fig_dir / "with_without.png")
    return {
        "num_models": int(len(test)),
        "test_accuracy_mean": float(acc.mean()),
        "test_accuracy_std": float(acc.std()),
        "subset_size_mean": float(masks.sum(1).mean()),
        "example_target": target,
        "example_train_index": train_index,
        "example_margin_with": float(mean_in[train_index]),
        "example_margin_without": float(mean_out[train_index]),
        "n_train": ds.n_train,
        "n_test": ds.n_test,
    }


def train_on_masks(run: SubsetRun, masks: np.ndarray, repeats: int = 1, stream: str = "counterfactual") -> np.ndarray:
    """Test margins (m, t) of models trained on given masks (m, n), averaged over ``repeats``
    seeds. Repeat r uses the same seed for every mask (common random numbers), so
    differences between masks are not blurred by initialisation noise."""
    total = 0.0
    for r in range(repeats):
        seeds = [model_seed(run.seed, 0, r, stream)] * len(masks)
        total = total + _train_and_score(run, masks, seeds, range(len(masks)))["test_margins"].astype(np.float64)
    return total / repeats
