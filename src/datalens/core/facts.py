"""A corpus of real facts for the language-model stages (issue 20; the TRAK paper's fact-tracing
case, Akyurek et al.'s FTRACE-TREx in miniature), built from ISO 3166-2 as the ``pycountry``
package ships it: no download.

A *fact* is "subdivision s lies in country c" for ``per_country`` first-level subdivisions of each
of ``num_countries`` countries (countries with at least that many, drawn with the seed; their
subdivisions too; a name two subdivisions share is left out, so a subject names one fact). Names become single tokens (lowercased, words joined by ``_``), so the answer
to a fact is one token. The training sentences are

* *statements*: each fact in 1 to 3 of :data:`STATEMENTS` (how many and which: seeded), the
  fact's ground-truth **proponents**;
* *distractors*: every subject's subdivision type (``s is a province .``: names s, not c) and
  every country's ISO code (``c has the code fra .``: names c, not s).

Each fact's *query* is :data:`QUERY` (``s is located in``), a wording no training sentence uses;
its answer is c. Sentences are shuffled with the seed. Tokens: :class:`datalens.core.captions.Vocabulary`.

*Question pairs* (the QNLI-like task of the text-classification stage, :func:`question_pairs`):
each of :data:`QUESTIONS` about a subject s ("which country is s in ?", "what kind of region is s ?")
beside each training sentence about s, labelled 1 when the sentence names what the question asks
(the country, or the subdivision type), else 0. Only sentences about the question's subject are
paired: a small encoder trained from scratch on a few hundred pairs does not learn to match names
across the pair (test accuracy 0.67 with another subject's sentences among the negatives, 0.98
without; issue 20's note), so the label is what the sentence says, not whom it names.

:func:`fact_tracing` is the dataset of the fact-tracing stage (``data.dataset:
datalens.core.facts:fact_tracing``): the training sentences and the queries as token sequences
for :class:`datalens.tasks.language.LanguageModelTask`.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pycountry

from datalens.core.captions import Vocabulary
from datalens.core.data import Dataset

STATEMENTS = ("{s} is a {kind} of {c} .", "{s} lies in {c} .", "the {kind} {s} belongs to {c} .")
DISTRACTORS = ("{s} is a {kind} .", "{c} has the code {code} .")
QUERY = "{s} is located in"
QUESTIONS = ("which country is {s} in ?", "what kind of region is {s} ?")
SEPARATOR = "|"


def token(name: str) -> str:
    """A name as one token: lowercased, its words (letters and digits, any script) joined by ``_``."""
    return "_".join(re.findall(r"\w+", name.lower()))


@dataclass(frozen=True)
class FactCorpus:
    """Training ``sentences`` (N,); per fact (F,): ``subjects``, ``answers`` (tokens), ``proponents``
    (indices of the sentences that state it) and ``queries`` (the prompt, without the answer)."""

    sentences: tuple[str, ...]
    subjects: tuple[str, ...]
    answers: tuple[str, ...]
    proponents: tuple[tuple[int, ...], ...]
    queries: tuple[str, ...]
    seed: int

    def vocabulary(self) -> Vocabulary:
        return Vocabulary.of(list(self.sentences) + [f"{q} {a}" for q, a in zip(self.queries, self.answers)])


def fact_corpus(num_countries: int = 12, per_country: int = 10, seed: int = 0) -> FactCorpus:
    """The corpus of the module docstring, the same for the same arguments and ``pycountry`` release."""
    rng = np.random.default_rng([seed, 41])
    firsts = [sub for sub in sorted(pycountry.subdivisions, key=lambda x: x.code) if sub.parent_code is None]
    names = [token(sub.name) for sub in firsts]
    count = Counter(names)
    top: dict[str, list] = {}
    for sub, name in zip(firsts, names):
        if count[name] == 1 and pycountry.countries.get(alpha_2=sub.country_code) is not None:  # a name of one fact only
            top.setdefault(sub.country_code, []).append(sub)
    eligible = sorted(c for c, subs in top.items() if len(subs) >= per_country)
    if len(eligible) < num_countries:
        raise ValueError(f"num_countries={num_countries}: only {len(eligible)} countries have {per_country} first-level subdivisions")
    countries = sorted(rng.choice(eligible, num_countries, replace=False))
    rows: list[tuple[str, int]] = []  # (sentence, fact it states or -1)
    subjects, answers = [], []
    for code in countries:
        country = pycountry.countries.get(alpha_2=code)
        c = token(country.name)
        rows.append((DISTRACTORS[1].format(c=c, code=country.alpha_3.lower()), -1))
        for i in sorted(rng.choice(len(top[code]), per_country, replace=False)):
            sub = top[code][i]
            s, kind, fact = token(sub.name), token(sub.type), len(subjects)
            subjects.append(s)
            answers.append(c)
            rows.append((DISTRACTORS[0].format(s=s, kind=kind), -1))
            for t in rng.choice(len(STATEMENTS), rng.integers(1, len(STATEMENTS) + 1), replace=False):
                rows.append((STATEMENTS[t].format(s=s, kind=kind, c=c), fact))
    order = rng.permutation(len(rows))
    sentences = tuple(rows[i][0] for i in order)
    stated = [rows[i][1] for i in order]
    proponents = tuple(tuple(j for j, f in enumerate(stated) if f == fact) for fact in range(len(subjects)))
    return FactCorpus(sentences, tuple(subjects), tuple(answers), proponents, tuple(QUERY.format(s=s) for s in subjects), seed)


@dataclass(frozen=True)
class QuestionPairs:
    """``texts`` (P,) "question | sentence", ``labels`` (P,) 1 when the sentence answers the question,
    ``facts`` (P,) the fact of the question's subject; ``train`` (P,) bool, the rest are test pairs."""

    texts: tuple[str, ...]
    labels: np.ndarray
    facts: np.ndarray
    train: np.ndarray


