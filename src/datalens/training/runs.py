"""Runs of subset models: which models, where their results go, and the resumable,
block-by-block training of all of them through an executor (in-process or Ray).

Model ``j`` of a run trains on mask ``j // repeats`` of the run's stream with its own
model seed (:mod:`datalens.core.sampling`), so results never depend on how models are
grouped into blocks, stacks or workers.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from datalens.core.captions import NEGATIVES
from datalens.core.config import get_dotted, resolve_location, section_params
from datalens.core.data import Dataset, load_dataset
from datalens.training.engine import TrainedModels, TrainSettings, flatten_state, init_models, resolve_device, train_models, unflatten_state
from datalens.core.execution import LocalExecutor
from datalens.core.models import build_model
from datalens.tasks.base import Task
from datalens.tasks.classification import ClassificationTask
from datalens.tasks.contrastive import ContrastiveTask
from datalens.tasks.diffusion import DiffusionTask
from datalens.tasks.language import LanguageModelTask
from datalens.core.progress import progress_bar
from datalens.core.sampling import model_seed, subset_masks
from datalens.core.store import SubsetStore, located, open_existing


@dataclass(frozen=True)
class SubsetRun:
    """Everything that defines a run of subset models and where its results go.

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
    block_size: int  # of a new store; an existing one keeps its own (storage layout, not identity)
    store: str  # the store param: a folder of stores by identity, or one explicit .zarr store (see ``location``)
    num_checkpoints: int = 0
    device: str = "auto"
    stream: str = "train"
    repeats: int = 1
    stack_size: int = 8
    patch: dict | None = None  # a planted feature (datalens.core.data.plant_patch), for ModelDiff's ground truth
    blank: dict | None = None  # preprocessing that blanks a region (datalens.core.data.blank_region)
    repeat_offset: int = 0  # shifts every model seed: the same masks with other seeds (a negative control)
    exclude: tuple[int, ...] | None = None  # training examples left out of every mask (unlearning's oracles: S minus F)
    record_logits: bool = False  # also keep the raw outputs (every class logit) on train and test examples (float16)
    task: str = "classification"  # the kind of model (datalens.tasks): classification, contrastive, language_model, diffusion
    generated: str | None = None  # a .npy of generated samples appended to the test split (datalens.core.data.load_dataset)
    repo: str = "."  # the repo root, against which import paths of your own data and models resolve

    @classmethod
    def from_params(cls, p: dict, **given) -> "SubsetRun":
        """Build a run from a stage's nested params (``data``, ``model``, ``train``, ``device``).

        Fields in ``given`` (e.g. ``store``, ``num_models``, ``seed``, ``stream``, ``repeats``,
        ``num_checkpoints``, ``block_size``) take the place of the params; every other field
        must be a param the stage declares (a missing one is an error naming it).
        """
        def param(key: str):
            field_name = key.split(".")[-1]
            return given[field_name] if field_name in given else get_dotted(p, key)

        m = p["model"]
        kwargs = {k: (list(v) if isinstance(v, list) else v) for k, v in m.items() if k != "name"}
        n = int(param("train.num_models"))
        return cls(
            dataset=p["data"]["dataset"], data_root=resolve_location(p, p["data"]["root"]), model=m["name"],
            model_kwargs=kwargs, settings=TrainSettings.from_params(p["train"]), alpha=float(p["train"]["alpha"]),
            seed=int(param("train.seed")), num_models=n, block_size=int(min(param("train.block_size"), n)),
            store=resolve_location(p, param("train.store")),
            num_checkpoints=int(min(param("train.num_checkpoints"), n)), device=param("device"),
            stream=given.get("stream", "train"), repeats=int(given.get("repeats", 1)), stack_size=int(param("train.stack_size")),
            record_logits=bool(given.get("record_logits", p["train"].get("record_logits", False))),
            task=given.get("task", "classification"),
            repo=str(p.get("_root", ".")),
        )

    def identity(self) -> dict:
        """Every param that changes a model's results, and nothing else: not how many models,
        where they go, how they are grouped (block and stack size) or which are checkpointed.
        The device changes only floating-point rounding and is not part of it either. The data's
        content hash is, so an edited dataset never reuses models trained on the old one."""
        optional = {"data.patch": self.patch, "data.blank": self.blank, "repeat_offset": self.repeat_offset,
                    "exclude": list(self.exclude) if self.exclude else None}
        return {
            "data.dataset": self.dataset, "data.content_hash": self.dataset_().content_hash(), "task": self.task,
            "model.name": self.model,
            **{f"model.{k}": v for k, v in sorted(self.model_kwargs.items())},
            **{f"train.{k}": v for k, v in asdict(self.settings).items()},
            "train.alpha": self.alpha, "seed": self.seed, "stream": self.stream, "repeats": self.repeats,
            **{k: v for k, v in optional.items() if v},  # absent when unused, so older stores stay valid
        }

    @property
    def location(self) -> str:
        """Where this run's store is: ``<store>/<identity hash>.zarr``, or ``store`` itself when it
        ends in ``.zarr`` (:func:`datalens.core.store.located`)."""
        return located(self.store, self.identity())

    def mask_indices(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop) // self.repeats

    def model_seeds(self, start: int, stop: int) -> list[int]:
        return [model_seed(self.seed, j // self.repeats, j % self.repeats + self.repeat_offset, self.stream)
                for j in range(start, stop)]

    def open_store(self, mode: str = "r") -> SubsetStore:
        """This run's store, seen as its first ``num_models`` models."""
        return open_existing(self.location, mode, num_units=self.num_models)

    def dataset_(self) -> Dataset:
        return cached_dataset(self.dataset, self.data_root, self.patch, self.blank, self.repo, self.generated)

    def make_task(self, **options) -> Task:
        """The task object this run trains and measures: classification, contrastive on a pairs
        dataset (``datalens.core.captions``), whose pool is its test split, a language model
        (``datalens.tasks.language``) or a diffusion model (``datalens.tasks.diffusion``, its
        schedule's T from ``model.schedule_steps``). ``options`` choose what a diffusion task
        attributes (its ``output`` and ``draws``); other tasks take none."""
        if self.task == "diffusion":
            return DiffusionTask(int(self.model_kwargs.get("schedule_steps", 1000)), **options)
        if options:
            raise ValueError(f"task {self.task!r} takes no options; got {', '.join(options)}")
        if self.task == "classification":
            return ClassificationTask(label_smoothing=self.settings.label_smoothing)
        if self.task == "contrastive":
            ds = self.dataset_()
            return ContrastiveTask.of_pairs(torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test), NEGATIVES)
        if self.task == "language_model":
            return LanguageModelTask()
        raise ValueError(f"task {self.task!r} is unknown; allowed values: classification, contrastive, language_model, diffusion")

    def build_model(self) -> nn.Module:
        ds = self.dataset_()
        return build_model(self.model, ds.input_shape, ds.num_classes, self.repo, **self.model_kwargs)

    def load_checkpoint(self, store: SubsetStore, index: int, device="cpu") -> nn.Module:
        """Model ``index`` of this run, rebuilt from the checkpoint in ``store``, in eval mode."""
        model = self.build_model()
        model.load_state_dict(unflatten_state(store.checkpoint(index), model))
        return model.to(device).eval()


