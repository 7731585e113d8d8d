"""Tier 1: reading relations out of prompt text (no ComfyUI)."""
import pytest

from infsplign.guidance.relations import (PHRASINGS, Relation, RelationError, canonical_relation, count_mentions,
                                          mention_spans, parse_relations, strip_weight_syntax)


@pytest.mark.parametrize("relation, phrase", [(r, p) for r, ps in PHRASINGS.items() for p in ps])
def test_every_phrasing_is_read(relation, phrase):
    assert parse_relations(f"a red cat {phrase} a wooden table") == [
        Relation("red cat", relation, "wooden table")]


def test_paper_example_and_shared_subject():
    assert parse_relations("a potted plant to the right of a clock") == [
        Relation("potted plant", "right", "clock")]
    assert parse_relations("a cat to the left of a dog and above a car") == [
        Relation("cat", "left", "dog"), Relation("cat", "above", "car")]


def test_context_words_are_not_objects():
    assert parse_relations("a photo of a cat is sitting directly left of the dog, 4k") == [
        Relation("cat", "left", "dog")]


def test_weight_syntax_is_ignored():
    assert strip_weight_syntax("a (red car:1.3) and [dog]") == "a  red car  and  dog "
    assert parse_relations("a (red car:1.3) to the left of ((a dog))") == [
        Relation("red car", "left", "dog")]


def test_repeated_words_get_their_mention_index():
    rels = parse_relations("a dog near a cat, a cat below a dog")
    assert rels == [Relation("dog", "near", "cat", 0, 0), Relation("cat", "below", "dog", 1, 1)]


@pytest.mark.parametrize("text", ["a cat behind a dog", "a dog in front of a house"])
def test_depth_relations_are_refused(text):
    with pytest.raises(RelationError, match="depth relation"):
        parse_relations(text)


def test_no_relation_lists_what_is_accepted():
    with pytest.raises(RelationError) as err:
        parse_relations("a cat and a dog")
    msg = str(err.value)
    assert '"a cat and a dog"' in msg and '"to the left of"' in msg and "object_a" in msg


def test_canonical_relation_names():
    assert canonical_relation("Left") == "left"
    assert canonical_relation("on top of") == "above"
    with pytest.raises(RelationError, match="Unknown relation"):
        canonical_relation("diagonal")


def test_mention_spans_are_the_counted_mentions():
    text = "A Cat, a cat's toy, cats and a  cat-like cat"
    spans = mention_spans(text, "cat")
    assert [text[a:b] for a, b in spans] == ["Cat", "cat", "cat"]  # not "cats", not "cat-like"
    assert len(spans) == count_mentions(text, "cat")
    assert mention_spans("a red   car and a red car", "red car") == [(2, 11), (18, 25)]