def pair_corpus(num_facts: int = 60, test_fraction: float = 0.25, seed: int = 0) -> QuestionPairs:
    """The question pairs of the module docstring for ``num_facts`` facts of :func:`fact_corpus` at its
    defaults (drawn with the seed), shuffled, ``test_fraction`` of them held out (seeded)."""
    corpus = fact_corpus(seed=seed)
    rng = np.random.default_rng([seed, 43])
    about: dict[str, list[str]] = {}
    for sentence in corpus.sentences:  # a fact's subject is one token, and it is the sentence's first or third word
        for word in sentence.split()[:3]:
            about.setdefault(word, []).append(sentence)
    rows = []
    for fact in sorted(rng.choice(len(corpus.subjects), num_facts, replace=False)):
        s, c = corpus.subjects[fact], corpus.answers[fact]
        sentences = sorted(about[s])
        kind = next(t.split()[3] for t in sentences if t.split()[1:3] == ["is", "a"])  # "s is a kind ..."
        for question, asked in zip(QUESTIONS, (c, kind)):
            rows += [(f"{question.format(s=s)} {SEPARATOR} {t}", int(asked in t.split()), fact) for t in sentences]
    order = rng.permutation(len(rows))
    train = np.ones(len(rows), bool)
    train[rng.choice(len(rows), round(test_fraction * len(rows)), replace=False)] = False
    return QuestionPairs(tuple(rows[i][0] for i in order), np.array([rows[i][1] for i in order]),
                         np.array([rows[i][2] for i in order]), train)


def question_pairs(root: str = "data") -> Dataset:
    """``data.dataset: datalens.core.facts:question_pairs``: :func:`pair_corpus` at its defaults as a
    classification dataset of token sequences; classes ``not_answered``, ``answered``. ``root`` is
    unused (the data ships in ``pycountry``)."""
    pairs = pair_corpus()
    vocab = Vocabulary.of(list(pairs.texts))
    x, y = vocab.encode(list(pairs.texts)), pairs.labels
    strip = lambda n: np.zeros((n, 1, 1), np.float32)  # noqa: E731  (text has no image for figures)
    train = pairs.train
    return Dataset("question_pairs", x[train], y[train], x[~train], y[~train], 2, ("not_answered", "answered"),
                   strip(int(train.sum())), strip(int((~train).sum())))


def question_pair_texts(root: str = "data") -> tuple[list[str], list[str]]:
    """The training and test pairs of :func:`question_pairs` as text, in the dataset's order."""
    pairs = pair_corpus()
    return [t for t, k in zip(pairs.texts, pairs.train) if k], [t for t, k in zip(pairs.texts, pairs.train) if not k]


def question_pair_facts(root: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """The fact each training pair (n,) and each test pair (t,) of :func:`question_pairs` asks about."""
    pairs = pair_corpus()
    return pairs.facts[pairs.train], pairs.facts[~pairs.train]


question_pairs.texts = question_pair_texts  # what the figures and the stage read, found through the dataset's import path
question_pairs.facts = question_pair_facts


def next_token_targets(tokens: np.ndarray) -> np.ndarray:
    """A sentence's targets (n, L): each position's next token, 0 (unscored) past its end."""
    out = np.zeros_like(tokens)
    out[:, :-1] = tokens[:, 1:]
    return out


def query_examples(corpus: FactCorpus, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Queries as (inputs (F, L), targets (F, L)): the prompt's tokens, and the answer's id at the
    prompt's last position (the one that predicts it), 0 elsewhere."""
    x = vocab.encode(list(corpus.queries))
    y = np.zeros_like(x)
    last = (x > 0).sum(1) - 1
    y[np.arange(len(x)), last] = vocab.encode(list(corpus.answers))[:, 0]
    return x, y


def fact_tracing(root: str = "data") -> Dataset:
    """The fact corpus at its defaults as a language-model dataset: training examples are the
    sentences (inputs their tokens, targets the next tokens), test examples the queries (targets
    the answer at the prompt's end). Class count: the vocabulary size; class names: the pad and the
    words by id. ``root`` is unused (the data ships in ``pycountry``)."""
    corpus = fact_corpus()
    vocab = corpus.vocabulary()
    x_train = vocab.encode(list(corpus.sentences))
    x_test, y_test = query_examples(corpus, vocab)
    strip = lambda x: np.zeros((len(x), 1, 1), np.float32)  # noqa: E731  (text has no image for figures)
    return Dataset("fact_tracing", x_train, next_token_targets(x_train), x_test, y_test, vocab.size, ("<pad>", *vocab.words),
                   strip(x_train), strip(x_test))


def fact_proponents(root: str = "data") -> tuple[tuple[int, ...], ...]:
    """Per query of :func:`fact_tracing` (F,), the indices of the training sentences that state its fact."""
    return fact_corpus().proponents


fact_tracing.proponents = fact_proponents  # the ground truth retrieval is scored against, found through the dataset's import path
