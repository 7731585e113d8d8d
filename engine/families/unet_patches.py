"""The pack's patches inside the UNet's forward: attention capture and block patches.

- capture_patch (attn2 replace): the previous patch (another pack's) or ComfyUI's attention,
  plus the objects' maps recorded into the run's CaptureStore;
- stop_graph_after (output_block_patch): blocks after the last captured one run detached;
- copy_skips (input_block_patch_after_skip): ControlNet's in-place residuals leave saved
  skips alone;
- autograd_guard: another pack's block patch made safe for the guided step's backward.
All act on guided steps only (the store's flags); outside them they pass values through.
"""
from __future__ import annotations

import torch

import comfy.ldm.modules.attention as attention

from ...guidance.capture import CaptureStore, Layer


def capture_patch(store: CaptureStore, layer: Layer, previous=None):
    """attn2 replace function: the previous patch (or ComfyUI's attention), plus recording."""
    def attn2(q, k, v, extra_options):
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            out = attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                attn_precision=extra_options.get("attn_precision"),
                                                transformer_options=extra_options)
        if (store.capturing or store.replaying) and 0 in extra_options["cond_or_uncond"]:
            seen = tuple(extra_options.get("original_shape", ())[2:])
            if store.latent_hw is not None and seen and seen != store.latent_hw:
                # an area-cropped cond: maps of the crop, not the image
                store.cropped_calls += store.capturing
            else:
                hw = tuple(extra_options["activations_shape"][-2:])
                out = store.injected(out, q, k, v, extra_options["n_heads"], extra_options["cond_or_uncond"], hw)
                store.record(layer, q, k, extra_options["n_heads"], extra_options["cond_or_uncond"], hw)
        return out
    return attn2


def stop_graph_after(store: CaptureStore):
    """output_block_patch: on a guided step, the decoder blocks after the last captured
    layer run on detached inputs. The loss does not depend on them, so they need no
    autograd graph (no saved activations, no bookkeeping); their values are unchanged. `hsp`
    may be None: since ComfyUI 0.33 an earlier output_block_patch may have merged the skip."""
    last = max(layer.block for layer in store.layers)

    def patch(h, hsp, transformer_options):
        if store.capturing and torch.is_grad_enabled() and transformer_options["block"][1] > last:
            return h.detach(), None if hsp is None else hsp.detach()
        return h, hsp
    return patch


def copy_skips(store: CaptureStore):
    """input_block_patch_after_skip: on a guided step whose forward carries ControlNet
    residuals, the next block reads a copy of each skip connection. ComfyUI adds the
    residuals to the stored skips in place (openaimodel.apply_control), and autograd refuses
    that when the next block saved the same tensor for its backward pass."""
    def patch(h, transformer_options):
        if store.capturing and store.controlled and torch.is_grad_enabled():
            return h.clone()
        return h
    return patch


def autograd_guard(store: CaptureStore, patch):
    """Another pack's UNet block patch, made safe for the guided step's backward pass.

    Some patches write into the tensors they were given or computed with (FreeU and
    FreeU_V2 scale half of the channels with `h[:, :k] = h[:, :k] * s`). Under autograd that
    fails at backward time ("modified by an inplace operation") and leaves reference cycles
    that keep the step's tensors alive. So on a guided step the patch first runs on copies
    without autograd; if it wrote into them, those output values are used exactly and the
    gradient passes through the patch as through the identity (straight-through). If it
    did not, it runs again with autograd and keeps its exact gradient; which of the two a
    block needs is remembered for the run. Outside guided steps nothing changes. An
    output_block_patch's skip (`hsp`) may come and go as None (ComfyUI 0.33 allows it)."""
    writes: dict[tuple, bool] = {}

    def guarded(*args):
        if not (store.capturing and torch.is_grad_enabled()):
            return patch(*args)
        *tensors, options = args
        key = (options.get("block"), *(None if t is None else tuple(t.shape) for t in tensors))
        if writes.get(key) is False:
            return patch(*args)
        with torch.no_grad():
            copies = [None if t is None else t.detach().clone() for t in tensors]
            versions = [None if c is None else c._version for c in copies]
            out = patch(*copies, options)
        writes[key] = [None if c is None else c._version for c in copies] != versions
        if not writes[key]:
            return patch(*args)
        outs = out if isinstance(out, tuple) else (out,)
        through = tuple(o if t is None or o is None or o.shape != t.shape else t + (o - t.detach())
                        for t, o in zip(tensors, outs))
        return through if isinstance(out, tuple) else through[0]
    return guarded


BLOCK_PATCHES = ("input_block_patch", "input_block_patch_after_skip", "output_block_patch")
