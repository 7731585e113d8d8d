"""InfSplign Refine on a cloned ModelPatcher: GSN's refinement at one step of the schedule.

- SAMPLER_SAMPLE "infsplign.refine": the sampler runs the schedule up to the chosen step
  (sigmas[:k+1]), the latent it reached is refined there (guidance/refine.py: Adam on the
  loss of the objects' maps, each iteration one forward of the positive conditioning
  through ComfyUI's calc_cond_batch with the run's attention capture, and one backward),
  and the sampler runs the rest of the schedule (sigmas[k:]) from the refined latent. The
  sampler is handed that latent through its own noise_scaling, so any k-diffusion sampler
  works; the progress bar and latent previews count the whole schedule.
- PREDICT_NOISE "infsplign.refine_step" (with `continuous`): on every step of
  [0, continuous_end_percent), one gradient step of the same loss, applied as InfSplign's
  guided step (guidance/step.py). With InfSplign's guidance on the same model the two join
  in that node's guided step (step_terms.with_continuous): one forward, one backward.

Layout Boxes' placing burst is the same SAMPLER_SAMPLE with the box terms alone
(with_placing, added by the guidance nodes when the layout asks for it).

The capture, its patches, the memory modes and the trace are the ones of engine/hooks.py.
What changes with the sampler: deterministic samplers (euler, heun, dpmpp_2m, ...) give the
unrefined run's latents up to step k exactly; multistep samplers start their history again
at step k; ancestral and SDE samplers draw the noise of the steps after k afresh (their
noise generator starts again with the run's seed), so the image after k differs from the
unrefined one also in that noise.
"""
from __future__ import annotations

import logging

import torch

import comfy.samplers
from comfy.patcher_extension import WrappersMP

from ..guidance.box_geometry import placed_by_burst
from ..guidance.boxes import PLACING_LEARNING_RATE
from ..guidance.losses import LossSettings, Objective, objective_loss
from ..guidance.refine import RefineReport, RefineSettings, refine_index, refine_latent
from ..guidance.relations import SpatialRelations
from ..guidance.step import GuidanceSettings
from . import hooks, memory_modes, step_terms
from .hooks import REFINE_KEY, SPLIT_KEY, TRACE_KEY

log = logging.getLogger("infsplign")

STEP_KEY = "infsplign.refine_step"


def _linear_inverse(f, sigma, y: torch.Tensor) -> torch.Tensor:
    """x with f(sigma, x) = y, for f affine in x per element (ComfyUI's noise scalings)."""
    base = f(sigma, torch.zeros_like(y))
    slope = f(sigma, torch.ones_like(y)) - base
    return (y - base) / slope


def input_scale(sampling, sigma: torch.Tensor) -> float:
    """What the model divides its input latent by at `sigma` (ComfyUI's calculate_input:
    sqrt(sigma^2 + sigma_data^2) on eps and v models, 1 under flow matching)."""
    one = torch.ones((1, 1, 1, 1))
    return 1.0 / float(sampling.calculate_input(sigma.reshape(1).float().cpu(), one).flatten()[0])


def refine_at(guider, store, x: torch.Tensor, sigma: torch.Tensor, k: int, settings: RefineSettings,
              model_options: dict, who: str = "InfSplign Refine") -> tuple[torch.Tensor, RefineReport]:
    """The refined latent at step k (sigma), in the run's memory mode with its fallbacks."""
    inner = guider.inner_model
    sampling = inner.model_sampling
    options = model_options.setdefault("transformer_options", {})
    positive = guider.conds.get("positive")
    objective = step_terms.refine_objective(store, settings)
    guidance = hooks.guidance_settings(model_options)
    loss_settings = guidance.loss if guidance is not None else LossSettings()
    timestep = sigma.reshape(1).to(x.device).expand(x.shape[0]).clone()
    step_terms.set_injection(store, sampling, float(sigma))
    report = RefineReport(k, float(sigma), source=who)

    def loss_at(xx: torch.Tensor):
        store.capturing = True
        try:
            comfy.samplers.calc_cond_batch(inner, [positive], xx, timestep, model_options)
        finally:
            store.capturing = False
        layers = store.take()
        return objective_loss(layers, objective, loss_settings) if layers else None

    def burst(mode: str):
        report.losses.clear()
        with memory_modes.guided_forward(inner, store, mode, options,
                                         copy_everywhere=plan is not None and plan.copy_everywhere):
            return refine_latent(loss_at, x, float(sigma), settings.iterations, settings.learning_rate,
                                 input_scale(sampling, sigma), report)

    def unrefined(reason: str):
        report.skipped = reason
        return x, report

    plan = hooks.memory_plan(model_options, guider.model_patcher, x.shape)
    store.step_active, store.latent_hw = True, tuple(x.shape[2:])
    try:
        if plan is None:
            return burst("fast")
        return memory_modes.step_with_fallback(plan, plan.step_mode(), burst, unrefined, hooks.size_text(x))
    finally:
        store.step_active = store.capturing = store.injecting = False
        store.take()
        store.last = []


