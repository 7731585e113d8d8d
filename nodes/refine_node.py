"""InfSplign Refine (GSN): one burst of latent refinement at a chosen step, on the pack's
capture and gradient engine (engine/refine_hooks.py, guidance/refine.py)."""
from __future__ import annotations

from ..guidance.refine import MAX_ITERATIONS, RefineSettings
from ..guidance.step import MEMORY_MODES
from ..engine import families, refine_hooks

CATEGORY = "sampling/InfSplign"
# Shipped defaults: chosen on the demo model's tuning prompts and seeds (demo/evaluate_refine.py --tune;
# tuning log in demo_world/tuning_log.txt).
DEFAULTS = {"presence": 1.0, "separation": 0.5, "spatial": 0.0, "refine_percent": 0.4, "iterations": 50,
            "learning_rate": 0.05}


class Refine:
    DESCRIPTION = ("GSN's refinement: at one step of the schedule the latent is optimised (Adam, `iterations` "
                   "steps) so that every object of the prompt has a strong attention peak (presence, after "
                   "Attend-and-Excite), the objects' attention does not overlap (separation, an IoU term) and "
                   "the relations hold (spatial, InfSplign's loss); then sampling goes on from there. Connect "
                   "the relations of Spatial Relation Parse (its `objects` list names the objects of a prompt "
                   "without relations). Works alone or stacked with InfSplign (KSampler), with KSampler and "
                   "SamplerCustomAdvanced.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        f = lambda default, lo, hi, step, tip: ("FLOAT", {"default": default, "min": lo, "max": hi,  # noqa: E731
                                                          "step": step, "tooltip": tip})
        d = DEFAULTS
        return {
            "required": {
                "model": ("MODEL",),
                "relations": ("SPATIAL_RELATIONS", {"tooltip": "From Spatial Relation Parse (or Layout Boxes): "
                              "the objects and relations the loss reads."}),
                "presence": f(d["presence"], 0.0, 100.0, 0.05, "Weight of the presence term: 1 - the weakest "
                              "object's attention peak (an object about to be left out is pushed in)."),
                "separation": f(d["separation"], 0.0, 100.0, 0.05, "Weight of the separation term: overlap "
                                "(IoU) of each pair of objects' attention (keeps objects from fusing)."),
                "spatial": f(d["spatial"], 0.0, 100.0, 0.05, "Weight of InfSplign's spatial loss of the "
                             "relations in the refinement (0: relations are left to InfSplign's guidance)."),
                "refine_percent": f(d["refine_percent"], 0.0, 1.0, 0.01, "The step refined, as a fraction of "
                                    "the schedule (0 = the first step)."),
                "iterations": ("INT", {"default": d["iterations"], "min": 0, "max": MAX_ITERATIONS, "tooltip":
                               "Adam steps on the latent at that step (0 = off; GSN uses 50). Each costs about "
                               "one guided step."}),
                "learning_rate": f(d["learning_rate"], 0.0001, 1.0, 0.001, "Adam's learning rate, in the "
                                   "model's input units (a step moves each latent value by about this)."),
                "continuous": ("BOOLEAN", {"default": False, "tooltip": "Also one gradient step of the same "
                               "loss on every step before continuous_end_percent (GSN's GSNg)."}),
            },
            "optional": {
                "continuous_strength": f(30.0, 0.0, 100000.0, 1.0, "Strength of the per-step gradient of "
                                         "`continuous`, as InfSplign's strength."),
                "continuous_end_percent": f(0.5, 0.0, 1.0, 0.01, "`continuous` acts on the steps before this."),
                "temperature": f(1.0, 0.1, 100.0, 0.1, "Softmax temperature of the maps the loss reads, when no "
                                 "InfSplign guidance on the model sets one (its temperature then applies)."),
                "memory": (list(MEMORY_MODES), {"default": "auto", "tooltip": "As InfSplign (KSampler)'s: "
                           "fast keeps what the gradient needs, low recomputes (less memory), auto picks."}),
            },
        }

    def apply(self, model, relations, presence, separation, spatial, refine_percent, iterations, learning_rate,
              continuous, continuous_strength=30.0, continuous_end_percent=0.5, temperature=1.0, memory="auto"):
        families.checked_family(model, relations)
        settings = RefineSettings(presence, separation, spatial, refine_percent, iterations, learning_rate,
                                  continuous, continuous_strength, continuous_end_percent, memory, temperature)
        if settings.has_terms and (presence > 0 or separation > 0) and not _objects(relations):
            raise ValueError("InfSplign Refine: the relations name no objects. Connect Spatial Relation Parse "
                             "with a relation in the text or an `objects` list.")
        if spatial > 0 and not relations.items and not (presence > 0 or separation > 0):
            raise ValueError("InfSplign Refine: spatial > 0 but the prompt has no relation; set presence or "
                             "separation, or write a relation into the text.")
        return (refine_hooks.with_refine(model, relations, settings),)


def _objects(relations) -> bool:
    return bool(relations.items or relations.boxes or relations.objects)