_DATA_CACHE: dict = {}


def cached_dataset(name: str, root: str, patch: dict | None = None, blank: dict | None = None, repo: str = ".",
                   generated: str | None = None) -> Dataset:
    """Load each dataset (with its patch, blanking and generated samples) once per process (block
    jobs in one worker share it)."""
    key = (name, root, json.dumps(patch, sort_keys=True), json.dumps(blank, sort_keys=True), repo, generated)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(name, root, patch, blank, repo, generated)
    return _DATA_CACHE[key]


def trained_on_masks(run: SubsetRun, masks: np.ndarray, seeds: Sequence[int], model_ids: Sequence[int] | None = None) -> TrainedModels:
    """Models of ``run``'s recipe trained on ``masks`` (m, n) with model seeds ``seeds`` (m,), on its device."""
    ds, device = run.dataset_(), resolve_device(run.device)
    x_tr, y_tr, _, _ = ds.tensors(device)
    models = [mod.to(device) for mod in init_models(run.build_model, seeds)]
    return train_models(run.make_task(), models, x_tr, y_tr, np.asarray(masks, bool), seeds, run.settings, model_ids=model_ids,
                        stack_size=run.stack_size)


def _train_and_score(run: SubsetRun, masks: np.ndarray, seeds: Sequence[int], model_ids: Sequence[int],
                     measure: Callable | None = None) -> dict:
    """Train one model per mask with the given seeds; the task's measurements as in :func:`train_range`
    (``test_outputs`` by ``measure(raw outputs, targets)`` where given, else the task's output)."""
    ds, task = run.dataset_(), run.make_task()
    x_tr, y_tr, x_te, y_te = ds.tensors(resolve_device(run.device))
    trained = trained_on_masks(run, masks, seeds, model_ids)
    raw_te, raw_tr = trained.outputs(task, x_te, y_te), trained.outputs(task, x_tr, y_tr)
    out = {
        "masks": masks,
        "test_outputs": (measure or task.output)(raw_te, y_te).float().cpu().numpy(),
        "test_metric": task.metric(raw_te, y_te).float().cpu().numpy(),
        "train_outputs": task.output(raw_tr, y_tr).float().cpu().numpy(),
        "models": trained,
    }
    if run.record_logits:
        out["train_logits"] = raw_tr.to(torch.float16).cpu().numpy()
        out["test_logits"] = raw_te.to(torch.float16).cpu().numpy()
    return out


