"""MS COCO captions as image-caption pairs: the CLIP stage at paper scale (Lin et al., 2014; the
TRAK paper's CLIP case). The user's own copy, brought in through ``data.dvc``; nothing is
downloaded. ``clip.data.root`` holds the COCO 2017 layout::

    annotations/captions_train2017.json   annotations/captions_val2017.json
    train2017/<file_name>                 val2017/<file_name>

Each image keeps its first caption (the lowest annotation id), so a pair is one image and one
caption. Images are resized to ``size`` x ``size`` (bilinear), scaled to [0, 1] and standardised
per channel on the training images. Captions are lowercased words (:mod:`datalens.core.text`):
the ``vocab_size - 2`` most frequent training words (ties alphabetically) get ids 2..; every
other word is id 1 (unknown); id 0 pads to ``length`` tokens, and longer captions are cut. The
targets are (n, length + NEGATIVES): the tokens, then the pair's negatives, drawn uniformly and
seeded from the validation pairs (the pool), as for the digits (:mod:`datalens.core.captions`).

``clip.data.dataset: datalens.core.coco:coco_captions`` takes the defaults below; another size
is a function of your own calling :func:`load_coco` (by import path, ``path/to/file.py:function``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datalens.core.captions import CAPTION_SEED, NEGATIVES, negative_indices
from datalens.core.data import Dataset
from datalens.core.text import frequent_vocabulary, tokenize

SPLITS = {"train": "train2017", "val": "val2017"}


def _annotation_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"captions_{SPLITS[split]}.json"


def missing_coco(root: str | Path) -> str | None:
    """Why COCO cannot load from ``root`` (one line), or None when both caption files are there."""
    absent = [str(path) for path in (_annotation_file(Path(root), s) for s in SPLITS) if not path.exists()]
    return (f"MS COCO captions not found ({', '.join(absent)}): put your copy of the COCO 2017 captions and images under "
            f"{root} (annotations/, train2017/, val2017/) and track it with `dvc add`") if absent else None


def _pairs(root: Path, split: str) -> tuple[list[Path], list[str]]:
    """Image paths and each image's first caption, in image-id order."""
    meta = json.loads(_annotation_file(root, split).read_text())
    first: dict[int, tuple[int, str]] = {}
    for a in meta["annotations"]:
        if a["image_id"] not in first or a["id"] < first[a["image_id"]][0]:
            first[a["image_id"]] = (a["id"], a["caption"])
    files = {im["id"]: im["file_name"] for im in meta["images"]}
    ids = sorted(i for i in files if i in first)
    return [root / SPLITS[split] / files[i] for i in ids], [first[i][1] for i in ids]


def _images(paths: list[Path], size: int) -> np.ndarray:
    """(n, size, size, 3) float32 in [0, 1]."""
    out = np.empty((len(paths), size, size, 3), np.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return out


def load_coco(root: str | Path, size: int = 64, vocab_size: int = 5000, length: int = 24) -> Dataset:
    """COCO 2017 pairs (module docstring): x (n, 3, size, size) standardised; y (n, length + NEGATIVES)."""
    root = Path(root)
    missing = missing_coco(root)
    if missing:
        raise FileNotFoundError(missing)
    (train_paths, train_caps), (val_paths, val_caps) = _pairs(root, "train"), _pairs(root, "val")
    vocabulary, words = frequent_vocabulary(train_caps, vocab_size)
    img_tr, img_te = _images(train_paths, size), _images(val_paths, size)
    mean, std = img_tr.mean((0, 1, 2)), img_tr.std((0, 1, 2)) + 1e-6
    x_tr, x_te = ((img - mean) / std for img in (img_tr, img_te))
    neg_tr = negative_indices(len(train_caps), len(val_caps), NEGATIVES, CAPTION_SEED)
    neg_te = negative_indices(len(val_caps), len(val_caps), NEGATIVES, CAPTION_SEED + 1, own=np.arange(len(val_caps)))
    y_tr = np.concatenate([tokenize(train_caps, vocabulary, length), neg_tr], 1)
    y_te = np.concatenate([tokenize(val_caps, vocabulary, length), neg_te], 1)
    return Dataset("coco_captions", x_tr.transpose(0, 3, 1, 2).copy(), y_tr, x_te.transpose(0, 3, 1, 2).copy(), y_te,
                   len(words) + 2, ("<pad>", "<unk>", *words), img_tr, img_te)


def coco_captions(root: str | Path = "data/coco") -> Dataset:
    """``clip.data.dataset: datalens.core.coco:coco_captions``: :func:`load_coco` at its defaults."""
    return load_coco(root)


# what the configuration check names before any work, and the sizes its rules use until the files are there
coco_captions.missing = missing_coco
coco_captions.published_sizes = (118_287, 5_000)  # COCO 2017 train and val images, every one captioned
