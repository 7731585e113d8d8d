"""Tier 1: Spatial Relation Parse's text reader against hostile input (hypothesis).

Whatever the text (any Unicode, lone surrogates as JSON can carry them, weight syntax,
very long strings, thousands of relation phrases), parse_relations returns relations or
raises RelationError with a message, within a time bound, and never anything else.
"""
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from infsplign.guidance.relations import (_MAX_RELATIONS, _MAX_TEXT, DEPTH_PHRASINGS, PHRASINGS,
                                          RELATIONS, Relation, RelationError, parse_relations)

BUDGET_S = 1.0  # measured: under 0.03 s for the worst 20,000-character inputs here

PHRASES = [p for ps in PHRASINGS.values() for p in ps] + list(DEPTH_PHRASINGS)
# Characters that trip naive text handling: case folding that changes length or maps to
# ASCII ("ſ" matches "s" case-insensitively, "İ", "ß", the Kelvin sign), combining marks,
# zero-width and bidi controls, regex and weight-syntax metacharacters, lone surrogates.
TRICKY = list("ſİıßKÅ\u0307\u200b\u200d\u202e\ufeff\u00a0\u3000()[]:\\.,;!?\n\t-'_*+{}^$|") + ["\ud800", "\udfff"]

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
words = st.text(st.characters(codec=None, exclude_categories=()) | st.sampled_from(TRICKY), min_size=0, max_size=12)


def _mangle(phrase: str, draw) -> str:
    """A phrasing with per-letter case changes and Unicode look-alikes."""
    out = []
    for ch in phrase:
        pick = draw(st.integers(0, 5))
        out.append(ch.upper() if pick == 1 else {"s": "ſ", "i": "ı", "k": "K"}.get(ch, ch) if pick == 2
                   else ch + "\u0307" if pick == 3 else ch)
    return "".join(out).replace(" ", draw(st.sampled_from([" ", "  ", "\t", "\n", "\u00a0", "\u3000"])))


@st.composite
def prompts(draw):
    """Word salad around relation phrasings, weight syntax and separators."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 4))
        if kind == 0:
            parts.append(_mangle(draw(st.sampled_from(PHRASES)), draw))
        elif kind == 1:
            parts.append(f"({draw(words)}:{draw(st.floats(allow_nan=True, allow_infinity=True))})")
        elif kind == 2:
            parts.append(draw(st.sampled_from(["embedding:", "embedding:x.v2", "\\(", "\\)", "a", "the", "and"])))
        else:
            parts.append(draw(words))
    return draw(st.sampled_from([" ", "", ", ", "\n"])).join(parts)


def check(text: str):
    start = time.perf_counter()
    try:
        out = parse_relations(text)
    except RelationError as err:
        assert str(err).strip(), "a RelationError must say what to change"
        out = None
    elapsed = time.perf_counter() - start
    assert elapsed < BUDGET_S, f"{elapsed:.2f} s for {len(text)} characters"
    if out is not None:
        assert 1 <= len(out) <= _MAX_RELATIONS
        for r in out:
            assert isinstance(r, Relation) and r.relation in RELATIONS
            assert r.object_a.strip() and r.object_b.strip()
            assert r.occurrence_a >= 0 and r.occurrence_b >= 0
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_text)
@example("a cat beſide a dog")  # "ſ" matches "s" case-insensitively; its lower() is not "s"
@example("a cat to the left of a dog\ud800")
@example("(a cat:1e309) left of (dog:nan)")
def test_arbitrary_unicode(text):
    check(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts())
def test_relation_phrasings_in_word_salad(text):
    check(text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(PHRASES), st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=8),
       st.integers(1, 4000))
def test_very_long_repetitive_prompts(phrase, word, repeats):
    """Thousands of relations or one long run of a word: linear work, bounded time."""
    text = (f"{word} {phrase} {word}, " * repeats)[: _MAX_TEXT + 50]
    check(text)


@pytest.mark.parametrize("text", [
    "a cat left of a dog " * 1000,  # 1000 relations: refused past the limit, fast
    " ".join(f"w{i} left of v{i}," for i in range(1500))[:_MAX_TEXT],  # all distinct objects
    "a " * (_MAX_TEXT // 2 - 10) + "cat left of dog",  # one relation after 10,000 words
    "(" * _MAX_TEXT,
    ":" + " " * (_MAX_TEXT - 2) + ")",
    "x" * (_MAX_TEXT + 1),
    "ſ" * _MAX_TEXT,
])
def test_worst_case_inputs_are_bounded(text):
    check(text)


def test_beyond_the_limits_the_errors_say_what_to_do():
    with pytest.raises(RelationError, match=f"at most {_MAX_TEXT}.*object_a"):
        parse_relations("a cat left of a dog " * 2000)
    with pytest.raises(RelationError, match=f"more than {_MAX_RELATIONS} spatial relations.*object_a"):
        parse_relations("a cat left of a dog, " * (_MAX_RELATIONS + 1))
    assert len(parse_relations("a cat left of a dog, " * _MAX_RELATIONS)) == _MAX_RELATIONS


def test_case_insensitive_lookalike_letters_name_the_right_relation():
    assert parse_relations("a cat beſide a dog") == [Relation("cat", "near", "dog")]
    assert parse_relations("a cat UNDERNEATH a dog") == [Relation("cat", "below", "dog")]
