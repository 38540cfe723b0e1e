"""Word-level text for the paper profiles (MS COCO captions, FTRACE-TREx): lowercased words (runs
of letters and digits), the most frequent training words as the vocabulary, no download."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

WORD = re.compile(r"[a-z0-9]+")
PAD, UNKNOWN = 0, 1


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def frequent_vocabulary(texts: list[str], vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """The ``vocab_size - 2`` most frequent words of ``texts`` (ties alphabetically) with ids 2..,
    and those words in id order; id 0 pads and id 1 is every other word."""
    counts = Counter(w for t in texts for w in words(t))
    kept = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size - 2]
    return {w: i + 2 for i, w in enumerate(kept)}, kept


def tokenize(texts: list[str], vocabulary: dict[str, int], length: int) -> np.ndarray:
    """(n, length) int64 token ids: known words by ``vocabulary``, others 1, padding 0; longer texts are cut."""
    out = np.zeros((len(texts), length), np.int64)
    for r, text in enumerate(texts):
        ids = [vocabulary.get(w, UNKNOWN) for w in words(text)][:length]
        out[r, :len(ids)] = ids
    return out
