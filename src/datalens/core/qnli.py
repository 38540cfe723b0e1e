"""QNLI (Wang et al., 2019, GLUE; from SQuAD) for a sentence-pair classifier: stage
text_classification at paper scale. The user's own copy of GLUE's QNLI folder, brought in through
``data.dvc``; nothing is downloaded. ``text_classification.data.root`` holds::

    train.tsv   dev.tsv

tab-separated with a header ``index question sentence label``, label ``entailment`` (the sentence
answers the question: class 1, ``answered``) or ``not_entailment`` (class 0). GLUE's test split
has no labels, so the dev split is the test set, as in the TRAK paper.

Tokens (:mod:`datalens.core.text`): the ``vocab_size - 3`` most frequent words of the training
questions and sentences with ids 2.., others one unknown id (1), 0 pads, and ``vocab_size - 1``
separates the question from the sentence. A pair is the question's first ``length // 2`` tokens,
the separator, then the sentence, cut to ``length``.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from datalens.core.data import Dataset
from datalens.core.text import UNKNOWN, frequent_vocabulary, words

FILES = ("train.tsv", "dev.tsv")
LABELS = {"not_entailment": 0, "entailment": 1}


def missing_qnli(root: str | Path) -> str | None:
    """Why QNLI cannot load from ``root`` (one line), or None when both files are there."""
    absent = [str(path) for path in (Path(root) / f for f in FILES) if not path.exists()]
    return (f"QNLI not found ({', '.join(absent)}): put your copy of GLUE's QNLI train.tsv and dev.tsv under {root} "
            f"and track it with `dvc add`") if absent else None


def read_qnli(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(questions, sentences, labels (n,) int64) of one QNLI file; a label outside
    ``entailment``/``not_entailment`` is an error naming its line."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    bad = [i + 2 for i, r in enumerate(rows) if r.get("label") not in LABELS]
    if bad:
        raise ValueError(f"{path}: line {bad[0]} has label {rows[bad[0] - 2].get('label')!r}; allowed: {', '.join(LABELS)}")
    return [r["question"] for r in rows], [r["sentence"] for r in rows], np.array([LABELS[r["label"]] for r in rows], np.int64)


def pair_tokens(questions: list[str], sentences: list[str], vocabulary: dict[str, int], separator: int, length: int) -> np.ndarray:
    """(n, length) int64: the question's first ``length // 2`` token ids, ``separator``, then the sentence's, cut to ``length``."""
    out = np.zeros((len(questions), length), np.int64)
    for r, (q, s) in enumerate(zip(questions, sentences)):
        ids = lambda text: [vocabulary.get(w, UNKNOWN) for w in words(text)]  # noqa: E731
        row = (ids(q)[:length // 2] + [separator] + ids(s))[:length]
        out[r, :len(row)] = row
    return out


def load_qnli(root: str | Path, vocab_size: int = 30000, length: int = 128) -> Dataset:
    """QNLI as a classification dataset of token pairs (module docstring): x (n, length), y (n,)."""
    root = Path(root)
    missing = missing_qnli(root)
    if missing:
        raise FileNotFoundError(missing)
    (q_train, s_train, y_train), (q_test, s_test, y_test) = (read_qnli(root / f) for f in FILES)
    vocabulary, _ = frequent_vocabulary(q_train + s_train, vocab_size - 1)  # ids 2 .. vocab_size - 2
    encode = lambda q, s: pair_tokens(q, s, vocabulary, vocab_size - 1, length)  # noqa: E731
    blank = lambda n: np.zeros((n, 1, 1), np.float32)  # noqa: E731  (text has no image for figures)
    return Dataset("qnli", encode(q_train, s_train), y_train, encode(q_test, s_test), y_test, 2, ("not_answered", "answered"),
                   blank(len(y_train)), blank(len(y_test)))


def qnli(root: str | Path = "data/qnli") -> Dataset:
    """``text_classification.data.dataset: datalens.core.qnli:qnli``: :func:`load_qnli` at its defaults."""
    return load_qnli(root)


def qnli_texts(root: str | Path = "data/qnli") -> tuple[list[str], list[str]]:
    """The training and dev pairs as "question | sentence", for the figures."""
    (q_train, s_train, _), (q_test, s_test, _) = (read_qnli(Path(root) / f) for f in FILES)
    return [f"{q} | {s}" for q, s in zip(q_train, s_train)], [f"{q} | {s}" for q, s in zip(q_test, s_test)]


# what the configuration check names before any work, the sizes its rules use until the files are
# there, and the texts the figures show
qnli.missing = missing_qnli
qnli.published_sizes = (104_743, 5_463)  # training and dev pairs, as GLUE lists them
qnli.texts = qnli_texts
