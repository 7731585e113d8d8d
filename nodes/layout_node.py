"""InfSplign Layout Boxes: boxes for objects of the prompt -> SPATIAL_RELATIONS with boxes.

The guidance nodes (InfSplign (KSampler), InfSplign Guider, Attention Capture Patch,
Attention Preview) take the output as they take Spatial Relation Parse's: the boxes add
iLGD's attention injection and a box loss term to the same capture and guided step.
The `boxes` value is data only (guidance/boxes.parse_boxes); web/layout_editor.js draws
and edits it on the node.
"""
from __future__ import annotations

from ..guidance.boxes import (BOX_LOSSES, MAX_PLACING_ITERATIONS, BoundBox, BoxError, LayoutSettings, parse_boxes,
                               plan_boxes)
from ..guidance.relations import SpatialRelations
from ..engine import tokens

CATEGORY = "conditioning/InfSplign"
# Shipped defaults: chosen on the demo model's tuning prompts and seeds of three layout sets
# (demo/evaluate_boxes.py --tune), by the rule "most objects in their boxes with shapes intact"
# (with the maps read at temperature 32 as workflow e does; tuning_log in demo_world/).
DEFAULTS = {"injection": 6.0, "injection_end_percent": 0.1, "box_loss": "peak_centre", "box_weight": 1.5,
            "box_end_percent": 0.2, "box_margin": 0.2, "placing_iterations": 20, "placing_percent": 0.05}


def bind_boxes(clip, text: str, boxes_json: str, relations: SpatialRelations | None,
               layout: LayoutSettings) -> SpatialRelations:
    """The prompt's boxes (or boxes planned from `relations`), bound to token positions."""
    boxes = parse_boxes(boxes_json)
    encoder = tokens.encoder_family(clip)
    items = ()
    if relations is not None:
        if " ".join(relations.text.split()) != " ".join(text.split()) or relations.encoder != encoder:
            raise BoxError("The relations connected to InfSplign Layout Boxes were parsed from another text or "
                           "CLIP. Give both nodes the same CLIP and the same text as the positive prompt.")
        if boxes:
            items = relations.items  # merged: relation terms and box terms together
        else:  # planned: the relations are guided by boxes instead of centroids
            boxes = plan_boxes([(i.relation.object_a, i.relation.relation, i.relation.object_b)
                                for i in relations.items])
    if not boxes:
        raise BoxError('No boxes: draw them on the node (or write them into "boxes"), or connect the '
                       "relations of Spatial Relation Parse to have boxes planned from them.")
    occurrence = {}  # an object named by the relations is the mention they mean
    for item in (relations.items if relations is not None else ()):
        occurrence.setdefault(item.relation.object_a, item.relation.occurrence_a)
        occurrence.setdefault(item.relation.object_b, item.relation.occurrence_b)
    bound = [BoundBox(box, tokens.locate(clip, text, box.object, occurrence.get(box.object, 0), f"box {i} object"))
             for i, box in enumerate(boxes, 1)]
    slots = [b.tokens for b in bound]
    if len(set(slots)) < len(slots):
        raise BoxError("Two boxes name the same words of the prompt; give each object one box.")
    return SpatialRelations(items, text, encoder, tokens.sequence_length(clip, text), tuple(bound), layout)


