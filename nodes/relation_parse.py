"""Spatial Relation Parse: prompt text -> SPATIAL_RELATIONS (objects, relation, token positions)."""
from __future__ import annotations

from dataclasses import replace

from ..guidance.relations import (RELATIONS, BoundObject, BoundRelation, Relation, RelationError,
                                  SpatialRelations, canonical_relation, parse_relations, split_objects)
from ..engine import tokens

FROM_TEXT = "from text"


def _overridden(text: str, object_a: str, relation: str, object_b: str) -> list[Relation]:
    object_a, object_b = object_a.strip(), object_b.strip()
    if not (object_a or object_b or relation != FROM_TEXT):
        return parse_relations(text)
    try:
        found = parse_relations(text)
    except RelationError:
        if not (object_a and object_b and relation != FROM_TEXT):
            raise RelationError(
                "The text holds no relation to override: set all three of object_a, relation "
                "and object_b, or write the relation into the text.") from None
        found = [Relation(object_a, canonical_relation(relation), object_b)]
    # An overriding object names the first mention of its words in the prompt.
    first = found[0]
    if object_a and object_a != first.object_a:
        first = replace(first, object_a=object_a, occurrence_a=0)
    if object_b and object_b != first.object_b:
        first = replace(first, object_b=object_b, occurrence_b=0)
    if relation != FROM_TEXT:
        first = replace(first, relation=canonical_relation(relation))
    return [first, *found[1:]]


def bind(clip, text: str, relations: list[Relation], objects: list[str] = ()) -> SpatialRelations:
    """Attach token positions (from this CLIP's tokenizers) to parsed relations and objects."""
    bound = tuple(
        BoundRelation(r,
                      tokens.locate(clip, text, r.object_a, r.occurrence_a, "object_a"),
                      tokens.locate(clip, text, r.object_b, r.occurrence_b, "object_b"))
        for r in relations)
    listed = tuple(BoundObject(o, tokens.locate(clip, text, o, 0, f"objects item {i}"))
                   for i, o in enumerate(objects, 1))
    if len({o.tokens for o in listed}) < len(listed):
        raise RelationError("Two items of objects name the same words of the prompt; name each object once.")
    return SpatialRelations(bound, text, tokens.encoder_family(clip), tokens.sequence_length(clip, text),
                            objects=listed)


def _relations_of(text: str, objects: list[str], object_a: str, relation: str, object_b: str) -> list[Relation]:
    """The prompt's relations; with an objects list, a prompt without any is accepted."""
    try:
        return _overridden(text, object_a, relation, object_b)
    except RelationError:
        if objects and not (object_a.strip() or object_b.strip() or relation != FROM_TEXT):
            return []
        raise


class RelationParse:
    DESCRIPTION = ("Reads spatial relations such as 'a cat to the left of a dog' from the prompt "
                   "and finds the objects' tokens with this CLIP's tokenizer.")
    CATEGORY = "conditioning/InfSplign"
    RETURN_TYPES = ("SPATIAL_RELATIONS", "STRING")
    RETURN_NAMES = ("relations", "summary")
    FUNCTION = "parse"
    OUTPUT_NODE = True  # shows its summary on the canvas, even before anything consumes it

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP that encodes the positive prompt."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The same text as the positive prompt."}),
            },
            "optional": {
                "object_a": ("STRING", {"default": "", "tooltip": "Override the first relation's A (words of the prompt)."}),
                "relation": ([FROM_TEXT, *RELATIONS], {"default": FROM_TEXT, "tooltip": "Override the first relation's R."}),
                "object_b": ("STRING", {"default": "", "tooltip": "Override the first relation's B (words of the prompt)."}),
                "objects": ("STRING", {"default": "", "tooltip":
                            'Object phrases of the prompt, separated by commas ("red circle, blue square, green '
                            'triangle"): the objects InfSplign Refine keeps present and apart. With a list, a '
                            "prompt without a relation phrase is accepted."}),
            },
        }

    def parse(self, clip, text, object_a="", relation=FROM_TEXT, object_b="", objects=""):
        listed = split_objects(objects) if objects.strip() else []
        relations = bind(clip, text, _relations_of(text, listed, object_a, relation, object_b), listed)
        summary = relations.summary()
        return {"ui": {"text": [summary]}, "result": (relations, summary)}
