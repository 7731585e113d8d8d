"""What one guided step costs in memory, counted exactly on a weightless twin of the model.

The twin (the model family's twin: on a UNet, the model's own UNet class and config on the
meta device) runs the guided step as the pack runs it: the cond rows' forward with autograd
and the family's capture on the chosen layers (install_capture, the same code as at
sampling time, which stops the graph after the last captured block), the loss, the uncond
rows' forward without autograd, then the backward pass to the latent; in `low` with the
family's recompute_units checkpointed.
guidance.memory_count counts every storage those operations create and what autograd keeps.
A plain step, for comparison, is one forward of the cond and uncond rows together without
autograd: twice the peak of the guided step's uncond forward (every tensor is per image). Meta tensors allocate nothing, so an SDXL 1024 px step is counted in seconds.

Attention is counted as a given kernel keeps it (guidance.memory_count): "efficient" as
CUDA's memory-efficient / flash kernels (the guided step uses those on CUDA,
engine/memory_modes.py), "math" as ComfyUI's CPU attention (sub-quadratic, query chunks of
1024; under autograd every chunk's weights are kept). Weights are never counted: they are
the model's, not the step's. Not counted: other packs' patches, ControlNet, LoRA applied
per call (memory_modes adds a margin for what is not counted).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..guidance.capture import CaptureStore, Layer
from ..guidance.losses import LossSettings, step_loss
from ..guidance.memory_count import MemoryCounter, efficient_attention, math_attention
from ..guidance.recompute import recomputing
from ..guidance.relations import BoundRelation, Relation, SpatialRelations
from .families import Twin, TwinSpec, family_of

ATTENTION = ("efficient", "math")
MATH_CHUNK = 1024  # query rows per chunk of ComfyUI's sub-quadratic CPU attention
# Two one-token objects, as in "a cat to the left of a dog": the count barely depends on them.
PROBE_RELATIONS = SpatialRelations((BoundRelation(Relation("cat", "left", "dog"), (2,), (8,)),),
                                   "a cat to the left of a dog", "clip_l", 77)


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one step of one model at one size (all from one count)."""

    plain_peak: int  # a plain step: one forward of cond and uncond rows, no autograd
    kept: int  # what autograd keeps for backward at the end of the guided forward
    guided_peak: int  # a guided step: cond forward with autograd, uncond forward, backward

    @property
    def extra(self) -> int:
        """The guided step's peak over a plain step's."""
        return max(0, self.guided_peak - self.plain_peak)


def attention_override(kind: str):
    """An optimized_attention_override computing attention as `kind` keeps it."""
    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        if mask is not None or skip_reshape or skip_output_reshape:
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        if kind == "efficient":
            return efficient_attention(q, k, v, heads)
        upcast = attn_precision == torch.float32
        return torch.cat([math_attention(q[:, i:i + MATH_CHUNK], k, v, heads, upcast)
                          for i in range(0, q.shape[1], MATH_CHUNK)], dim=1)
    return override


def _options(twin: Twin, store: CaptureStore, kind: str, cond_or_uncond: list[int]) -> dict:
    options = {"optimized_attention_override": attention_override(kind), "cond_or_uncond": cond_or_uncond}
    twin.family.install_capture(options, store, twin.module)
    return options


def count_step(twin: Twin, batch: int, latent_hw: tuple[int, int], mode: str, attention: str,
               layers: tuple[Layer, ...], relations: SpatialRelations = PROBE_RELATIONS,
               tokens: int = 77, batched: bool = False) -> StepMemory:
    """Count one guided step of `twin` (batch images, latent h x w) and the plain step it
    replaces. The plain step's peak is twice that of an uncond forward without autograd
    (the same rows, for half the batch): every tensor of the forward is per image.
    `batched`: the cond and uncond rows in one forward with autograd (else the uncond rows
    run in a forward of their own, after the cond rows' forward)."""
    if mode not in ("fast", "low") or attention not in ATTENTION:
        raise ValueError(f"mode {mode!r} / attention {attention!r}: fast|low, {'|'.join(ATTENTION)}")
    network, family = twin.module, twin.family
    store = CaptureStore(relations, layers)
    store.immediate = mode == "low"
    units = family.recompute_units(network, layers) if mode == "low" else []

    def replaying(on: bool) -> None:
        store.replaying = on

    def uncond_forward(rows: int) -> None:
        with torch.no_grad():
            network(**twin.inputs(rows, latent_hw, tokens), transformer_options=_options(twin, store, attention, [1]))
    with torch.inference_mode(False), torch.enable_grad(), MemoryCounter() as counter:
        rows = 2 * batch if batched else batch
        inputs = twin.inputs(rows, latent_hw, tokens)
        x = inputs.pop("x").requires_grad_(True)
        with family.autograd_context(network), recomputing(units, snapshot=family.snapshot_call, replaying=replaying):
            store.capturing = True
            out = network(x, **inputs, transformer_options=_options(twin, store, attention, [0, 1] if batched else [0]))
            store.capturing = False
            loss = step_loss(store.take(), store.pairs, LossSettings())
            kept = counter.saved()
            overall = counter.peak
            before = counter.mark()
            uncond_forward(batch)  # (in the batched design only measured: the plain step's peak)
            plain = counter.peak - before
            counter.peak = overall if batched else max(counter.peak, overall)
            (grad,) = torch.autograd.grad(loss, x)
        del out, grad, loss
    return StepMemory(2 * plain, kept, counter.peak)


@functools.lru_cache(maxsize=32)
def _cached(spec: TwinSpec, batch: int, latent_hw: tuple[int, int], mode: str, attention: str,
            layers: tuple[Layer, ...], relations: SpatialRelations, tokens: int, batched: bool) -> StepMemory:
    own = spec.family.count_step(spec, batch, latent_hw, mode, layers, tokens, batched)
    if own is not None:
        return own
    return count_step(spec.family.twin(spec), batch, latent_hw, mode, attention, layers, relations, tokens, batched)


def estimate(model, batch: int, latent_hw: tuple[int, int], mode: str, attention: str,
             layers: tuple[Layer, ...], relations: SpatialRelations, tokens: int = 77,
             batched: bool = False) -> StepMemory:
    """count_step for a loaded model (a ModelPatcher), counted for one image and scaled to
    the batch (every tensor of the step is per image), cached per model config and size."""
    spec = family_of(model).twin_spec(model)
    one = _cached(spec, 1, tuple(latent_hw), mode, attention, tuple(layers), relations, tokens, batched)
    return StepMemory(batch * one.plain_peak, batch * one.kept, batch * one.guided_peak)
