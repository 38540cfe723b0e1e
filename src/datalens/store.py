"""The results store: one zarr group per run of subset models.

Layout (N models, n train examples, t test examples, B models per block)::

    masks          (N, n) bool     chunks (B, n)
    test_margins   (N, t) float32  chunks (B, t)
    train_margins  (N, n) float32  chunks (B, n)
    test_accuracy  (N,)   float32  chunks (B,)     argmax accuracy on the test set
    completed      (N,)   bool     chunks (B,)
    checkpoints    (K, P) float32  chunks (1, P)   weights of models 0..K-1 (flattened state dicts)

Chunks align with blocks, so each block job writes whole chunks that no other job
touches: writes are idempotent and workers never race. A block's ``completed``
flags are written only after its data arrays are written, so a crash leaves the
block incomplete and a rerun recomputes it. The group's ``attrs['identity']``
holds the params that determine the results; reopening under different ones is
refused. ``url`` may be any path or URL that zarr and fsspec open (``s3://...``,
``memory://...``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

FORMAT_VERSION = 2
DATA_ARRAYS = ("masks", "test_margins", "train_margins", "test_accuracy")


class StoreError(RuntimeError):
    """The store is corrupted, or was made under other params."""


@dataclass(frozen=True)
class StoreShape:
    num_models: int
    n_train: int
    n_test: int
    block_size: int
    num_checkpoints: int = 0
    num_params: int = 0


class SubsetStore:
    """A zarr group of per-model results; see the module docstring for the layout."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        try:
            self.identity: dict[str, Any] = dict(group.attrs["identity"])
            self.block_size = int(group.attrs["block_size"])
            self.arrays = {name: group[name] for name in (*DATA_ARRAYS, "completed")}
        except KeyError as exc:
            raise StoreError(
                f"store at {url} is corrupted or not a datalens store (missing {exc}); "
                "move it aside or delete it, then rerun"
            ) from None
        self.num_models = self.arrays["completed"].shape[0]

    # -- creation -------------------------------------------------------------
    @classmethod
    def open(cls, url: str, identity: dict[str, Any], shape: StoreShape) -> "SubsetStore":
        """Open the store at ``url`` for a run with ``identity`` params, creating it if
        absent and growing it if ``shape.num_models`` is larger than what it holds.

        Raises :class:`StoreError` naming the first param that differs.
        """
        identity = _jsonable(identity)
        try:
            group = zarr.open_group(url, mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None
        except Exception as exc:
            raise StoreError(f"store at {url} cannot be opened ({exc}); move it aside or delete it, then rerun") from None
        if group is None:
            return cls._create(url, identity, shape)
        store = cls(group, url)
        store.check_identity(identity)
        if store.block_size != shape.block_size:
            raise StoreError(
                f"store at {url} was written with train.block_size={store.block_size}, now {shape.block_size}; "
                "block size fixes the chunk layout, so keep it or use a new store"
            )
        if shape.num_models > store.num_models:
            store._grow(shape.num_models)
        return store

    @classmethod
    def _create(cls, url: str, identity: dict, s: StoreShape) -> "SubsetStore":
        group = zarr.open_group(url, mode="w")
        b = s.block_size
        group.create_array("masks", shape=(s.num_models, s.n_train), chunks=(b, s.n_train), dtype="bool", fill_value=False)
        for name, width in (("test_margins", s.n_test), ("train_margins", s.n_train)):
            group.create_array(name, shape=(s.num_models, width), chunks=(b, width), dtype="float32", fill_value=np.nan)
        group.create_array("test_accuracy", shape=(s.num_models,), chunks=(b,), dtype="float32", fill_value=np.nan)
        group.create_array("completed", shape=(s.num_models,), chunks=(b,), dtype="bool", fill_value=False)
        if s.num_checkpoints:
            group.create_array("checkpoints", shape=(s.num_checkpoints, s.num_params), chunks=(1, s.num_params), dtype="float32", fill_value=np.nan)
        group.attrs.update({"identity": identity, "block_size": b, "format_version": FORMAT_VERSION, "num_checkpoints": s.num_checkpoints})
        return cls(group, url)

    def check_identity(self, identity: dict[str, Any]) -> None:
        identity = _jsonable(identity)
        for key in sorted(set(identity) | set(self.identity)):
            old, new = self.identity.get(key, "<absent>"), identity.get(key, "<absent>")
            if old != new:
                raise StoreError(
                    f"store at {self.url} was made with {key}={old!r}, but the params now say {key}={new!r}. "
                    f"Set {key} back, or point the run at a new store (or delete this one) to start over."
                )

    def _grow(self, num_models: int) -> None:
        for name, arr in self.arrays.items():
            arr.resize((num_models, *arr.shape[1:]))
        self.num_models = num_models

    # -- blocks ---------------------------------------------------------------
    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_models)

    @property
    def num_blocks(self) -> int:
        return -(-self.num_models // self.block_size)

    def completed(self) -> np.ndarray:
        """(N,) bool: which models are done."""
        return np.asarray(self.arrays["completed"][:])

    def missing_blocks(self) -> list[int]:
        done = self.completed()
        return [b for b in range(self.num_blocks) if not done[slice(*self.block_range(b))].all()]

    def write_block(self, block: int, results: dict[str, np.ndarray], checkpoints: dict[int, np.ndarray] | None = None) -> None:
        """Write one block's arrays, then its checkpoints, then (last) its completed flags."""
        start, stop = self.block_range(block)
        for name in DATA_ARRAYS:
            value = np.asarray(results[name])
            if value.shape[0] != stop - start:
                raise ValueError(f"block {block} result '{name}' has {value.shape[0]} rows, expected {stop - start}")
            self.arrays[name][start:stop] = value
        for index, vector in (checkpoints or {}).items():
            self.group["checkpoints"][index] = vector
        self.arrays["completed"][start:stop] = True

    # -- reading --------------------------------------------------------------
    def read(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Rows of a data array; ``rows=None`` reads the completed models only."""
        if rows is None:
            rows = np.flatnonzero(self.completed())
        arr = self.arrays[name] if name in self.arrays else self.group[name]
        if isinstance(rows, slice):
            return np.asarray(arr[rows])
        return np.asarray(arr.get_orthogonal_selection((np.asarray(rows),)))

    def checkpoint(self, index: int) -> np.ndarray:
        if index >= int(self.group.attrs.get("num_checkpoints", 0)):
            raise IndexError(f"model {index} has no checkpoint; the run saved train.num_checkpoints={self.group.attrs.get('num_checkpoints', 0)}")
        vec = np.asarray(self.group["checkpoints"][index])
        if np.isnan(vec).any():
            raise StoreError(f"checkpoint of model {index} in {self.url} is not written yet")
        return vec


def open_existing(url: str, mode: str = "r") -> SubsetStore:
    """Open a finished or partial store (``mode="r+"`` to write blocks into it)."""
    try:
        group = zarr.open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise FileNotFoundError(f"no store at {url}; run the stage that creates it first") from None
    return SubsetStore(group, url)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
