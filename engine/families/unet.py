"""The UNet family (SD1.x, SD2.x, SDXL): everything the engine needs to know about the model.

- which decoder cross-attention layers to capture, read off the model's own UNet. Levels
  come from the UNet's structure, not from tables: output blocks are grouped by resolution
  (a group ends at a block with an Upsample), the first group with cross-attention is
  "coarse", the second "mid", any later one "fine". That gives SD1.x/SD2.x output blocks
  3-5 / 6-8 / 9-11 and SDXL 0-2 / 3-5, as in ALGORITHM.md section 2;
- which modules the `low` memory mode recomputes (recompute_units) and which modules
  fetch their weights per operation (streams_weights);
- a weightless twin of the UNet on the meta device, and inputs for it, for the memory
  estimate (engine/memory_estimate.py).
A new model family (SD3 / Flux joint attention) is one more module with these functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

import comfy.model_base
import comfy.ops
import comfy.supported_models
from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel, Upsample

from ...guidance.capture import Layer

PRESETS = ("auto", "coarse", "coarse+mid", "all decoder", "custom")
PRESET_LEVELS = {"auto": ("coarse", "mid"), "coarse": ("coarse",), "coarse+mid": ("coarse", "mid"),
                 "all decoder": ("coarse", "mid", "fine")}
FAMILIES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# The tokenizers of each family's CLIP, as engine/tokens.encoder_family names them.
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
    return unet_decoder_layers(model.model.diffusion_model)


def unet_decoder_layers(unet: nn.Module) -> list[Layer]:
    """decoder_layers of a UNet module itself (a loaded model's, or a twin's)."""
    levels = ("coarse", "mid")
    group, seen_groups, layers = 0, [], []
    for block_id, block in enumerate(unet.output_blocks):
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


def auto_layers(unet: nn.Module) -> tuple[Layer, ...]:
    """The `auto` preset (coarse + mid) of a UNet module."""
    return tuple(layer for layer in unet_decoder_layers(unet) if layer.level in PRESET_LEVELS["auto"])


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


# -- memory: what the `low` mode recomputes, and the weightless twin ------------------------

def graph_blocks(unet: nn.Module, last_output_block: int) -> list[nn.Module]:
    """The UNet blocks a guided step's gradient passes: every input block, the middle block,
    and the output blocks up to the last captured one (later ones run detached)."""
    blocks = list(unet.input_blocks)
    if getattr(unet, "middle_block", None) is not None:
        blocks.append(unet.middle_block)
    return blocks + list(unet.output_blocks)[:last_output_block + 1]


def graph_modules(unet: nn.Module, last_output_block: int) -> list[nn.Module]:
    """Every module inside graph_blocks."""
    return [m for block in graph_blocks(unet, last_output_block) for m in block.modules()]


def snapshot_options(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A transformer block's call with its transformer_options as they are at call time:
    the UNet changes that dict (block, block_index, cond_or_uncond) as the step goes on, and
    a recomputation must see what the forward saw."""
    if isinstance(kwargs.get("transformer_options"), dict):
        kwargs = {**kwargs, "transformer_options": dict(kwargs["transformer_options"])}
    return args, kwargs


def recompute_units(unet: nn.Module, last_output_block: int) -> list[nn.Module]:
    """The modules that `low` recomputes one by one: each ResBlock, each transformer block
    (one attention layer pair and its feed-forward) and each Upsample (whose convolution
    would keep the upsampled, four times larger input). Between them only their inputs are
    kept. A module of one operation whose backward keeps nothing but its input (a
    SpatialTransformer's norm and projections, a Downsample or the first convolution) is
    not recomputed: checkpointing it would keep that same input and repeat the operation."""
    units: list[nn.Module] = []
    for block in graph_blocks(unet, last_output_block):
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                units += [b for b in layer.transformer_blocks if isinstance(b, BasicTransformerBlock)]
            elif isinstance(layer, (ResBlock, Upsample)):
                units.append(layer)
    return units


def streams_weights(module: nn.Module) -> bool:
    """Does this module fetch (cast, move, patch) its weights on each call? ComfyUI's ops do
    when weights are offloaded (lowvram, dynamic VRAM) or stored in another dtype, or carry
    a LoRA patch applied per call. Those weights are not the module's own parameters, so
    cloning its parameters for autograd would copy the whole offloaded model for nothing."""
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or getattr(module, "bias_function", None))


@dataclass
class Twin:
    """A UNet rebuilt on the meta device from a model's config: no memory, no weights."""

    unet: nn.Module
    dtype: torch.dtype  # the compute dtype of the model it mirrors
    config: dict
    device: str = "meta"  # (bench/memory.py also builds one with real weights on the CPU)

    def inputs(self, batch: int, latent_hw: tuple[int, int], tokens: int) -> dict:
        """Inputs of one forward (latent, timesteps, text context, SDXL's adm), on its device."""
        meta = {"device": self.device, "dtype": self.dtype}
        context_dim = self.config.get("context_dim")
        if isinstance(context_dim, (list, tuple)):
            context_dim = context_dim[0]
        inputs = {"x": torch.zeros(batch, self.config["in_channels"], *latent_hw, **meta),
                  "timesteps": torch.zeros(batch, device=self.device),
                  "context": torch.zeros(batch, tokens, context_dim, **meta)}
        if self.config.get("adm_in_channels"):
            inputs["y"] = torch.zeros(batch, self.config["adm_in_channels"], **meta)
        return inputs


def meta_twin(config: dict, dtype: torch.dtype, device: str = "meta") -> Twin:
    """The UNet of `config` (a supported model's unet_config) on the meta device (or, for
    a check against real tensors, on `device` with uninitialised weights)."""
    config = {**config, "dtype": dtype}
    with torch.inference_mode(False):  # (ComfyUI runs prompts in inference mode; the twin is counted with autograd)
        unet = UNetModel(**config, device=device, operations=comfy.ops.disable_weight_init)
        for p in unet.parameters():
            p.requires_grad_(False)
    return Twin(unet, dtype, config, device)


def model_twin(model) -> Twin:
    """The twin of a loaded model's UNet, at the dtype it computes in."""
    base = model.model
    return meta_twin(base.model_config.unet_config, base.manual_cast_dtype or base.get_dtype())
