"""Model families: one module per kind of diffusion model behind one interface (interface.py),
and the registry that finds a model's family.

A new family is a module with a ModelFamily in it, added to FAMILIES; nothing else in the
engine branches on the kind of model.
"""
from __future__ import annotations

from ...guidance.relations import SpatialRelations
from .interface import LAYER_PRESETS, Formula, ModelFamily, Twin, TwinSpec, UnsupportedModel
from .mmdit.family import MMDIT
from .unet import UNET

__all__ = ["FAMILIES", "FAMILY_KEY", "LAYER_PRESETS", "Formula", "ModelFamily", "Twin", "TwinSpec",
           "UnsupportedModel", "checked_family", "family_of", "of_run"]

FAMILIES: tuple[ModelFamily, ...] = (UNET, MMDIT)
FAMILY_KEY = "infsplign_family"  # transformer_options key: the family of the run's model


def _kind(model) -> str:
    base = getattr(model, "model", model)
    config = getattr(base, "model_config", None)
    return type(config).__name__ if config is not None else type(base).__name__


def _either(texts: list[str], last: str) -> str:
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} {last} {texts[-1]}"


def family_of(model) -> ModelFamily:
    """The family of a ModelPatcher's model, else UnsupportedModel naming its type and
    what the pack supports."""
    for family in FAMILIES:
        if family.accepts(model):
            return family
    raise UnsupportedModel(
        f"InfSplign supports {_either([f.supports for f in FAMILIES], 'and')}; this model is {_kind(model)}. "
        f"Load {_either([f.load_hint for f in FAMILIES], 'or')} for the model input.")


def checked_family(model, relations: SpatialRelations) -> ModelFamily:
    """The model's family, after checking that `relations` were parsed with its CLIP."""
    family = family_of(model)
    family.check_relations(model, relations)
    return family


def of_run(transformer_options: dict) -> ModelFamily:
    """The family a run's capture was installed for (engine/hooks.py puts it there)."""
    return transformer_options[FAMILY_KEY]