def refine_wrapper(relations: SpatialRelations, settings: RefineSettings, who: str = "InfSplign Refine"):
    """SAMPLER_SAMPLE of a refinement burst; `who` names it in the log (InfSplign Refine, or
    Layout Boxes' placing)."""
    def sampler_sample(executor, guider, sigmas, extra_args, callback, noise, latent_image=None,
                       denoise_mask=None, disable_pbar=False):
        def run(part, cb, start_noise):
            return executor(guider, part, extra_args, cb, start_noise, latent_image, denoise_mask, disable_pbar)
        if settings.iterations == 0 or not settings.has_terms:
            return run(sigmas, callback, noise)
        options = extra_args["model_options"].setdefault("transformer_options", {})
        store = hooks.run_store(extra_args["model_options"], relations)
        sampler = executor.class_obj
        sampling = guider.inner_model.model_sampling
        k = refine_index(sigmas, float(sampling.percent_to_sigma(settings.refine_percent)))
        reason = ("the refine step lies past the last step of this schedule" if k is None
                  else "an inpainting mask (noise mask) is set" if denoise_mask is not None
                  else f"the sampler is a {type(sampler).__name__}, not one of ComfyUI's KSAMPLERs"
                  if not isinstance(sampler, comfy.samplers.KSAMPLER) else "")
        if reason:
            log.warning("%s does not refine this run: %s; it samples unrefined.", who, reason)
            return run(sigmas, callback, noise)
        total = len(sigmas) - 1

        def counted(offset):
            return None if callback is None else (lambda i, d, xx, _t: callback(i + offset, d, xx, total))
        if k == 0:
            x = sampling.noise_scaling(sigmas[0], noise, latent_image, sampler.max_denoise(guider, sigmas))
        else:
            reached = run(sigmas[:k + 1], counted(0), noise)
            x = _linear_inverse(sampling.inverse_noise_scaling, sigmas[k], reached)
        refined, report = refine_at(guider, store, x, sigmas[k], k, settings, extra_args["model_options"], who)
        trace = options.get(TRACE_KEY)
        if trace is not None:
            trace.refinement = report
        if report.skipped:
            log.warning("%s skipped the refinement at step %d: %s.", who, k, report.skipped,
                        extra={"infsplign": report})
        else:
            log.info("%s at step %d (sigma %.4f): loss %.5f -> %.5f in %d iterations", who, k,
                     float(sigmas[k]), report.losses[0], report.final, len(report.losses), extra={"infsplign": report})
        rest = sigmas[k:]
        md = sampler.max_denoise(guider, rest)
        start = _linear_inverse(lambda s, n: sampling.noise_scaling(s, n, latent_image, md), rest[0], refined)
        return run(rest, counted(k), start)
    sampler_sample.settings = settings
    return sampler_sample


def continuous_wrapper(relations: SpatialRelations, settings: RefineSettings):
    """PREDICT_NOISE of `continuous` on a model without InfSplign's guidance (with it, that
    node's guided step carries these terms)."""
    guidance = GuidanceSettings(strength=1.0, memory=settings.memory,
                                loss=LossSettings(temperature=settings.temperature))

    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        if hooks.guidance_settings(model_options) is not None:
            return executor(x, timestep, model_options, seed)
        store = hooks.run_store(model_options, relations)
        sampling = executor.class_obj.model_patcher.get_model_object("model_sampling")
        sigma = hooks.step_sigma(timestep)
        objective, step = step_terms.with_continuous(Objective(), guidance, store, settings, sampling, sigma)
        return hooks.guided_prediction(executor, x, timestep, model_options, seed, store, step, objective, sigma)
    return predict_noise


def with_refine(model, relations: SpatialRelations, settings: RefineSettings):
    """A clone of `model` refined by InfSplign Refine (capturing the default layers if
    nothing captures yet)."""
    m = hooks.with_default_capture(model, relations)
    m = m.clone()
    m.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, REFINE_KEY)
    m.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, REFINE_KEY, refine_wrapper(relations, settings))
    m.remove_wrappers_with_key(WrappersMP.PREDICT_NOISE, STEP_KEY)
    if settings.continuous:
        m.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, STEP_KEY, continuous_wrapper(relations, settings))
    m.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, SPLIT_KEY)
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, SPLIT_KEY, hooks.split_cond_batch)
    m.remove_wrappers_with_key(WrappersMP.PREPARE_SAMPLING, hooks.MEMORY_KEY)
    m.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, hooks.MEMORY_KEY, memory_modes.reserve_memory(hooks.memory_plan))
    return m



def placing_settings(relations: SpatialRelations, guidance: GuidanceSettings) -> RefineSettings | None:
    """The burst of Layout Boxes' placing: the box terms alone (the layout's box loss and
    weight), `placing_iterations` Adam steps at `placing_percent`, in the guidance's memory
    mode. None when the relations have no boxes, the layout no placing, or every box overlaps
    another much (guidance/box_geometry.placed_by_burst)."""
    layout = relations.layout
    if not relations.boxes or not layout.places or not placed_by_burst(tuple(b.box for b in relations.boxes)):
        return None
    return RefineSettings(presence=0.0, separation=0.0, spatial=0.0, refine_percent=layout.placing_percent,
                          iterations=layout.placing_iterations, learning_rate=PLACING_LEARNING_RATE,
                          memory=guidance.memory, temperature=guidance.loss.temperature, boxes=layout.box_weight)


def with_placing(model, relations: SpatialRelations, guidance: GuidanceSettings):
    """`model` with Layout Boxes' placing burst (a clone), or `model` itself when the layout
    has none or the model has a refinement already: InfSplign Refine's burst is the user's
    choice of step and terms, and one burst per run is what the sampler wrapper does."""
    settings = placing_settings(relations, guidance)
    if settings is None or model.get_wrappers(WrappersMP.SAMPLER_SAMPLE, REFINE_KEY):
        return model
    m = model.clone()
    m.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, REFINE_KEY, refine_wrapper(relations, settings,
                                                                                  "Layout Boxes placing"))
    return m
