"""FTRACE-TREx (Akyürek et al., 2022) for a causal language model: stage fact_tracing at paper scale.
The user's own copy of the two JSON-lines files of the ``ekinakyurek/ftrace`` dataset, brought in
through ``data.dvc``; nothing is downloaded. ``fact_tracing.data.root`` holds::

    abstracts.jsonl   queries.jsonl

Each record has ``inputs_pretokenized`` (a sentence with the span ``<extra_id_0>`` masked) and
``targets_pretokenized`` (``<extra_id_0>`` then the span), as for mT5. For a causal model:

* an abstract's text is its input with the mask filled by the span; its *facts* are the
  ``predicate,object,subject`` triples of its ``facts`` field (``;``-separated);
* a query's prompt is its input up to the mask, its answer the span; its fact is
  (``predicate_id``, ``obj_uri``, ``sub_uri``), and its ground-truth **proponents** are the
  abstracts that state that fact.

Tokens (:mod:`datalens.core.text`): the ``vocab_size - 2`` most frequent words of the abstracts,
others one unknown id, 0 pads. Abstracts are cut to ``length`` tokens (targets: the next token).
A query is the prompt's last tokens, then its answer's tokens but the last, ``length`` in all; the
positions that predict the answer's tokens are scored (:class:`datalens.tasks.language.LanguageModelTask`
averages their margins).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datalens.core.data import Dataset
from datalens.core.facts import next_token_targets
from datalens.core.text import UNKNOWN, frequent_vocabulary, tokenize, words

FILES = ("abstracts.jsonl", "queries.jsonl")
MASK = "<extra_id_0>"


def missing_ftrace(root: str | Path) -> str | None:
    """Why FTRACE cannot load from ``root`` (one line), or None when both files are there."""
    absent = [str(path) for path in (Path(root) / f for f in FILES) if not path.exists()]
    return (f"FTRACE-TREx not found ({', '.join(absent)}): put your copy of the ekinakyurek/ftrace abstracts and queries "
            f"under {root} as JSON lines and track it with `dvc add`") if absent else None


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _span(record: dict) -> str:
    return record["targets_pretokenized"].replace(MASK, "").strip()


def read_ftrace(root: str | Path) -> tuple[list[str], list[str], list[str], list[tuple[int, ...]]]:
    """(abstract texts, query prompts, answers, each query's proponents (abstract indices))."""
    root = Path(root)
    missing = missing_ftrace(root)
    if missing:
        raise FileNotFoundError(missing)
    abstracts, queries = _records(root / FILES[0]), _records(root / FILES[1])
    texts = [a["inputs_pretokenized"].replace(MASK, _span(a)) for a in abstracts]
    stating: dict[str, list[int]] = {}
    for i, a in enumerate(abstracts):
        for fact in filter(None, a.get("facts", "").split(";")):
            stating.setdefault(fact.strip(), []).append(i)
    prompts = [q["inputs_pretokenized"].split(MASK)[0].strip() for q in queries]
    answers = [_span(q) for q in queries]
    proponents = [tuple(stating.get(f"{q['predicate_id']},{q['obj_uri']},{q['sub_uri']}", ())) for q in queries]
    return texts, prompts, answers, proponents


def query_tokens(prompt: list[int], answer: list[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """A query's inputs and targets (length,): the prompt's last tokens and the answer's but the last
    (an answer keeps at most ``length - 1`` tokens; an empty prompt or answer is one unknown word),
    the answer's tokens scored at the positions that predict them."""
    answer = (answer or [UNKNOWN])[:length - 1]
    context = ((prompt or [UNKNOWN]) + answer[:-1])[-length:]
    first = len(context) - len(answer)  # the position whose next token is the answer's first
    x, y = np.zeros(length, np.int64), np.zeros(length, np.int64)
    x[:len(context)] = context
    y[first:first + len(answer)] = answer
    return x, y


def load_ftrace(root: str | Path, vocab_size: int = 20000, length: int = 64) -> Dataset:
    """FTRACE-TREx as a language-model dataset (module docstring): x, y (n, length) for the
    abstracts, (q, length) for the queries."""
    texts, prompts, answers, _ = read_ftrace(root)
    vocabulary, kept = frequent_vocabulary(texts, vocab_size)
    x_train = tokenize(texts, vocabulary, length)
    ids = lambda text: [vocabulary.get(w, UNKNOWN) for w in words(text)]  # noqa: E731
    queries = [query_tokens(ids(p), ids(a), length) for p, a in zip(prompts, answers)]
    blank = lambda n: np.zeros((n, 1, 1), np.float32)  # noqa: E731  (text has no image for figures)
    return Dataset("ftrace", x_train, next_token_targets(x_train), np.stack([q[0] for q in queries]), np.stack([q[1] for q in queries]),
                   len(kept) + 2, ("<pad>", "<unk>", *kept), blank(len(texts)), blank(len(queries)))


def ftrace(root: str | Path = "data/ftrace") -> Dataset:
    """``fact_tracing.data.dataset: datalens.core.ftrace:ftrace``: :func:`load_ftrace` at its defaults."""
    return load_ftrace(root)


def ftrace_proponents(root: str | Path = "data/ftrace") -> list[tuple[int, ...]]:
    """Per query, the abstracts that state its fact."""
    return read_ftrace(root)[3]


# what the configuration check names before any work, the sizes its rules use until the files are
# there, and the ground truth retrieval is scored against
ftrace.missing = missing_ftrace
ftrace.published_sizes = (1_560_453, 31_479)  # abstracts and queries, as the dataset card lists them
ftrace.proponents = ftrace_proponents
