"""Resumable stores: one zarr group per piece of long work, written unit by unit.

A :class:`ResumableStore` holds arrays whose first axis is the *unit* (a trained model,
a featurised checkpoint), chunked by block along that axis, plus a ``completed`` flag per
unit. A block's flags are written only after its data, so a crash (even ``kill -9``)
leaves the block incomplete and a rerun recomputes it; chunks align with blocks, so
workers never write the same chunk. ``attrs['identity']`` holds every param that
changes the results; reopening under other ones is refused with a message naming the
first differing param. ``url`` may be any path or URL that zarr and fsspec open
(``file://``, ``s3://``, ``memory://``).

Where a store lives follows from its identity (:func:`located`): a store param that names a
folder holds one store per identity, ``<folder>/<hash>.zarr``, so other params get their own
store and switching back finds the old one; a param ending in ``.zarr`` is that one store, and
other params are refused there. The block size is storage layout: a store keeps the one it was
made with. Opened for fewer units than it holds, a store is a view of its first units.

:class:`SubsetStore` is the store of a run of subset models::

    masks          (N, n) bool     chunks (B, n)
    test_outputs   (N, t) float32  chunks (B, t)     the task's attributed output f on each test example
                                                     (the LDS ground truth; the margin for classification)
    train_outputs  (N, n) float32  chunks (B, n)     the same on each training example
    test_metric    (N,)   float32  chunks (B,)       the task's per-model test metric (accuracy for classification)
    train_logits   (N, n, C) float16                 optional: the model's raw outputs per example (class logits)
    test_logits    (N, t, C) float16
    completed      (N,)   bool     chunks (B,)
    checkpoints    (K, P) float32  chunks (1, P)   weights of models 0..K-1 (flattened state dicts)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

FORMAT_VERSION = 4  # 4: arrays named by the task interface (outputs, metric)


class StoreError(RuntimeError):
    """The store is corrupted, or was made under other params."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store: its shape after the unit axis, dtype and fill value.
    ``rows`` fixes the first axis (chunked one row at a time) instead of one row per unit."""

    tail: tuple[int, ...]
    dtype: str = "float32"
    fill: Any = np.nan
    rows: int | None = None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def identity_hash(identity: dict[str, Any]) -> str:
    """12 hex digits of SHA-256 over the identity as sorted JSON: a store's folder name."""
    return hashlib.sha256(json.dumps(_jsonable(identity), sort_keys=True).encode()).hexdigest()[:12]


def located(location: str, identity: dict[str, Any]) -> str:
    """The store for ``identity`` under a store param: ``location`` itself when it ends in
    ``.zarr`` (an explicit store), else ``<location>/<identity_hash>.zarr``."""
    if location.rstrip("/").endswith(".zarr"):
        return location
    return f"{location.rstrip('/')}/{identity_hash(identity)}.zarr"


def _zarr_group(url: str, mode: str) -> zarr.Group:
    # fsspec's local file system does not make parent folders unless asked to
    options = {"storage_options": {"auto_mkdir": True}} if url.startswith("file://") else {}
    return zarr.open_group(url, mode=mode, **options)


