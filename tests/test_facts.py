"""The fact corpus for the language-model stages (datalens.core.facts) against direct scans of its
sentences and of pycountry's own records."""
import pycountry

from datalens.core.facts import QUERY, STATEMENTS, fact_corpus, token


def test_the_corpus_is_rebuilt_identically_from_its_seed_and_differs_with_another():
    a, b = fact_corpus(seed=0), fact_corpus(seed=0)
    assert a == b and len(a.subjects) == 120 and len(a.sentences) == len(set(a.sentences))
    assert fact_corpus(seed=1).subjects != a.subjects


def test_proponents_are_exactly_the_sentences_that_name_both_the_subject_and_its_answer():
    c = fact_corpus()
    for fact, (s, ans) in enumerate(zip(c.subjects, c.answers)):
        scan = tuple(i for i, sentence in enumerate(c.sentences) if s in sentence.split() and ans in sentence.split())
        assert c.proponents[fact] == scan and 1 <= len(scan) <= len(STATEMENTS)
    # distractors name the subject without the answer, so a method that matches the subject alone is not enough
    assert all(any(s in t.split() and ans not in t.split() for t in c.sentences) for s, ans in zip(c.subjects, c.answers))


def test_every_fact_is_true_of_iso_3166_2_and_its_query_wording_never_appears_in_training():
    c = fact_corpus()
    country_of = {token(sub.name): token(pycountry.countries.get(alpha_2=sub.country_code).name)
                  for sub in pycountry.subdivisions if sub.parent_code is None}
    assert all(country_of[s] == ans for s, ans in zip(c.subjects, c.answers))
    wording = QUERY.format(s="").strip()
    assert not any(wording in t for t in c.sentences) and all(q.endswith(wording) for q in c.queries)
    vocab = c.vocabulary()
    assert vocab.decode(vocab.encode([f"{c.queries[0]} {c.answers[0]}"])[0]) == f"{c.queries[0]} {c.answers[0]}"
