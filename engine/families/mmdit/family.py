"""The MMDiT family (Flux.1 dev and schnell, Chroma, SD3 / SD3.5): the engine's interface
(engine/families/interface.py) answered for joint-attention transformers.

- detection: ComfyUI's Flux, Chroma and SD3 model classes (Flux.2 and the pixel-space Chroma
  Radiance are other networks and are not accepted);
- the text encoder: Flux.1 and Chroma read the prompt from T5 (`t5xxl`), SD3 from CLIP-L,
  CLIP-G and T5 side by side (any of them may be missing);
- blocks: Flux / Chroma double blocks ("double", i) and single blocks ("single", i), SD3
  joint blocks ("double", i); `Layer(i, 0, "coarse", kind)`. All blocks see the same image
  token grid, so every captured block is one level ("coarse": the loss's presence term);
- the capture: an `optimized_attention_override` (capture.CaptureOverride) that, for the
  captured blocks, turns each joint call into the objects' maps in the run's CaptureStore
  (CaptureStore.record_joint); on SD3 the captured blocks carry their identity
  (capture.py); the blocks after the last captured one run without autograd during a
  guided step;
- the guided step for flow matching (CONST sampling): D' = D - sigma w grad_x L, i.e.
  v' = v + w grad_x L (guidance/step.guided_flow_denoised), finite at sigma = 1;
- autograd: in-place residual adds made out of place and RoPE with a backward, during
  guided steps only (autograd.differentiable); `low` recomputes each joint block up to the
  last captured one (recompute.recompute_units);
- the memory count: the model ComfyUI builds from the same supported-model config, on the
  meta device (memory.meta_twin).

Where the text and image tokens sit: the text first (on Flux and Chroma their forward's
context rows, read by a DIFFUSION_MODEL wrapper; on SD3 all tokens before the image), then
the image tokens of the latent (a 2 x 2 patch each), then Kontext's reference images.
A call with fewer text rows than the prompt has (a latent crop of area conditioning) is not
read, as on the UNet. In a batch of conds of unequal lengths ComfyUI repeats each context to
a common length: the copies of an object's row share its probability, so the maps are
scaled back by the number of copies.
"""
from __future__ import annotations

import re

import torch
from torch import nn

import comfy.model_base
import comfy.model_sampling
from comfy.patcher_extension import WrappersMP

from ....guidance.capture import CaptureStore, Layer, cond_rows
from ....guidance.joint_attention import chunk_rows, joint_injection_delta
from ....guidance.relations import SpatialRelations
from ....guidance.step import guided_denoised, guided_flow_denoised
from ..interface import LAYER_PRESETS, Formula, ModelFamily, Twin, TwinSpec, hashable
from .autograd import differentiable
from .capture import OVERRIDE, CaptureOverride, _sd3_block_patch, is_sd3
from .recompute import _PATCH_KEY, ordered_blocks
from .recompute import recompute_units as joint_recompute_units

PATCH = 2  # Flux, Chroma and SD3: one image token per 2 x 2 latent patch
# Logits of one chunk of image queries of the boxes' injection (two softmaxes of it at a time).
INJECTION_CHUNK_BYTES = 64 * 2**20
TEXT_ROWS = "infsplign_text_rows"  # transformer_options key: the text rows of this forward's sequence
TEXT_ROWS_KEY = "infsplign.text_rows"  # the DIFFUSION_MODEL wrapper that puts them there
VARIANTS = {"flux": "Flux.1", "chroma": "Chroma", "sd3": "SD3 / SD3.5"}
# The encoders whose contexts each model reads (engine/text_contexts.py names them).
ENCODERS = {"flux": ("t5xxl",), "chroma": ("t5xxl",),
            "sd3": ("clip_g+clip_l+t5xxl", "clip_g+t5xxl", "clip_l+t5xxl", "clip_g+clip_l", "t5xxl")}
_ENTRY = re.compile(r"^(s?)(\d+)(?:-(\d+))?$")


def variant(model) -> str | None:
    """'flux' | 'chroma' | 'sd3' for a ModelPatcher of this family, else None."""
    base = getattr(model, "model", None)
    for name, cls in (("chroma", "Chroma"), ("flux", "Flux"), ("sd3", "SD3")):
        model_class = getattr(comfy.model_base, cls, None)
        if model_class is not None and type(base) is model_class:
            return name
    return None


def _layer(block: tuple[str, int]) -> Layer:
    return Layer(block[1], 0, "coarse", block[0])


def _block(layer: Layer) -> tuple[str, int]:
    return layer.kind, layer.block


