"""Which decoder cross-attention layers to capture, read off the model's own UNet.

Levels come from the UNet's structure, not from tables: output blocks are grouped by
resolution (a group ends at a block with an Upsample), the first group with cross-attention
is "coarse", the second "mid", any later one "fine". That gives SD1.x/SD2.x output blocks
3-5 / 6-8 / 9-11 and SDXL 0-2 / 3-5, as in ALGORITHM.md section 2.
"""
from __future__ import annotations

import re

import comfy.model_base
import comfy.supported_models
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

from ..guidance.capture import Layer

PRESETS = ("auto", "coarse", "coarse+mid", "all decoder", "custom")
PRESET_LEVELS = {"auto": ("coarse", "mid"), "coarse": ("coarse",), "coarse+mid": ("coarse", "mid"),
                 "all decoder": ("coarse", "mid", "fine")}
FAMILIES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# The tokenizers of each family's CLIP, as nodes/tokens.encoder_family names them.
ENCODERS = {"sd1": "clip_l", "sd2": "clip_h", "sdxl": "clip_g+clip_l"}


class UnsupportedModel(ValueError):
    pass


def family(model) -> str:
    """'sd1' | 'sd2' | 'sdxl' for a ModelPatcher, else UnsupportedModel naming the type."""
    base = model.model
    config = getattr(base, "model_config", None)
    if isinstance(config, comfy.supported_models.SDXL) and isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    if isinstance(config, comfy.supported_models.SD20) and type(base) is comfy.model_base.BaseModel:
        return "sd2"
    if isinstance(config, comfy.supported_models.SD15) and type(base) is comfy.model_base.BaseModel:
        return "sd1"
    kind = type(config).__name__ if config is not None else type(base).__name__
    raise UnsupportedModel(
        f"InfSplign supports SD1.x, SD2.x and SDXL UNets; this model is {kind}. "
        "Load an SD1.x, SD2.x or SDXL checkpoint for the model input.")


def check_relations(model, relations) -> str:
    """The model's family, after checking that `relations` were parsed with that family's
    CLIP: token positions of another tokenizer (SD2's OpenCLIP-H, SDXL's two encoders)
    point at other tokens of this model's conditioning."""
    fam = family(model)
    want = ENCODERS[fam]
    if relations.encoder != want:
        have = next((FAMILIES[f] for f, e in ENCODERS.items() if e == relations.encoder), "another model")
        raise ValueError(
            f"The relations were parsed with a {relations.encoder} CLIP ({have}), but this model is "
            f"{FAMILIES[fam]}, whose prompts are encoded by {want}. Connect the CLIP of the checkpoint "
            "that encodes the positive prompt to Spatial Relation Parse.")
    return fam


def decoder_layers(model) -> list[Layer]:
    """Every cross-attention layer of the UNet decoder, with its level."""
    family(model)
    levels = ("coarse", "mid")
    group, seen_groups, layers = 0, [], []
    for block_id, block in enumerate(model.model.diffusion_model.output_blocks):
        for module in block:
            if isinstance(module, SpatialTransformer):
                if group not in seen_groups:
                    seen_groups.append(group)
                rank = seen_groups.index(group)
                level = levels[rank] if rank < len(levels) else "fine"
                layers += [Layer(block_id, t, level) for t in range(len(module.transformer_blocks))]
        if any(isinstance(m, Upsample) for m in block):
            group += 1
    return layers


_ENTRY = re.compile(r"^(\d+)(?:\.(\d+)(?:-(\d+))?)?$")


def select_layers(model, preset: str, custom: str = "") -> tuple[Layer, ...]:
    """The layers of a preset, or of a custom list like "3, 4, 5" or "1.1-3" (block.transformer)."""
    every = decoder_layers(model)
    if preset in PRESET_LEVELS:
        return tuple(layer for layer in every if layer.level in PRESET_LEVELS[preset])
    if preset != "custom":
        raise ValueError(f'Unknown layer preset "{preset}". Use one of: {", ".join(PRESETS)}.')
    available = sorted({layer.block for layer in every})
    chosen: list[Layer] = []
    for entry in filter(None, re.split(r"[\s,;]+", custom.strip())):
        m = _ENTRY.match(entry)
        if not m:
            raise ValueError(f'Custom layer "{entry}" is not "block", "block.transformer" or '
                             f'"block.first-last" (e.g. "3", "1.2", "1.1-3").')
        block = int(m.group(1))
        first = int(m.group(2)) if m.group(2) else None
        last = int(m.group(3)) if m.group(3) else first
        picked = [layer for layer in every if layer.block == block
                  and (first is None or first <= layer.transformer <= last)]
        if not picked:
            raise ValueError(f'Custom layer "{entry}" has no cross-attention in this '
                             f"{FAMILIES[family(model)]} UNet. Output blocks with cross-attention: "
                             f"{', '.join(map(str, available))}.")
        chosen += [layer for layer in picked if layer not in chosen]
    if not chosen:
        raise ValueError("The custom layer list is empty. Write output blocks such as \"3, 4, 5\" "
                         f"(this UNet: {', '.join(map(str, available))}).")
    return tuple(chosen)
