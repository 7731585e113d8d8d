"""Attention Capture Patch, InfSplign Guider and InfSplign (KSampler): schemas and wiring."""
from __future__ import annotations

import comfy.samplers

from ..guidance.losses import ACTIVATIONS, LossSettings
from ..guidance.step import MEMORY_MODES, GuidanceSettings
from ..engine import families, hooks, refine_hooks

CATEGORY = "sampling/InfSplign"
ORTHOGONAL_CHOICES = ("auto", "none", "l1", "l2")


def settings_inputs() -> dict:
    """Guidance settings shared by InfSplign Guider and InfSplign (KSampler).

    Defaults are the thesis' best: sigmoid loss with alpha 8 and margin 0, strength
    w = 1000 on the first 25 % of the steps; the orthogonal l2 term on SD1.x only
    ("auto"), where the thesis found it helps (little effect on SD2.x).
    """
    f = lambda default, lo, hi, step, tip: ("FLOAT", {"default": default, "min": lo, "max": hi,  # noqa: E731
                                                      "step": step, "tooltip": tip})
    return {
        "strength": f(1000.0, 0.0, 100000.0, 10.0, "w of the paper: how hard objects are pushed. 0 only observes."),
        "loss": (list(ACTIVATIONS), {"default": "sigmoid", "tooltip":
                 "f of the spatial loss f(alpha (margin - Delta)). Thesis best: sigmoid (alpha 8, margin 0); "
                 "gelu / leaky_relu (alpha 2, margin 0.25); relu (alpha 0.75, margin 0.25)."}),
        "alpha": f(8.0, 0.01, 100.0, 0.05, "Sharpness of the spatial loss."),
        "margin": f(0.0, -1.0, 1.0, 0.01, "How far apart the centroids must be (image widths) before the loss is satisfied."),
        "orthogonal": (list(ORTHOGONAL_CHOICES), {"default": "auto", "tooltip":
                       "Keep the objects aligned on the other axis: l2 on SD1.x and off elsewhere when auto."}),
        "presence_weight": f(1.0, 0.0, 100.0, 0.05, "Coarse level: pull each object's attention together (s2_A + s2_B)."),
        "balance_weight": f(1.0, 0.0, 100.0, 0.05, "Other levels: keep both objects equally compact (|s2_A - s2_B|)."),
        "start_percent": f(0.0, 0.0, 1.0, 0.01, "First step guided, as a fraction of the schedule."),
        "end_percent": f(0.25, 0.0, 1.0, 0.01, "Guidance stops here (the step at exactly this point is not guided)."),
    }


def make_settings(model, strength, loss, alpha, margin, orthogonal, presence_weight, balance_weight,
                  start_percent, end_percent, threshold=False, temperature=1.0, memory="auto") -> GuidanceSettings:
    if orthogonal == "auto":
        orthogonal = families.family_of(model).orthogonal_auto(model)
    return GuidanceSettings(
        strength=strength, start_percent=start_percent, end_percent=end_percent, memory=memory,
        loss=LossSettings(activation=loss, alpha=alpha, margin=margin, orthogonal=orthogonal,
                          presence_weight=presence_weight, balance_weight=balance_weight,
                          threshold=threshold, temperature=temperature))


def _optional() -> dict:
    return {"threshold": ("BOOLEAN", {"default": False, "tooltip":
                          "Mean thresholding of the maps before their statistics (thesis Eq. 7)."}),
            "temperature": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 100.0, "step": 0.1, "tooltip":
                            "Softmax temperature of the attention maps the loss reads; the model's own "
                            "attention is unchanged. 1 = the paper. Raise it (2-8) when an object's map is "
                            "~0 away from the object (very sharp word attention): the loss then has no "
                            "gradient toward the place the object must go, and objects do not move."}),
            "memory": (list(MEMORY_MODES), {"default": "auto", "tooltip":
                       "GPU memory of the guided steps. fast: keeps what the gradient needs (SDXL 1024 px: about "
                       "4.4 GiB more than a plain step). low: recomputes inside the model's blocks during the "
                       "gradient (about 0.3 GiB more; slower guided steps, same image). auto: low when fast "
                       "does not fit the free memory."})}


def _guided_model(model, relations, settings: dict):
    families.checked_family(model, relations)  # clear errors before anything is patched
    guidance = make_settings(model, **settings)
    guided = hooks.with_guidance(model, relations, guidance)
    # Layout Boxes' placing burst is gradient guidance too: strength 0 only observes
    return refine_hooks.with_placing(guided, relations, guidance) if guidance.strength > 0 else guided


class AttentionCapture:
    DESCRIPTION = ("Chooses the decoder layers on which InfSplign records the objects' cross-attention "
                   "maps (cond rows, float32) during guided steps. Chains with attention patches of "
                   "other packs on the same layers. Put it before InfSplign (KSampler) / InfSplign Guider.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "relations": ("SPATIAL_RELATIONS",),
                "layers": (list(families.LAYER_PRESETS), {"default": "auto", "tooltip":
                           "auto = coarse + mid decoder levels (SD1/SD2 output blocks 3-8, SDXL 0-5)."}),
            },
            "optional": {
                "custom_layers": ("STRING", {"default": "", "tooltip":
                                  'With layers = custom: output blocks, e.g. "3, 4, 5" or "1.1-3" (block 1, transformers 1..3).'}),
            },
        }

    def patch(self, model, relations, layers, custom_layers=""):
        family = families.checked_family(model, relations)
        return (hooks.with_capture(model, relations, family.layers(model, layers, custom_layers)),)


class Guider:
    DESCRIPTION = "A CFG guider with InfSplign spatial guidance, for SamplerCustomAdvanced."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                "relations": ("SPATIAL_RELATIONS",),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                **settings_inputs(),
            },
            "optional": _optional(),
        }

    def get_guider(self, model, positive, negative, relations, cfg, **settings):
        guider = comfy.samplers.CFGGuider(_guided_model(model, relations, settings))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


class Apply:
    DESCRIPTION = "InfSplign spatial guidance on a MODEL, for KSampler and KSamplerAdvanced."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL",), "relations": ("SPATIAL_RELATIONS",), **settings_inputs()},
            "optional": _optional(),
        }

    def apply(self, model, relations, **settings):
        return (_guided_model(model, relations, settings),)
