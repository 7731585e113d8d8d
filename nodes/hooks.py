"""Model-level hooks: attention capture and the guided step, on a cloned ModelPatcher.

Both are keyed wrappers (they compose with other packs' wrappers; the single
`sampler_cfg_function` slot is left alone):
- OUTER_SAMPLE "infsplign.capture": at sampling time, when every node of the graph has
  patched the model, put a capture patch on each chosen attn2 layer, wrapping whatever
  patch sits there then (IPAdapter and the like keep working). The patches go into the
  guider's per-run copy of model_options, so nothing outlives the run.
- PREDICT_NOISE "infsplign.guidance": inside the step window, run the sampler's own
  prediction with autograd and apply guidance.guided_step.
- CALC_COND_BATCH "infsplign.split": during a guided step only, the sampler's cond rows
  run with autograd and its uncond rows under no_grad, in the same calc_cond_batch call.
  The loss reads cond rows only, so the one backward pass then runs on half the batch and
  the forward keeps activations for half the batch (bench/ measures what this saves).
"""
from __future__ import annotations

import logging

import torch

import comfy.ldm.modules.attention as attention
from comfy.patcher_extension import WrappersMP

from ..guidance.autograd import make_autograd_safe
from ..guidance.capture import CaptureStore, Layer
from ..guidance.relations import SpatialRelations
from ..guidance.step import GuidanceSettings, guided_step, in_window

log = logging.getLogger("infsplign")

CAPTURE_KEY = "infsplign.capture"
GUIDANCE_KEY = "infsplign.guidance"
SPLIT_KEY = "infsplign.split"
RUN_KEY = "infsplign_run"


def capture_patch(store: CaptureStore, layer: Layer, previous=None):
    """attn2 replace function: the previous patch (or ComfyUI's attention), plus recording."""
    def attn2(q, k, v, extra_options):
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            out = attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                attn_precision=extra_options.get("attn_precision"),
                                                transformer_options=extra_options)
        store.record(layer, q, k, extra_options["n_heads"], extra_options["cond_or_uncond"],
                     tuple(extra_options["activations_shape"][-2:]))
        return out
    return attn2


def stop_graph_after(store: CaptureStore):
    """output_block_patch: on a guided step, the decoder blocks after the last captured
    layer run on detached inputs. The loss does not depend on them, so they need no
    autograd graph (no saved activations, no bookkeeping); their values are unchanged."""
    last = max(layer.block for layer in store.layers)

    def patch(h, hsp, transformer_options):
        if store.capturing and torch.is_grad_enabled() and transformer_options["block"][1] > last:
            return h.detach(), hsp.detach()
        return h, hsp
    return patch


def _install_capture(model_options: dict, store: CaptureStore) -> None:
    options = model_options.setdefault("transformer_options", {})
    replace = options.setdefault("patches_replace", {}).setdefault("attn2", {})
    for layer in store.layers:
        key = ("output", layer.block, layer.transformer)
        previous = replace.get(key, replace.get(("output", layer.block)))
        replace[key] = capture_patch(store, layer, previous)
    options.setdefault("patches", {}).setdefault("output_block_patch", []).append(stop_graph_after(store))
    options[RUN_KEY] = store


def capture_wrapper(relations: SpatialRelations, layers: tuple[Layer, ...]):
    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        store = CaptureStore(relations, layers)
        # CFGGuider.sample made guider.model_options a per-run copy of nested dicts.
        _install_capture(guider.model_options, store)
        try:
            return executor(*args, **kwargs)
        finally:
            store.capturing = False
            store.take()
    return outer_sample


def guidance_wrapper(relations: SpatialRelations, settings: GuidanceSettings):
    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        store = model_options.get("transformer_options", {}).get(RUN_KEY)
        if store is None:
            raise RuntimeError("InfSplign: no attention capture on this model run; apply "
                               "InfSplign (KSampler) or InfSplign Guider to the model that samples.")
        if store.relations != relations:
            raise ValueError("InfSplign got other relations than the Attention Capture Patch on this "
                             "model. Connect the same Spatial Relation Parse output to both.")
        guider = executor.class_obj
        sampling = guider.model_patcher.get_model_object("model_sampling")
        sigma_start = float(sampling.percent_to_sigma(settings.start_percent))
        sigma_end = float(sampling.percent_to_sigma(settings.end_percent))
        sigma = float(timestep.max())
        if not in_window(sigma, sigma_start, sigma_end):
            return executor(x, timestep, model_options, seed)
        if settings.strength > 0:
            make_autograd_safe(guider.inner_model)
        denoised, report = guided_step(lambda xx: executor(xx, timestep, model_options, seed),
                                       x, timestep, store, settings)
        if report.skipped:
            log.warning("InfSplign skipped guidance at sigma %.4f: %s; this step runs unguided.",
                        sigma, report.skipped, extra={"infsplign": report})
        else:
            log.info("InfSplign %s step at sigma %.4f: loss %.5f, |grad| %.4g",
                     "guided" if report.applied else "observed", sigma, report.loss,
                     report.grad_norm, extra={"infsplign": report})
        return denoised
    return predict_noise


def split_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """Cond rows with autograd, the other conds (uncond) without, on a guided step."""
    store = model_options.get("transformer_options", {}).get(RUN_KEY)
    guided = store is not None and store.capturing and torch.is_grad_enabled()
    if not guided or len(conds) < 2 or all(c is None for c in conds[1:]):
        return executor(model, conds, x_in, timestep, model_options)
    first = executor(model, [conds[0]] + [None] * (len(conds) - 1), x_in, timestep, model_options)
    with torch.no_grad():
        rest = executor(model, [None, *conds[1:]], x_in.detach(), timestep, model_options)
    return [first[0], *rest[1:]]


def has_capture(model) -> bool:
    return bool(model.get_wrappers(WrappersMP.OUTER_SAMPLE, CAPTURE_KEY))


def with_capture(model, relations: SpatialRelations, layers: tuple[Layer, ...]):
    """A clone of `model` that captures the relations' object maps on `layers`."""
    m = model.clone()
    m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, CAPTURE_KEY)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, CAPTURE_KEY, capture_wrapper(relations, layers))
    return m


def with_guidance(model, relations: SpatialRelations, settings: GuidanceSettings, default_layers):
    """A clone of `model` guided by InfSplign; capture with `default_layers()` if none yet."""
    m = model if has_capture(model) else with_capture(model, relations, default_layers())
    m = m.clone()
    m.remove_wrappers_with_key(WrappersMP.PREDICT_NOISE, GUIDANCE_KEY)
    m.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, GUIDANCE_KEY, guidance_wrapper(relations, settings))
    m.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, SPLIT_KEY)
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, SPLIT_KEY, split_cond_batch)
    return m

