"""Datasets by name, or by import path (your own data).

``digits``: scikit-learn's embedded 8x8 handwritten digits (ships with
scikit-learn, so no download), a fixed stratified 1347/450 split, features
standardised with training statistics.

``cifar10`` / ``cifar2`` (cat vs dog): read from the official CIFAR-10 python
tarball ``<root>/cifar-10-python.tar.gz``, which ``data.dvc`` tracks as an
import of the official URL.

Your own data: ``data.dataset: package.module:function`` or ``path/to/file.py:function``
(relative to the repo root) names a function ``f(root) -> Dataset`` (see
:meth:`Dataset.from_arrays`); docs/using-your-own-model.md.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import pickle
import sys
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits as sk_digits
from sklearn.model_selection import train_test_split

CIFAR_TARBALL = "cifar-10-python.tar.gz"
CIFAR_FETCH_COMMAND = "dvc update data.dvc"
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


@dataclass(frozen=True)
class Dataset:
    """A train/test split held in memory.

    x_train: (n_train, *input_shape) float32; y_train: (n_train,) int64;
    x_test: (n_test, *input_shape) float32; y_test: (n_test,) int64.
    ``images_*`` are the same examples as displayable images (n, H, W) or (n, H, W, 3) in [0, 1].
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    images_train: np.ndarray
    images_test: np.ndarray
    planted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # training examples given a patch
    planted_test: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # test examples given it

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    @classmethod
    def from_arrays(cls, name: str, x_train, y_train, x_test, y_test, num_classes: int | None = None,
                    class_names=None, images_train=None, images_test=None) -> "Dataset":
        """A dataset from arrays: inputs (n, ...) float32, targets (n, ...) (labels for
        classification). Images for figures default to the inputs seen as images: (n, H, W)
        or (n, C, H, W) inputs as they are (min-max scaled), anything else as a one-row strip."""
        x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
        y_train, y_test = np.asarray(y_train), np.asarray(y_test)
        if y_train.dtype.kind in "iub":
            y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
        if num_classes is None:
            num_classes = int(max(y_train.max(), y_test.max()) + 1) if y_train.dtype == np.int64 else 0
        class_names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
        return cls(name, x_train, y_train, x_test, y_test, num_classes, class_names,
                   _as_images(x_train) if images_train is None else np.asarray(images_train, np.float32),
                   _as_images(x_test) if images_test is None else np.asarray(images_test, np.float32))

    @functools.cached_property
    def _content_hash(self) -> str:
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_test, self.y_test):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    def content_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the training and test inputs and targets: part of every
        store's identity, so editing a dataset never silently reuses models trained on the old one.
        Computed once per dataset object (its arrays are never modified in place)."""
        return self._content_hash

    def tensors(self, device="cpu"):
        """(x_train, y_train, x_test, y_test) as torch tensors on ``device``."""
        return tuple(torch.as_tensor(a, device=device) for a in (self.x_train, self.y_train, self.x_test, self.y_test))


def load_digits() -> Dataset:
    bunch = sk_digits()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=450, stratify=y, random_state=0)
    idx_train.sort()
    idx_test.sort()
    mean = x[idx_train].mean(0)
    std = x[idx_train].std(0)
    std[std == 0] = 1.0  # constant border pixels
    xs = (x - mean) / std
    images = bunch.images.astype(np.float32) / 16.0
    return Dataset(
        "digits", xs[idx_train], y[idx_train], xs[idx_test], y[idx_test], 10,
        tuple(str(i) for i in range(10)), images[idx_train], images[idx_test],
    )


def _read_cifar_tarball(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Read the official python tarball: uint8 images (n, 32, 32, 3) and labels."""
    train_x, train_y, test_x, test_y, names = [], [], [], [], None
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            base = Path(member.name).name
            if not member.isfile() or not (base.startswith("data_batch_") or base in ("test_batch", "batches.meta")):
                continue
            blob = pickle.load(tar.extractfile(member), encoding="bytes")
            if base == "batches.meta":
                names = [n.decode() for n in blob[b"label_names"]]
                continue
            images = np.asarray(blob[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.asarray(blob[b"labels"], dtype=np.int64)
            (test_x if base == "test_batch" else train_x).append(images)
            (test_y if base == "test_batch" else train_y).append(labels)
    if not train_x or not test_x or names is None:
        raise ValueError(f"{path} is not the CIFAR-10 python tarball (missing data_batch_*, test_batch or batches.meta)")
    return np.concatenate(train_x), np.concatenate(train_y), np.concatenate(test_x), np.concatenate(test_y), names


def missing_data_message(path: Path) -> str:
    return (f"CIFAR-10 tarball not found at {path}. Fetch it once with `{CIFAR_FETCH_COMMAND}` "
            f"(needs network; 170,498,071 bytes), or set data.root to the folder that holds {CIFAR_TARBALL}.")


def missing_data(name: str, root: str | Path, repo: str | Path = ".") -> str | None:
    """Why dataset ``name`` cannot load from ``root`` (one line), or None when its files are there;
    only the datasets that need files can miss: CIFAR, and a dataset function (by import path)
    that carries ``missing(root) -> str | None`` (e.g. :func:`datalens.core.coco.coco_captions`)."""
    if ":" in name:
        check = getattr(resolve_callable(name, "data.dataset", repo), "missing", None)
        return check(root) if check else None
    path = Path(root) / CIFAR_TARBALL
    return missing_data_message(path) if name in PUBLISHED_SIZES and not path.exists() else None


def load_cifar(root: str | Path = "data", classes: tuple[int, ...] | None = None) -> Dataset:
    """CIFAR-10, or the subset of ``classes`` relabelled 0..len(classes)-1 (cifar2 = cat, dog)."""
    path = Path(root) / CIFAR_TARBALL
    if not path.exists():
        raise FileNotFoundError(missing_data_message(path))
    xtr, ytr, xte, yte, names = _read_cifar_tarball(path)
    if classes is not None:
        keep_tr, keep_te = np.isin(ytr, classes), np.isin(yte, classes)
        remap = {c: i for i, c in enumerate(classes)}
        xtr, xte = xtr[keep_tr], xte[keep_te]
        ytr = np.array([remap[c] for c in ytr[keep_tr]], dtype=np.int64)
        yte = np.array([remap[c] for c in yte[keep_te]], dtype=np.int64)
        names = [names[c] for c in classes]

    def norm(img: np.ndarray) -> np.ndarray:
        return ((img.astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2).copy()

    return Dataset(
        "cifar10" if classes is None else "cifar2", norm(xtr), ytr, norm(xte), yte, len(names), tuple(names),
        xtr.astype(np.float32) / 255.0, xte.astype(np.float32) / 255.0,
    )


def _as_images(x: np.ndarray) -> np.ndarray:
    """Inputs as displayable images in [0, 1]: (n, H, W) or (n, C, H, W) kept (channels last), else a strip."""
    img = x.reshape(len(x), 1, -1) if x.ndim not in (3, 4) else (x.transpose(0, 2, 3, 1) if x.ndim == 4 else x)
    if img.ndim == 4 and img.shape[-1] == 1:
        img = img[..., 0]
    lo, hi = float(img.min(initial=0.0)), float(img.max(initial=1.0))
    return ((img - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


DATASETS = {
    "digits": lambda root: load_digits(),
    "cifar10": lambda root: load_cifar(root),
    "cifar2": lambda root: load_cifar(root, classes=(3, 5)),
}
# The published CIFAR sizes: what params are checked against before the tarball is fetched
# (`dvc update data.dvc`); once it is there, and for every other dataset, sizes come from the data.
PUBLISHED_SIZES = {"cifar10": (50000, 10000), "cifar2": (10000, 2000)}


def resolve_callable(spec: str, key: str, root: str | Path = ".") -> Callable:
    """The function an import path names: ``package.module:function``, or
    ``path/to/file.py:function`` (relative to ``root``, the repo). Raises ValueError naming ``key``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{key}={spec!r} is not allowed; it must be a registered name or an import path "
                         "'package.module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name) if Path(module_name).is_absolute() else Path(root) / module_name
            if not path.exists():
                raise ValueError(f"{key}={spec!r} is not allowed; no file {path}")
            name = f"datalens_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module  # so workers and pickling find it again
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why, in one line
        raise ValueError(f"{key}={spec!r} is not allowed; importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key}={spec!r} is not allowed; {module_name} has no function {attr!r}")
    return fn


@functools.lru_cache(maxsize=16)
def dataset_sizes(name: str, root: str | Path = "data", repo: str | Path = ".") -> tuple[int, int]:
    """(n_train, n_test) of a dataset by name or import path, from its data (loaded once per
    process); CIFAR before its tarball is fetched, or a dataset function with ``published_sizes``
    before its files are there: the published sizes."""
    if name in PUBLISHED_SIZES and not (Path(root) / CIFAR_TARBALL).exists():
        return PUBLISHED_SIZES[name]
    if ":" in name:  # a dataset function whose files are absent may say its published sizes
        fn = resolve_callable(name, "data.dataset", repo)
        if getattr(fn, "published_sizes", None) and fn.missing(root):
            return fn.published_sizes
    ds = load_dataset(name, root, repo=repo)
    return ds.n_train, ds.n_test


def _image_view(x: np.ndarray) -> np.ndarray:
    """Model inputs (n, *input_shape) seen as images (n, C, H, W): flat square inputs are one channel."""
    if x.ndim == 4:
        return x
    side = int(round(np.sqrt(x.shape[1])))
    if x.ndim != 2 or side * side != x.shape[1]:
        raise ValueError(f"inputs of shape {x.shape[1:]} are not images; a patch needs square images")
    return x.reshape(len(x), 1, side, side)


def stamp(x: np.ndarray, size: int, row: int, col: int, value: float) -> np.ndarray:
    """A copy of inputs (n, *input_shape) with a size x size square set to ``value`` (in the
    model's input units: standardised for digits, normalised for CIFAR) at (row, col), every channel."""
    out = x.copy()
    view = _image_view(out)
    h, w = view.shape[2:]
    if not (0 <= row <= h - size and 0 <= col <= w - size and size >= 1):
        raise ValueError(f"a {size}x{size} patch at ({row}, {col}) does not fit {h}x{w} images")
    view[:, :, row:row + size, col:col + size] = value
    return out


def _stamp_images(images: np.ndarray, size: int, row: int, col: int) -> np.ndarray:
    out = images.copy()
    out[:, row:row + size, col:col + size] = 1.0  # drawn saturated, whatever its input value
    return out


def plant_patch(ds: Dataset, label: int, count: int, test_count: int, size: int, row: int, col: int, value: float,
                seed: int = 0) -> Dataset:
    """The dataset with a patch stamped on ``count`` training images and ``test_count`` test images
    of class ``label`` (chosen by ``seed``): a planted feature of the data distribution whose
    training examples are known (``Dataset.planted``)."""
    pool, test_pool = np.flatnonzero(ds.y_train == label), np.flatnonzero(ds.y_test == label)
    if not 0 <= label < ds.num_classes or not 1 <= count <= len(pool) or not 0 <= test_count <= len(test_pool):
        raise ValueError(f"cannot plant a patch on {count} training and {test_count} test images of class {label} "
                         f"({len(pool)} and {len(test_pool)} exist; classes 0..{ds.num_classes - 1})")
    rng = np.random.default_rng([seed, 31])
    idx, test_idx = np.sort(rng.choice(pool, count, replace=False)), np.sort(rng.choice(test_pool, test_count, replace=False))
    x_train, images, x_test, images_test = ds.x_train.copy(), ds.images_train.copy(), ds.x_test.copy(), ds.images_test.copy()
    x_train[idx] = stamp(ds.x_train[idx], size, row, col, value)
    images[idx] = _stamp_images(ds.images_train[idx], size, row, col)
    x_test[test_idx] = stamp(ds.x_test[test_idx], size, row, col, value)
    images_test[test_idx] = _stamp_images(ds.images_test[test_idx], size, row, col)
    return replace(ds, x_train=x_train, images_train=images, x_test=x_test, images_test=images_test, planted=idx,
                   planted_test=test_idx)


def blank_region(ds: Dataset, size: int, row: int, col: int) -> Dataset:
    """Preprocessing that blanks a size x size region of every input, training and test, to 0 (the
    training mean after standardisation): a model trained on it cannot see that region."""
    return replace(ds, x_train=stamp(ds.x_train, size, row, col, 0.0), x_test=stamp(ds.x_test, size, row, col, 0.0))


def load_dataset(name: str, root: str | Path = "data", patch: dict | None = None, blank: dict | None = None,
                 repo: str | Path = ".", generated: str | None = None) -> Dataset:
    """Load a dataset by registered name (see :data:`DATASETS`) or import path (a function
    ``f(root) -> Dataset``, resolved against ``repo``), with a planted ``patch`` (keyword
    arguments of :func:`plant_patch`) and then a ``blank`` preprocessing (of
    :func:`blank_region`) when given. ``generated``: a .npy of generated inputs appended to the
    test split, with the targets the dataset function's ``generated_targets(count)`` gives them
    (and shown as its ``as_images(x)`` makes them, else min-max scaled)."""
    if name in DATASETS:
        ds = DATASETS[name](root)
    elif ":" in name:
        ds = resolve_callable(name, "data.dataset", repo)(root)
        if not isinstance(ds, Dataset):
            raise ValueError(f"data.dataset={name!r} returned {type(ds).__name__}, not a datalens Dataset "
                             "(build one with Dataset.from_arrays)")
    else:
        raise ValueError(f"data.dataset={name!r} is unknown; allowed values: {', '.join(DATASETS)}, or an import path "
                         "'package.module:function' or 'path/to/file.py:function'")
    if patch:
        ds = plant_patch(ds, **patch)
    if blank:
        ds = blank_region(ds, **blank)
    if generated:
        fn = resolve_callable(name, "data.dataset", repo) if ":" in name else None
        targets, as_images = getattr(fn, "generated_targets", None), getattr(fn, "as_images", _as_images)
        if targets is None:
            raise ValueError(f"data.dataset={name!r} gives no `generated_targets(count)`, so generated samples cannot join its test split")
        x = np.load(generated)
        ds = replace(ds, x_test=np.concatenate([ds.x_test, x]).astype(np.float32), y_test=np.concatenate([ds.y_test, targets(len(x))]),
                     images_test=np.concatenate([ds.images_test, as_images(x)]))
    return ds