def _open_group(url: str, mode: str) -> zarr.Group | None:
    try:
        return _zarr_group(url, mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except Exception as exc:
        raise StoreError(f"store at {url} cannot be opened ({exc}); move it aside or delete it, then rerun") from None


class ResumableStore:
    """Arrays of per-unit results with completed flags and a params identity (see the module docstring)."""

    kind = "datalens store"

    def __init__(self, group: zarr.Group, url: str):
        self.group, self.url = group, url
        try:
            self.identity: dict[str, Any] = dict(group.attrs["identity"])
            self.block_size = int(group.attrs["block_size"])
            self.completed_flags = group["completed"]
        except KeyError as exc:
            raise StoreError(f"store at {url} is corrupted or not a {self.kind} (missing {exc}); "
                             "move it aside or delete it, then rerun") from None
        self.num_units = self.completed_flags.shape[0]

    def limited(self, num_units: int) -> "ResumableStore":
        """This store seen as its first ``num_units`` units (all of them when it holds fewer):
        what a run of that many units reads and completes, the rest left as they are."""
        self.num_units = min(int(num_units), self.completed_flags.shape[0])
        return self

    @classmethod
    def open(cls, url: str, identity: dict[str, Any], num_units: int, block_size: int, arrays: dict[str, ArraySpec],
             attrs: dict | None = None):
        """Open the store at ``url`` for work with ``identity`` params, creating it (in blocks of
        ``block_size``) if absent, growing it when ``num_units`` exceeds what it holds and seeing
        only its first ``num_units`` when it holds more. An existing store keeps its own block
        size. Raises :class:`StoreError` naming the first param that differs."""
        identity = _jsonable(identity)
        group = _open_group(url, "r+")
        if group is None:
            group = _zarr_group(url, "w")
            for name, spec in {**arrays, "completed": ArraySpec((), "bool", False)}.items():
                rows = spec.rows if spec.rows is not None else num_units
                chunk = 1 if spec.rows is not None else block_size
                group.create_array(name, shape=(rows, *spec.tail), chunks=(max(chunk, 1), *spec.tail) if rows else (1, *spec.tail),
                                   dtype=spec.dtype, fill_value=spec.fill)
            group.attrs.update({"identity": identity, "block_size": block_size, "format_version": FORMAT_VERSION,
                                **(attrs or {})})
            return cls(group, url)
        store = cls(group, url)
        store.check_identity(identity)
        missing = [name for name in arrays if name not in group]
        if missing:
            raise StoreError(f"store at {url} is corrupted or not a {cls.kind} (missing {missing}); move it aside or delete it")
        if num_units > store.num_units:
            for name, spec in {**arrays, "completed": ArraySpec(())}.items():
                if spec.rows is None:
                    group[name].resize((num_units, *group[name].shape[1:]))
            store.completed_flags = group["completed"]  # a fresh handle sees the new shape
        return store.limited(num_units)

    def check_identity(self, identity: dict[str, Any]) -> None:
        identity = _jsonable(identity)
        for key in sorted(set(identity) | set(self.identity)):
            old, new = self.identity.get(key, "<absent>"), identity.get(key, "<absent>")
            if old != new:
                raise StoreError(
                    f"store at {self.url} was made with {key}={old!r}, but the params now say {key}={new!r}. "
                    f"Set {key} back, or point the run at a new store (or delete this one) to start over."
                )

    # -- blocks ---------------------------------------------------------------
    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_units)

    @property
    def num_blocks(self) -> int:
        return -(-self.num_units // self.block_size)

    def completed(self) -> np.ndarray:
        """(N,) bool: which units are done."""
        return np.asarray(self.completed_flags[: self.num_units])

    def missing_blocks(self) -> list[int]:
        done = self.completed()
        return [b for b in range(self.num_blocks) if not done[slice(*self.block_range(b))].all()]

    def write_block(self, block: int, values: dict[str, np.ndarray], rows: dict[str, dict[int, np.ndarray]] | None = None) -> None:
        """Write one block's arrays (each (units in block, ...)), then any fixed-row arrays
        (``rows[name][index] = vector``), then, last, the block's completed flags."""
        start, stop = self.block_range(block)
        for name, value in values.items():
            value = np.asarray(value)
            if value.shape[0] != stop - start:
                raise ValueError(f"block {block} result '{name}' has {value.shape[0]} rows, expected {stop - start}")
            self.group[name][start:stop] = value
        for name, by_index in (rows or {}).items():
            for index, vector in by_index.items():
                self.group[name][index] = vector
        self.completed_flags[start:stop] = True

    # -- reading --------------------------------------------------------------
    def read(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Rows of an array; ``rows=None`` reads the completed units only."""
        if rows is None:
            rows = np.flatnonzero(self.completed())
        arr = self.group[name]
        if isinstance(rows, slice):
            return np.asarray(arr[rows])
        return np.asarray(arr.get_orthogonal_selection((np.asarray(rows),)))


class SubsetStore(ResumableStore):
    """The store of a run of subset models (layout in the module docstring)."""

    kind = "datalens subset store"
    DATA_ARRAYS = ("masks", "test_outputs", "train_outputs", "test_metric")
    LOGIT_ARRAYS = ("train_logits", "test_logits")

    @classmethod
    def create_or_open(cls, url: str, identity: dict, num_models: int, n_train: int, n_test: int, block_size: int,
                       num_checkpoints: int = 0, num_params: int = 0, raw_width: int = 0) -> "SubsetStore":
        """``raw_width > 0`` also keeps the model's raw outputs (``raw_width`` per example: every class logit (float16: half the space, and the
        rounding, about 1e-3 relative, is far below the seed-to-seed spread of a logit)."""
        arrays = {"masks": ArraySpec((n_train,), "bool", False), "test_outputs": ArraySpec((n_test,)),
                  "train_outputs": ArraySpec((n_train,)), "test_metric": ArraySpec(())}
        if raw_width:
            arrays["train_logits"] = ArraySpec((n_train, raw_width), "float16")
            arrays["test_logits"] = ArraySpec((n_test, raw_width), "float16")
            group = _open_group(url, "r")
            if group is not None and "completed" in group and "train_logits" not in group:
                raise StoreError(f"store at {url} was made without logits, but the params ask for train.record_logits=true; "
                                 "models already trained cannot record them, so set it to false or use a new store")
        if num_checkpoints:
            arrays["checkpoints"] = ArraySpec((num_params,), rows=num_checkpoints)
        store = cls.open(url, identity, num_models, block_size, arrays, {"num_checkpoints": num_checkpoints})
        if store.num_checkpoints < num_checkpoints:
            raise StoreError(f"store at {url} keeps weights of {store.num_checkpoints} models, the params ask for "
                             f"train.num_checkpoints={num_checkpoints}; models already trained cannot be checkpointed "
                             "again, so lower it or use a new store")
        return store

    @property
    def num_models(self) -> int:
        return self.num_units

    @property
    def num_checkpoints(self) -> int:
        return int(self.group.attrs.get("num_checkpoints", 0))

    def checkpoint(self, index: int) -> np.ndarray:
        if index >= self.num_checkpoints:
            raise IndexError(f"model {index} has no checkpoint; the run saved train.num_checkpoints={self.num_checkpoints}")
        vec = np.asarray(self.group["checkpoints"][index])
        if np.isnan(vec).any():
            raise StoreError(f"checkpoint of model {index} in {self.url} is not written yet")
        return vec


def open_existing(url: str, mode: str = "r", cls: type[ResumableStore] = SubsetStore, num_units: int | None = None):
    """Open a finished or partial store (``mode="r+"`` to write blocks into it), seen as its
    first ``num_units`` units when given. A store that holds fewer units than asked for is an
    error, not a smaller answer: the params it was read for describe a larger run."""
    group = _open_group(url, mode)
    if group is None:
        raise FileNotFoundError(f"no store at {url}; run the stage that creates it first")
    store = cls(group, url)
    if num_units is not None and num_units > store.completed_flags.shape[0]:
        raise StoreError(f"store at {url} holds {store.completed_flags.shape[0]} units, but the params ask for {num_units}; "
                         f"rerun the stage that trains it with these params")
    return store if num_units is None else store.limited(num_units)