def train_range(run: SubsetRun, start: int, stop: int) -> dict[str, np.ndarray | TrainedModels]:
    """Train models ``start..stop-1`` of ``run`` without touching any store.

    Returns ``masks`` (M, n) bool, ``test_outputs`` (M, t) and ``train_outputs`` (M, n) float32
    (the task's attributed output; margins for classification), ``test_metric`` (M,) (accuracy),
    ``models`` (:class:`~datalens.training.engine.TrainedModels`), and with ``record_logits`` the raw
    outputs ``train_logits`` (M, n, C) and ``test_logits`` (M, t, C) float16.
    """
    masks = subset_masks(run.seed, run.mask_indices(start, stop), run.dataset_().n_train, run.alpha, run.stream)
    if run.exclude:
        masks[:, list(run.exclude)] = False
    return _train_and_score(run, masks, run.model_seeds(start, stop), range(start, stop))


def train_block(run: SubsetRun, block: int) -> dict:
    """Train one block of ``run`` and write it to the run's store. Returns a small summary."""
    store = run.open_store("r+")
    store.check_identity(run.identity())
    start, stop = store.block_range(block)
    out = train_range(run, start, stop)
    ckpts = {j: flatten_state(s) for j, s in zip(range(start, stop), out["models"].state_dicts()) if j < run.num_checkpoints}
    names = SubsetStore.DATA_ARRAYS + (SubsetStore.LOGIT_ARRAYS if run.record_logits else ())
    store.write_block(block, {k: out[k] for k in names}, {"checkpoints": ckpts} if ckpts else None)
    return {"block": block, "start": start, "stop": stop, "test_metric": float(out["test_metric"].mean())}


def prepare_store(run: SubsetRun) -> SubsetStore:
    """Create or reopen ``run``'s store (checking its params) before any training starts."""
    ds = run.dataset_()
    num_params = sum(v.numel() for v in run.build_model().state_dict().values()) if run.num_checkpoints else 0
    return SubsetStore.create_or_open(run.location, run.identity(), run.num_models, ds.n_train, ds.n_test, run.block_size,
                                      run.num_checkpoints, num_params, raw_width(run) if run.record_logits else 0)


def raw_width(run: SubsetRun) -> int:
    """Raw outputs per example of ``run``'s model (class logits), from one forward of a fresh model."""
    ds = run.dataset_()
    x, y, _, _ = ds.tensors()
    with torch.no_grad():
        return int(run.make_task().forward(run.build_model().eval(), x[:1], y[:1]).reshape(-1).numel())


