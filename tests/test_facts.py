"""The fact corpus for the language-model stages (datalens.core.facts) against direct scans of its
sentences and of pycountry's own records."""
import pycountry

from datalens.core.facts import QUERY, QUESTIONS, SEPARATOR, STATEMENTS, fact_corpus, pair_corpus, token


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


def test_question_pairs_are_labelled_by_the_template_that_made_the_sentence_and_rebuilt_identically():
    # an independent reading: a country question is answered by the three statements (each names the
    # country), not by "s is a kind ."; a kind question by that distractor and the statements that
    # name the kind, not by "s lies in c ."
    c, pairs = fact_corpus(), pair_corpus()
    assert pairs.texts == pair_corpus().texts and (pairs.train == pair_corpus().train).all()
    assert pair_corpus(seed=1).texts != pairs.texts and len(set(pairs.facts)) == 60 and pairs.train.mean() == 0.75
    for text, label, fact in zip(pairs.texts, pairs.labels, pairs.facts):
        question, sentence = text.split(f" {SEPARATOR} ")
        s, country = c.subjects[fact], c.answers[fact]
        assert sentence in c.sentences and s in sentence.split() and s in question.split()
        lies_in = sentence == f"{s} lies in {country} ."
        only_kind = sentence.startswith(f"{s} is a ") and sentence.endswith(" .") and len(sentence.split()) == 5
        if question == QUESTIONS[0].format(s=s):
            assert label == (not only_kind), text
        else:
            assert question == QUESTIONS[1].format(s=s) and label == (not lies_in), text
    # every fact's sentences are paired with both questions, and test pairs come from the same facts
    for fact in set(pairs.facts):
        about = [t for t in c.sentences if c.subjects[fact] in t.split()]
        assert sum(f == fact for f in pairs.facts) == 2 * len(about)