def all_layers(diffusion_model) -> tuple[Layer, ...]:
    """Every joint attention block, in the order the forward runs them."""
    return tuple(_layer(block) for block, _ in ordered_blocks(diffusion_model))


def auto_layers(diffusion_model) -> tuple[Layer, ...]:
    """The default blocks: Flux / Chroma their double blocks (text and image tokens with
    their own weights; the single blocks after them then run without autograd), SD3 the
    first half of its joint blocks. Chosen by the structure of the networks: not yet
    measured on real weights (none can be loaded where the pack is built)."""
    every = all_layers(diffusion_model)
    if is_sd3(diffusion_model):
        return every[:max(1, len(every) // 2)]
    return tuple(layer for layer in every if layer.kind == "double")


def select_layers(diffusion_model, preset: str, custom: str = "") -> tuple[Layer, ...]:
    """A preset's blocks, or a custom list: "3, 5-7" (double / joint blocks), "s0-9" (Flux's
    single blocks)."""
    every = all_layers(diffusion_model)
    if preset in ("auto", "coarse+mid"):
        return auto_layers(diffusion_model)
    if preset == "coarse":
        return tuple(layer for layer in every if layer.kind == "double")
    if preset == "all decoder":
        return every
    if preset != "custom":
        raise ValueError(f'Unknown layer preset "{preset}". Use one of: {", ".join(LAYER_PRESETS)}.')
    doubles = sum(layer.kind == "double" for layer in every)
    singles = len(every) - doubles
    have = f"blocks 0-{doubles - 1}" + (f" and single blocks s0-s{singles - 1}" if singles else "")
    chosen: list[Layer] = []
    for entry in filter(None, re.split(r"[\s,;]+", custom.strip())):
        m = _ENTRY.match(entry)
        if not m:
            raise ValueError(f'Custom block "{entry}" is not "block", "first-last" or (single blocks) "s3", '
                             f'"s3-9". This model has {have}.')
        kind = "single" if m.group(1) else "double"
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) else first
        picked = [layer for layer in every if layer.kind == kind and first <= layer.block <= last]
        if not picked:
            raise ValueError(f'Custom block "{entry}" is not a block of this model: it has {have}.')
        chosen += [layer for layer in picked if layer not in chosen]
    if not chosen:
        raise ValueError(f'The custom block list is empty. Write blocks such as "0-4" (this model: {have}).')
    return tuple(chosen)


class StoreCapture:
    """What CaptureOverride records into: each captured block's joint call, as object maps
    in the run's CaptureStore (the text first, then the latent's image tokens)."""

    def __init__(self, store: CaptureStore):
        self.store = store
        self.blocks = {_block(layer): layer for layer in store.layers}

    def _call(self, block, q, k, heads: int, skip_reshape: bool, options: dict):
        """(layer, q, k as (B, H, L, D), text rows, image span, hw) of a captured joint call of
        the cond rows, else None. A call with fewer text rows than the prompt has (a crop of the
        latent: area conditioning) is counted and not read."""
        store = self.store
        layer = self.blocks.get(block)
        if layer is None or not (store.capturing or store.replaying) or store.latent_hw is None:
            return None
        if 0 not in (options.get("cond_or_uncond") or [0]):
            return None
        if not skip_reshape:  # SD3: (B, L, H * D) -> (B, H, L, D), views
            b, length, width = q.shape
            q = q.view(b, length, heads, width // heads).transpose(1, 2)
            k = k.view(b, k.shape[1], heads, width // heads).transpose(1, 2)
        if q.shape[2] != k.shape[2]:  # not one joint sequence
            return None
        h, w = store.latent_hw[-2:]
        hw = ((h + PATCH - 1) // PATCH, (w + PATCH - 1) // PATCH)
        # [text | image | reference images (Kontext)]: Flux's and Chroma's forward says how many
        # text rows (text_rows); SD3 has no reference images
        text = options.get(TEXT_ROWS)
        if text is None:
            text = k.shape[2] - hw[0] * hw[1] - sum(options.get("reference_image_num_tokens") or ())
        if text < store.relations.sequence_length:
            store.cropped_calls += store.capturing
            return None
        return layer, q, k, text, (text, text + hw[0] * hw[1]), hw

    def record(self, block, q, k, heads: int, skip_reshape: bool, scale, options: dict | None = None) -> None:
        options = options or {}
        call = self._call(block, q, k, heads, skip_reshape, options)
        if call is None:
            return
        layer, q, k, text, image, hw = call
        # Conds of unequal lengths in one batch are repeated to a common length (ComfyUI's
        # CONDCrossAttn.concat): identical copies of the prompt's rows share its attention.
        # (A cond alone in its forward is never repeated.)
        prompt = self.store.relations.sequence_length
        batched = len(options.get("cond_or_uncond") or [0]) > 1
        copies = text // prompt if batched and text % prompt == 0 else 1
        self.store.record_joint(layer, q, k, image, hw, q.shape[-1] ** -0.5 if scale is None else float(scale),
                                options.get("cond_or_uncond") or [0], copies)

    def injected(self, out, block, q, k, v, heads: int, skip_reshape: bool, scale, options: dict | None = None):
        """The call's output with the boxes' injection added to its cond rows' image queries
        (guidance/joint_attention.joint_injection_delta), while the store is injecting; else
        `out` itself. Computed without autograd, as on the UNet: for the step's gradient it is
        a constant shift of the output."""
        store, options = self.store, options or {}
        if not (store.injecting and store.relations.boxes) or options.get("skip_output_reshape") or out.dim() != 3:
            return out
        call = self._call(block, q, k, heads, skip_reshape, options)
        if call is None:
            return out
        layer, q, k, text, image, hw = call
        if not skip_reshape:  # SD3 hands v as (B, L, H, D) or (B, L, H * D)
            v = v.reshape(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)
        rows, _ = cond_rows(options.get("cond_or_uncond") or [0], q.shape[0])
        index = None if rows is None else store._row_index(rows, q.device, as_tensor=True)
        if index is not None:
            q, k, v = (t.index_select(0, index) for t in (q, k, v))
        columns, masks = store._box_index(hw, q.device)
        with torch.no_grad():
            delta = joint_injection_delta(q, k, v, image, columns, masks, store.relations.layout.injection,
                                          q.shape[-1] ** -0.5 if scale is None else float(scale),
                                          chunk_rows(q, k.shape[2], INJECTION_CHUNK_BYTES))
            delta = delta.transpose(1, 2).reshape(delta.shape[0], delta.shape[2], -1).to(out.dtype)
            full = torch.zeros((delta.shape[0], *out.shape[1:]), dtype=out.dtype, device=out.device)
            full[:, image[0]:image[1]] = delta
        return out + full if index is None else out.index_add(0, index, full)


def text_rows(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper of Flux / Chroma: the forward's transformer_options (a per-call
    dict) learn how many text rows its sequence starts with (the context's), so the capture
    finds the image tokens also when reference images (Kontext) follow them."""
    options = kwargs.get("transformer_options")
    if options is None:  # (passed positionally: the last dict, after ControlNet's)
        options = next((a for a in reversed(args) if isinstance(a, dict)), None)
    context = kwargs.get("context", args[2] if len(args) > 2 else None)
    if isinstance(options, dict) and torch.is_tensor(context):
        options[TEXT_ROWS] = context.shape[1]
    return executor(*args, **kwargs)


def _detached_after(store: CaptureStore, previous):
    """A dit replace patch: during a guided step's forward with autograd, the block (or the
    patch that was there) runs without it; otherwise unchanged."""
    def patch(args: dict, extra: dict) -> dict:
        run = (lambda a: previous(a, extra)) if previous is not None else extra["original_block"]
        if not (store.capturing and torch.is_grad_enabled()):
            return run(args)
        with torch.no_grad():
            return run({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    return patch


class MMDiTFamily(ModelFamily):
    """Flux.1, Chroma and SD3 / SD3.5: the joint attention of their transformer blocks."""

    name = "MMDiT"
    supports = "Flux.1, Chroma and SD3 / SD3.5"
    load_hint = "a Flux.1, Chroma or SD3 / SD3.5 model"

    def accepts(self, model) -> bool:
        return variant(model) is not None

    def model_name(self, model) -> str:
        return VARIANTS[variant(model)]

    def encoder(self, model) -> str:
        return ENCODERS[variant(model)][0]

    def check_relations(self, model, relations: SpatialRelations) -> None:
        """Token positions from another model's text encoder point at other rows: refused."""
        wanted = ENCODERS[variant(model)]
        if relations.encoder not in wanted:
            raise ValueError(
                f"The relations were parsed with a {relations.encoder} CLIP, but this model is "
                f"{self.model_name(model)}, whose prompts are encoded by {' or '.join(wanted[:1])}. Connect the "
                "CLIP that encodes the positive prompt (the model's own text encoders) to Spatial Relation Parse.")

    def layers(self, model, preset: str, custom: str = "") -> tuple[Layer, ...]:
        return select_layers(model.model.diffusion_model, preset, custom)

    def install_capture(self, transformer_options: dict, store: CaptureStore, diffusion_model: nn.Module) -> None:
        """The capture override, chained above the override already there; on SD3 the
        captured blocks carry their identity; the blocks after the last captured one run
        without autograd on guided steps. All in the run's own copy of the options."""
        previous = transformer_options.get(OVERRIDE)
        transformer_options[OVERRIDE] = CaptureOverride(StoreCapture(store), previous)
        replace = transformer_options.get("patches_replace") or {}
        dit = dict(replace.get("dit", {}))
        captured = {_block(layer) for layer in store.layers}
        order = [block for block, _ in ordered_blocks(diffusion_model)]
        last = max(order.index(b) for b in captured if b in order)
        for kind, i in order[last + 1:]:
            key = (_PATCH_KEY[kind], i)
            dit[key] = _detached_after(store, dit.get(key))
        if is_sd3(diffusion_model):
            for kind, i in captured:
                dit[("double_block", i)] = _sd3_block_patch(diffusion_model, i, dit.get(("double_block", i)))
        else:
            wrappers = transformer_options.setdefault("wrappers", {})
            kind = WrappersMP.DIFFUSION_MODEL
            wrappers[kind] = {**wrappers.get(kind, {}), TEXT_ROWS_KEY: [text_rows]}
        transformer_options["patches_replace"] = {**replace, "dit": dit}

    def step_attention(self, previous, efficient):
        """The guided forward's attention keeps the capture above the efficient kernels."""
        if isinstance(previous, CaptureOverride):
            return CaptureOverride(previous.capture, efficient(previous.previous))
        return efficient(previous)

    def guidance_formula(self, model_sampling) -> Formula:
        """Flow matching (CONST): v' = v + w grad_x L; a model switched to eps / v sampling
        keeps the UNet's formula."""
        if isinstance(model_sampling, comfy.model_sampling.CONST):
            return guided_flow_denoised
        return guided_denoised

    def orthogonal_auto(self, model) -> str:
        return "none"

    def graph_modules(self, diffusion_model: nn.Module, layers: tuple[Layer, ...]) -> list[nn.Module]:
        units = self.recompute_units(diffusion_model, layers)
        inside = [m for unit in units for m in unit.modules()]
        blocks = {id(m) for _, b in ordered_blocks(diffusion_model) for m in b.modules()}
        # everything outside the joint blocks (embedders, the final layer) and the blocks up to the last captured
        return inside + [m for m in diffusion_model.modules() if id(m) not in blocks]

    def recompute_units(self, diffusion_model: nn.Module, layers: tuple[Layer, ...]) -> list[nn.Module]:
        return joint_recompute_units(diffusion_model, {_block(layer) for layer in layers})

    def autograd_context(self, diffusion_model: nn.Module):
        return differentiable(*[block for _, block in ordered_blocks(diffusion_model)])

    def twin_spec(self, model) -> TwinSpec:
        base = model.model
        config = base.model_config
        return TwinSpec(self, (type(config).__name__, hashable(config.unet_config)),
                        base.manual_cast_dtype or base.get_dtype(), {"config": config})

    def twin(self, spec: TwinSpec, device: str = "meta") -> Twin:
        from . import memory as mmdit_memory  # (it imports the engine's memory count, which imports the families)
        config = spec.config["config"]
        fresh = type(config)(dict(config.unet_config))  # (the loaded model's own config stays as it is)
        twin = mmdit_memory.meta_twin(fresh, spec.dtype, device)
        return MMDiTTwin(self, twin.model, spec.dtype, dict(config.unet_config), device)


    def count_step(self, spec: TwinSpec, batch: int, latent_hw: tuple[int, int], mode: str,
                   layers: tuple[Layer, ...], tokens: int, batched: bool):
        """memory.count_step, the count checked against real tensors (bench/memory.py --mmdit
        --check) and the one the README's table shows: with the uncond rows' forward (the
        plan does not know the cfg; at cfg 1 the count is a little high), or in the batched
        design one forward of both rows' worth with autograd."""
        from . import memory as mmdit_memory
        own = self.twin(spec)
        twin = mmdit_memory.Twin(own.module, own.dtype, own.device)
        blocks = [_block(layer) for layer in layers]
        if batched:
            return mmdit_memory.count_step(twin, mode, blocks, 2 * batch, latent_hw, tokens, real_cfg=False)
        return mmdit_memory.count_step(twin, mode, blocks, batch, latent_hw, tokens, real_cfg=True)


class MMDiTTwin(Twin):
    """The network ComfyUI builds for the model's config, without weights."""

    def inputs(self, batch: int, latent_hw: tuple[int, int], tokens: int) -> dict:
        from . import memory as mmdit_memory
        return mmdit_memory.Twin(self.module, self.dtype, self.device).inputs(batch, latent_hw, tokens)


MMDIT = MMDiTFamily()
