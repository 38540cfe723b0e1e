"""Image-caption pairs from scikit-learn's digits, for the contrastive (CLIP-like) model.

Each 8 x 8 image gets a short caption rendered from its label and three attributes measured
from its pixels, each cut into three levels at the training images' tertiles:

* *ink*: total intensity (light, medium, heavy strokes);
* *slant*: the covariance of an inked pixel's column with its row (leaning left, upright,
  leaning right);
* *width*: the number of columns with ink (narrow, regular, wide).

A seeded template per example decides which of them the caption names and in what words, so
the two sides carry different information: the image has every pixel, the caption a coarse
summary of some attributes plus the choice of wording, and no caption names all of them in
the same way. Captions are tokenised by a word-level :class:`Vocabulary` (id 0 pads).

:func:`digit_captions` is the dataset (``data.dataset: datalens.core.captions:digit_captions``):
the digits' split and inputs, with targets (n, L + NEGATIVES) = a caption's tokens, then the
indices of its negatives in the pool, the test pairs (drawn uniformly, seeded, never the pair
itself; ``datalens.tasks.contrastive``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datalens.core.data import Dataset, load_digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LEVELS = {"ink": ("light", "medium", "heavy"), "slant": ("leaning left", "upright", "leaning right"),
          "width": ("narrow", "regular", "wide")}
TEMPLATES = (
    "a {ink} {digit}",
    "a {width} {digit} {slant}",
    "the digit {digit} written {slant}",
    "{ink} strokes of a {digit}",
    "a {width} handwritten {digit}",
    "a {digit} , {ink} and {width}",
    "handwritten {digit} {slant} in {ink} ink",
)


def attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """Ink, slant and width of images (n, 8, 8) (or (n, 64)), each (n,) float."""
    img = np.asarray(images, dtype=np.float64).reshape(len(images), 8, 8)
    rows, cols = np.mgrid[0:8, 0:8]
    ink = img.sum((1, 2))
    w = img / np.maximum(ink[:, None, None], 1e-12)
    mean_r, mean_c = (w * rows).sum((1, 2)), (w * cols).sum((1, 2))
    # a stroke that leans right has columns growing as rows go up (row index down): covariance < 0
    slant = -(w * (rows - mean_r[:, None, None]) * (cols - mean_c[:, None, None])).sum((1, 2))
    width = (img.max(1) > 4).sum(1).astype(float)
    return {"ink": ink, "slant": slant, "width": width}


def levels(values: dict[str, np.ndarray], cuts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each attribute's level 0, 1 or 2 against its two ``cuts`` (the training tertiles)."""
    return {k: np.searchsorted(cuts[k], v, side="right") for k, v in values.items()}


def tertiles(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.quantile(v, [1 / 3, 2 / 3]) for k, v in values.items()}


def captions(labels: np.ndarray, level: dict[str, np.ndarray], seed: int) -> list[str]:
    """One caption per example: template ``rng.integers`` (seeded) filled with its label and levels."""
    pick = np.random.default_rng([seed, 31]).integers(len(TEMPLATES), size=len(labels))
    return [TEMPLATES[pick[i]].format(digit=DIGIT_WORDS[int(labels[i])],
                                      **{k: LEVELS[k][int(level[k][i])] for k in LEVELS}) for i in range(len(labels))]


@dataclass(frozen=True)
class Vocabulary:
    """Word-level tokens: ``words[i - 1]`` has id i; 0 pads a caption to ``length``."""

    words: tuple[str, ...]
    length: int

    @classmethod
    def of(cls, texts: list[str]) -> "Vocabulary":
        return cls(tuple(sorted({w for t in texts for w in t.split()})), max(len(t.split()) for t in texts))

    @property
    def size(self) -> int:
        return len(self.words) + 1

    def encode(self, texts: list[str]) -> np.ndarray:
        """Token ids (len(texts), length) int64; a word outside the vocabulary is an error naming it."""
        index = {w: i + 1 for i, w in enumerate(self.words)}
        out = np.zeros((len(texts), self.length), dtype=np.int64)
        for r, t in enumerate(texts):
            words = t.split()
            unknown = [w for w in words if w not in index]
            if unknown or len(words) > self.length:
                raise ValueError(f"caption {t!r}: {'unknown words ' + str(unknown) if unknown else 'longer than ' + str(self.length)}")
            out[r, :len(words)] = [index[w] for w in words]
        return out

    def decode(self, tokens: np.ndarray) -> str:
        return " ".join(self.words[i - 1] for i in np.asarray(tokens) if i > 0)


def digit_pairs(images_train: np.ndarray, labels_train: np.ndarray, images_test: np.ndarray, labels_test: np.ndarray,
                seed: int) -> tuple[np.ndarray, np.ndarray, Vocabulary, list[str], list[str]]:
    """Captions and tokens for a train / test split of the digits: (tokens_train (n, L), tokens_test
    (t, L), vocabulary, captions_train, captions_test). Levels are cut at the training tertiles."""
    measured = attributes(images_train)
    cuts = tertiles(measured)
    train = captions(labels_train, levels(measured, cuts), seed)
    test = captions(labels_test, levels(attributes(images_test), cuts), seed + 1)
    vocab = Vocabulary.of(train + test)
    return vocab.encode(train), vocab.encode(test), vocab, train, test


NEGATIVES = 15  # negatives per pair in the attributed output (and the measurement)
CAPTION_SEED = 0


def negative_indices(num_targets: int, pool_size: int, num_negatives: int, seed: int,
                     own: np.ndarray | None = None) -> np.ndarray:
    """(num_targets, num_negatives) distinct pool indices per target, drawn uniformly (every
    index has the same chance; a target's ``own`` pool index, where it is in the pool, never)."""
    if num_negatives > pool_size - (own is not None):
        raise ValueError(f"num_negatives={num_negatives} exceeds the pool of {pool_size} examples")
    keys = np.random.default_rng([seed, 37]).random((num_targets, pool_size))
    if own is not None:
        keys[np.arange(num_targets), own] = np.inf
    return np.argsort(keys, axis=1)[:, :num_negatives]


def digit_captions(root: str = "data") -> Dataset:
    """The digits as image-caption pairs (module docstring). x: the digits' standardised pixels;
    y (n, L + NEGATIVES) int64; its class count is the vocabulary size (token ids 1.. ; 0 pads)
    and its class names the pad and the words, by id."""
    d = load_digits()
    tok_tr, tok_te, vocab, _, _ = digit_pairs(d.images_train * 16, d.y_train, d.images_test * 16, d.y_test, CAPTION_SEED)
    neg_tr = negative_indices(d.n_train, d.n_test, NEGATIVES, CAPTION_SEED)
    neg_te = negative_indices(d.n_test, d.n_test, NEGATIVES, CAPTION_SEED + 1, own=np.arange(d.n_test))
    return Dataset("digit_captions", d.x_train, np.concatenate([tok_tr, neg_tr], 1), d.x_test, np.concatenate([tok_te, neg_te], 1),
                   vocab.size, ("<pad>", *vocab.words), d.images_train, d.images_test)