def eval_run(p: dict, **given) -> SubsetRun:
    """The held-out evaluation run (``evaluation.*``): ``repeats`` models per fresh mask, on its
    own stream and seed, no checkpoints; ``given`` as in :meth:`SubsetRun.from_params` (``task``)."""
    ev = p["evaluation"]
    return SubsetRun.from_params(p, store=ev["store"], num_models=ev["num_masks"] * ev["repeats"], seed=ev["seed"],
                                 stream="eval", repeats=ev["repeats"], num_checkpoints=0, **given)


def section_runs(p: dict, section: str, task: str) -> tuple[SubsetRun, SubsetRun]:
    """The subset run and the held-out evaluation run of a :data:`~datalens.core.config.SECTIONS`
    section (``clip``, ``fact_tracing``) of stage params ``p``, models of kind ``task``."""
    cp = section_params(p, section)
    return SubsetRun.from_params(cp, task=task), eval_run(cp, task=task)


def check_vocabulary(run: SubsetRun) -> None:
    """A model that embeds tokens (a ``vocab_size`` attribute) must embed every token id of the data:
    one line naming the param, before any training (an id past the table is an opaque IndexError)."""
    size = getattr(run.build_model(), "vocab_size", None)
    ds = run.dataset_()
    if size is not None and ds.x_train.dtype.kind in "iu":
        top = int(max(ds.x_train.max(), ds.x_test.max()))
        if top >= size:
            raise ValueError(f"{run.model}: model.vocab_size={size}, but the data's token ids reach {top}; "
                             f"give model.vocab_size >= {top + 1}")


def train_subset_models(run: SubsetRun, executor=None, progress: bool = True) -> SubsetStore:
    """Train every model of ``run`` that its store does not hold yet, block by block,
    through ``executor`` (default: in-process). Resumable: rerun after any crash and
    only the missing blocks train."""
    check_vocabulary(run)
    store = prepare_store(run)
    todo = store.missing_blocks()
    executor = executor or LocalExecutor()
    n_todo = sum(np.subtract(*store.block_range(b)[::-1]) for b in todo)

    def describe(args):
        start, stop = store.block_range(args[1])
        return f"models {start}..{stop - 1}"

    with progress_bar(total=store.num_models, initial=store.num_models - n_todo, unit="model", desc=f"train {run.stream}",
              disable=not progress) as bar:
        for summary in executor.map_unordered(train_block, [(run, b) for b in todo], describe=describe):
            bar.update(summary["stop"] - summary["start"])
            bar.set_postfix(test_metric=f"{summary['test_metric']:.3f}")
    return store


def train_on_masks(run: SubsetRun, masks: np.ndarray, repeats: int = 1, stream: str = "counterfactual",
                   measure: Callable | None = None, average: bool = True) -> np.ndarray:
    """Test margins (m, t) of models trained on given masks (m, n), averaged over ``repeats``
    seeds (or ``measure(raw outputs (m, t, C), labels (t,))``, e.g. the correct-class margin);
    with ``average`` False, every repeat's (repeats, m, t). Repeat r uses the same seed for every
    mask (common random numbers), so differences between masks are not blurred by
    initialisation noise."""
    per_repeat = np.stack([_train_and_score(run, masks, [model_seed(run.seed, 0, r, stream)] * len(masks), range(len(masks)),
                                            measure)["test_outputs"].astype(np.float64) for r in range(repeats)])
    return per_repeat.mean(0) if average else per_repeat


def seconds_per_model(run: SubsetRun, count: int = 16, repeats: int = 3) -> float:
    """Wall seconds to train one model of ``run``: the median over ``repeats`` timings of
    ``count`` models (after a warm-up), so one slow moment on a shared machine does not set it."""
    timing = replace(run, store="memory://unused")
    train_range(timing, 0, 1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_range(timing, 0, count)
        times.append((time.perf_counter() - t0) / count)
    return float(np.median(times))
