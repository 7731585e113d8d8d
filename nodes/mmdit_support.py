"""Which MMDiT models the pack recognises, and the refusal the guidance nodes give them until
their guided step is wired (nodes/mmdit_capture.py, mmdit_autograd.py, mmdit_memory.py hold
the parts that exist)."""
from __future__ import annotations

import comfy.model_base

from .unet_layers import UnsupportedModel

# ComfyUI's model classes of the MMDiT families the pack is being ported to, by family name
# (Chroma's model class derives from Flux's, Flux.1-schnell shares it).
MMDIT_FAMILIES = (("Flux.1 / Chroma", "Flux"), ("SD3 / SD3.5", "SD3"))


def mmdit_family(model) -> str | None:
    """'Flux.1 / Chroma' | 'SD3 / SD3.5' for a ModelPatcher of those families, else None."""
    base = getattr(model, "model", None)
    for name, cls in MMDIT_FAMILIES:
        model_class = getattr(comfy.model_base, cls, None)
        if model_class is not None and isinstance(base, model_class):
            return name
    return None


def refuse_unwired(model) -> None:
    """UnsupportedModel, naming the model's type and family, for an MMDiT model."""
    family = mmdit_family(model)
    if family is None:
        return
    config = getattr(model.model, "model_config", None)
    kind = type(config).__name__ if config is not None else type(model.model).__name__
    raise UnsupportedModel(
        f"This model is {kind}, a {family} (MMDiT) model: InfSplign guidance, layout boxes and Refine for "
        f"{family} models are not wired yet; today the pack guides SD1.x, SD2.x and SDXL UNets. Load an "
        "SD1.x, SD2.x or SDXL checkpoint for the model input, or sample this model without InfSplign.")
