"""Spatial Relation Parse: prompt text -> SPATIAL_RELATIONS (objects, relation, token positions)."""
from __future__ import annotations

from dataclasses import replace

from ..guidance.relations import (RELATIONS, BoundRelation, Relation, RelationError,
                                  SpatialRelations, canonical_relation, parse_relations)
from . import tokens

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


def bind(clip, text: str, relations: list[Relation]) -> SpatialRelations:
    """Attach token positions (from this CLIP's tokenizers) to parsed relations."""
    bound = tuple(
        BoundRelation(r,
                      tokens.locate(clip, text, r.object_a, r.occurrence_a, "object_a"),
                      tokens.locate(clip, text, r.object_b, r.occurrence_b, "object_b"))
        for r in relations)
    return SpatialRelations(bound, text, tokens.encoder_family(clip), tokens.sequence_length(clip, text))


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
            },
        }

    def parse(self, clip, text, object_a="", relation=FROM_TEXT, object_b=""):
        relations = bind(clip, text, _overridden(text, object_a, relation, object_b))
        summary = relations.summary()
        return {"ui": {"text": [summary]}, "result": (relations, summary)}
