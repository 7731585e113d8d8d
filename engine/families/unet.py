"""The UNet family (SD1.x, SD2.x, SDXL): everything the engine needs to know about the model.

- detection from the model's supported-model config and base class, and the CLIP that
  encodes each model's prompts;
- which decoder cross-attention layers to capture, read off the model's own UNet. Levels
  come from the UNet's structure, not from tables: output blocks are grouped by resolution
  (a group ends at a block with an Upsample), the first group with cross-attention is
  "coarse", the second "mid", any later one "fine". That gives SD1.x/SD2.x output blocks
  3-5 / 6-8 / 9-11 and SDXL 0-2 / 3-5, as in ALGORITHM.md section 2;
- the capture: attn2 replace patches and block patches (unet_patches.py), the graph
  stopped after the last captured output block;
- the guided step's formula (eps and v prediction, guidance/step.guided_denoised);
- which modules the `low` memory mode recomputes (recompute_units);
- a weightless twin of the UNet on the meta device, and inputs for it, for the memory
  estimate (engine/memory_estimate.py).
UNET is the family object the registry (engine/families/__init__.py) holds.
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

from ...guidance.capture import CaptureStore, Layer
from ...guidance.relations import SpatialRelations
from ...guidance.step import guided_denoised
from .interface import LAYER_PRESETS, Formula, ModelFamily, Twin, TwinSpec, hashable
from .unet_patches import BLOCK_PATCHES, autograd_guard, capture_patch, copy_skips, stop_graph_after

PRESET_LEVELS = {"auto": ("coarse", "mid"), "coarse": ("coarse",), "coarse+mid": ("coarse", "mid"),
                 "all decoder": ("coarse", "mid", "fine")}
VARIANTS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# The tokenizers of each model's CLIP, as engine/tokens.encoder_family names them.
ENCODERS = {"sd1": "clip_l", "sd2": "clip_h", "sdxl": "clip_g+clip_l"}


def variant(model) -> str | None:
    """'sd1' | 'sd2' | 'sdxl' for a ModelPatcher of this family, else None."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if isinstance(config, comfy.supported_models.SDXL) and isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    if isinstance(config, comfy.supported_models.SD20) and type(base) is comfy.model_base.BaseModel:
        return "sd2"
    if isinstance(config, comfy.supported_models.SD15) and type(base) is comfy.model_base.BaseModel:
        return "sd1"
    return None


def decoder_layers(model) -> list[Layer]:
    """Every cross-attention layer of the UNet decoder, with its level."""
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
        raise ValueError(f'Unknown layer preset "{preset}". Use one of: {", ".join(LAYER_PRESETS)}.')
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
                             f"{VARIANTS[variant(model)]} UNet. Output blocks with cross-attention: "
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


@dataclass
class UNetTwin(Twin):
    """A UNet rebuilt on the meta device from a model's config: no memory, no weights."""

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


def meta_twin(config: dict, dtype: torch.dtype, device: str = "meta") -> UNetTwin:
    """The UNet of `config` (a supported model's unet_config) on the meta device (or, for
    a check against real tensors, on `device` with uninitialised weights)."""
    config = {**config, "dtype": dtype}
    with torch.inference_mode(False):  # (ComfyUI runs prompts in inference mode; the twin is counted with autograd)
        unet = UNetModel(**config, device=device, operations=comfy.ops.disable_weight_init)
        for p in unet.parameters():
            p.requires_grad_(False)
    return UNetTwin(UNET, unet, dtype, config, device)


def _last_block(layers: tuple[Layer, ...]) -> int:
    """The last captured output block: the graph stops after it."""
    return max(layer.block for layer in layers)


class UNetFamily(ModelFamily):
    """SD1.x, SD2.x and SDXL: cross-attention (attn2) of the UNet decoder's transformer blocks."""

    name = "UNet"
    supports = "SD1.x, SD2.x and SDXL UNets"
    load_hint = "an SD1.x, SD2.x or SDXL checkpoint"

    def accepts(self, model) -> bool:
        return variant(model) is not None

    def model_name(self, model) -> str:
        return VARIANTS[variant(model)]

    def encoder(self, model) -> str:
        return ENCODERS[variant(model)]

    def check_relations(self, model, relations: SpatialRelations) -> None:
        """Token positions of another tokenizer (SD2's OpenCLIP-H, SDXL's two encoders)
        point at other tokens of this model's conditioning: refused."""
        want = self.encoder(model)
        if relations.encoder != want:
            have = next((VARIANTS[v] for v, e in ENCODERS.items() if e == relations.encoder), "another model")
            raise ValueError(
                f"The relations were parsed with a {relations.encoder} CLIP ({have}), but this model is "
                f"{self.model_name(model)}, whose prompts are encoded by {want}. Connect the CLIP of the "
                "checkpoint that encodes the positive prompt to Spatial Relation Parse.")

    def layers(self, model, preset: str, custom: str = "") -> tuple[Layer, ...]:
        return select_layers(model, preset, custom)

    def install_capture(self, transformer_options: dict, store: CaptureStore, diffusion_model: nn.Module) -> None:
        """attn2 replace patches on the captured layers, each wrapping the patch already
        there (IPAdapter and the like keep working); other packs' block patches guarded for
        the backward pass; the graph stopped after the last captured output block; ControlNet
        skips copied on guided steps."""
        replace = transformer_options.setdefault("patches_replace", {}).setdefault("attn2", {})
        for layer in store.layers:
            key = ("output", layer.block, layer.transformer)
            previous = replace.get(key, replace.get(("output", layer.block)))
            replace[key] = capture_patch(store, layer, previous)
        patches = transformer_options.setdefault("patches", {})
        for name in BLOCK_PATCHES:  # (per-run lists: the model's own stay as they are)
            if patches.get(name):
                patches[name] = [autograd_guard(store, p) for p in patches[name]]
        patches.setdefault("output_block_patch", []).append(stop_graph_after(store))
        patches.setdefault("input_block_patch_after_skip", []).append(copy_skips(store))

    def guidance_formula(self, model_sampling) -> Formula:
        """Thesis Eq. 6 on the denoised prediction, for eps and v prediction alike (both
        reduce to the sampler's eps). A UNet switched to another sampling type (e.g. flow
        matching with ModelSamplingSD3) keeps this formula, as it always has."""
        return guided_denoised

    def orthogonal_auto(self, model) -> str:
        """l2 on SD1.x, where the thesis found it helps; none elsewhere (little effect on SD2.x)."""
        return "l2" if variant(model) == "sd1" else "none"

    def graph_modules(self, diffusion_model: nn.Module, layers: tuple[Layer, ...]) -> list[nn.Module]:
        return [m for block in graph_blocks(diffusion_model, _last_block(layers)) for m in block.modules()]

    def recompute_units(self, diffusion_model: nn.Module, layers: tuple[Layer, ...]) -> list[nn.Module]:
        return recompute_units(diffusion_model, _last_block(layers))

    def twin_spec(self, model) -> TwinSpec:
        """The model's unet_config, at the dtype it computes in."""
        base = model.model
        config = base.model_config.unet_config
        return TwinSpec(self, hashable(config), base.manual_cast_dtype or base.get_dtype(), dict(config))

    def twin(self, spec: TwinSpec, device: str = "meta") -> UNetTwin:
        return meta_twin(spec.config, spec.dtype, device)


UNET = UNetFamily()