class LayoutBoxes:
    DESCRIPTION = ("Boxes for objects of the prompt (fractions of the image, origin top-left), drawn on the "
                   "node: iLGD's attention injection early in sampling, then a box loss (iLGD's or GOAL's "
                   "masked attention alignment) on the same guided step as InfSplign's relations. Connect "
                   "its output where Spatial Relation Parse's relations go.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SPATIAL_RELATIONS", "STRING")
    RETURN_NAMES = ("relations", "summary")
    FUNCTION = "layout"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        f = lambda default, lo, hi, step, tip: ("FLOAT", {"default": default, "min": lo, "max": hi,  # noqa: E731
                                                          "step": step, "tooltip": tip})
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP that encodes the positive prompt."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The same text as the positive prompt."}),
                "boxes": ("STRING", {"multiline": True, "default": "[]", "tooltip":
                          'JSON: [{"object": "red circle", "box": [x0, y0, x1, y1]}, ...], fractions of the image, '
                          "origin top-left (the editor on the node writes it). Empty with relations connected: "
                          "boxes are planned from the relations."}),
                "injection": f(DEFAULTS["injection"], 0.0, 10.0, 0.05,
                               "nu' of iLGD: bias of each object's attention toward its box early in sampling, as a "
                               "fraction of the word's attention range (0 = off)."),
                "injection_end_percent": f(DEFAULTS["injection_end_percent"], 0.0, 1.0, 0.01,
                                           "Injection acts on the steps before this point of the schedule."),
                "box_loss": (list(BOX_LOSSES), {"default": DEFAULTS["box_loss"], "tooltip":
                             "peak: (1 - share of the object's attention above its mean that lies inside the "
                             "box)^2, which stops pulling once the object sits in its box, so shapes stay whole; "
                             "ilgd: (1 - share of the attention inside the box)^2, which keeps pulling and can grow "
                             "objects into their box's edges; peak_centre: peak plus the distance from the "
                             "object's peak to the middle of its box, which also pulls in objects that formed far "
                             "from their box; maalign: GOAL's (1 - max inside) + max outside; "
                             "none: injection only."}),
                "box_weight": f(DEFAULTS["box_weight"], 0.0, 1000.0, 0.1,
                                "Weight of the box loss in the guided step (times the guidance strength)."),
                "box_end_percent": f(DEFAULTS["box_end_percent"], 0.0, 1.0, 0.01,
                                     "The box loss guides the steps before this point of the schedule."),
            },
            "optional": {
                "relations": ("SPATIAL_RELATIONS", {"tooltip": "From Spatial Relation Parse: merged in; with no "
                              "boxes, boxes are planned from them."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 16384, "step": 8,
                                  "tooltip": "The image width: the editor's aspect only."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 16384, "step": 8,
                                   "tooltip": "The image height: the editor's aspect only."}),
                "box_margin": f(DEFAULTS["box_margin"], 0.0, 0.5, 0.01,
                                "Boxes nearer than this (fraction of the image side) are read by the box loss with "
                                "their facing sides moved back until they are this far apart (at most 90 % of "
                                "a box), so two objects in near boxes stay apart. Overlapping boxes are read "
                                "apart along the axis they overlap least, the further the more they overlap, so "
                                "their objects are not pulled into the shared part. 0 = off (boxes read as "
                                "drawn)."),
                "placing_iterations": ("INT", {"default": DEFAULTS["placing_iterations"], "min": 0,
                                       "max": MAX_PLACING_ITERATIONS, "tooltip":
                                       "Adam steps on the latent at placing_percent that move each object into "
                                       "its box while the image is still a blur, before shapes form (the box loss, "
                                       "as GSN's refinement). Each costs about one guided step. It leaves out two "
                                       "boxes that overlap by more than 40 % of the smaller one's side (along the "
                                       "axis they overlap least): there is no room for both objects, and the burst "
                                       "pressed them together. 0 = off (injection and the box loss "
                                       "alone)."}),
                "placing_percent": f(DEFAULTS["placing_percent"], 0.0, 1.0, 0.01,
                                     "The step of the placing burst, as a fraction of the schedule."),
            },
        }

    def layout(self, clip, text, boxes, injection, injection_end_percent, box_loss, box_weight, box_end_percent,
               relations=None, width=512, height=512, box_margin=None, placing_iterations=None,
               placing_percent=None):
        # a saved workflow without these inputs gets the defaults
        margin = DEFAULTS["box_margin"] if box_margin is None else box_margin
        iterations = DEFAULTS["placing_iterations"] if placing_iterations is None else placing_iterations
        percent = DEFAULTS["placing_percent"] if placing_percent is None else placing_percent
        settings = LayoutSettings(injection, injection_end_percent, box_loss, box_weight, box_end_percent, margin,
                                  iterations, percent)
        result = bind_boxes(clip, text, boxes, relations, settings)
        summary = result.summary()
        return {"ui": {"text": [summary]}, "result": (result, summary)}
