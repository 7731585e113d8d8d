"""Model-level hooks: attention capture and the guided step, on a cloned ModelPatcher.

Both are keyed wrappers (they compose with other packs' wrappers; the single
`sampler_cfg_function` slot is left alone):
- OUTER_SAMPLE "infsplign.capture": at sampling time, when every node of the graph has
  patched the model, install the model family's capture (engine/families: on a UNet a
  capture patch on each chosen attn2 layer, wrapping whatever patch sits there then, so
  IPAdapter and the like keep working). The hooks go into the guider's per-run copy of
  model_options, so nothing outlives the run.
- PREDICT_NOISE "infsplign.guidance": inside the step window, run the sampler's own
  prediction with autograd and apply guidance.guided_step.
- CALC_COND_BATCH "infsplign.split": during a guided step only, the sampler's cond rows
  run with autograd and its uncond rows under no_grad, in the same calc_cond_batch call.
  The loss reads cond rows only, so the one backward pass then runs on half the batch and
  the forward keeps activations for half the batch (bench/ measures what this saves).

What a step records: only the first calc_cond_batch of the step, which is the sampler's own
cond/uncond forward. Other model passes inside the same prediction (SelfAttentionGuidance's
blurred pass, PerturbedAttentionGuidance's perturbed pass, both post-CFG functions) run
unrecorded and without autograd. Cond rows computed on a crop of the latent (area
conditioning, or a mask with "mask bounds") are not recorded either: their attention maps
describe the crop, not the image, so the centroids would be in the wrong frame. Guidance
reads the conds over the whole latent; when there are none, the step runs unguided, and a
warning says so once per run.

The trace (guidance/trace.py, for InfSplign Attention Preview): every step's recorded maps
go to the run's RunTrace, which joins the Trace of the capture wrapper (its `trace`
attribute, shared by every clone of the model) when sampling has finished. Steps outside
the guidance window, and every step of a capture-only model (no guidance wrapper; then
PREDICT_NOISE "infsplign.observe" and the split wrapper are added for the run only), are
recorded on the sampler's own forward without autograd: the values it computes are
unchanged, the maps are computed beside them.
"""
from __future__ import annotations

import logging

import torch

from comfy.patcher_extension import WrappersMP, get_wrappers_with_key

from ..guidance.autograd import make_autograd_safe
from ..guidance.capture import CaptureStore, Layer
from ..guidance.losses import LossSettings
from ..guidance.relations import SpatialRelations
from ..guidance.step import NO_MAPS, GuidanceSettings, StepReport, guided_step
from ..guidance.trace import RunTrace, Trace
from . import memory_modes, step_terms
from .families import FAMILY_KEY, ModelFamily, family_of, of_run

log = logging.getLogger("infsplign")

CAPTURE_KEY = "infsplign.capture"
GUIDANCE_KEY = "infsplign.guidance"
SPLIT_KEY = "infsplign.split"
OBSERVE_KEY = "infsplign.observe"
MEMORY_KEY = "infsplign.memory"
REFINE_KEY = "infsplign.refine"  # SAMPLER_SAMPLE of InfSplign Refine (engine/refine_hooks.py)
RUN_KEY = "infsplign_run"
TRACE_KEY = "infsplign_trace"
PLAN_KEY = "infsplign_memory"
FORWARDS = {"batched": "cond and uncond rows in one forward", "split": "cond rows apart from uncond rows"}


def _install_capture(model_options: dict, family: ModelFamily, store: CaptureStore, diffusion_model,
                     run: RunTrace | None = None, observe: bool = False) -> None:
    options = model_options.setdefault("transformer_options", {})
    family.install_capture(options, store, diffusion_model)
    options[FAMILY_KEY] = family
    options[RUN_KEY] = store
    options[TRACE_KEY] = run
    if observe:  # capture only: record each step's own forward (innermost, so other wrappers see it done)
        wrappers = options.setdefault("wrappers", {})
        for kind, key, fn in ((WrappersMP.PREDICT_NOISE, OBSERVE_KEY, observe_wrapper),
                              (WrappersMP.CALC_COND_BATCH, SPLIT_KEY, split_cond_batch)):
            if not wrappers.get(kind, {}).get(key):
                wrappers[kind] = {**wrappers.get(kind, {}), key: [fn]}


def observed(predict, x: torch.Tensor, store: CaptureStore):
    """The sampler's own prediction, unchanged, with its first forward's cond maps recorded
    (no autograd: the maps are computed beside the forward, nothing else changes)."""
    store.step_active, store.latent_hw, store.capturing = True, tuple(x.shape[2:]), True
    try:
        with torch.no_grad():
            return predict()
    finally:
        store.step_active = store.capturing = False
        store.take()


def trace_step(run: RunTrace | None, store: CaptureStore, sigma: float, model_options: dict,
               in_window: bool, applied: bool) -> None:
    """Hand the step's recorded maps (store.last) to the run's trace. A failure here stops
    the recording of this run with a warning; it never fails the sampling."""
    layers, store.last = store.last, []
    if run is None or run.failed or not layers:
        return
    try:
        schedule = run.schedule
        if not schedule:  # the run's sigmas, read from the device once
            sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
            schedule = () if sigmas is None else tuple(sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)
        run.record(sigma, schedule, layers, in_window, applied)
    except Exception as e:  # noqa: BLE001  (the preview is optional; the image is not)
        run.failed = f"{type(e).__name__}: {e}"
        log.warning("InfSplign: the attention preview stops recording this run: %s", run.failed)


def observe_wrapper(executor, x, timestep, model_options={}, seed=None):
    """PREDICT_NOISE of a capture-only run: record the step, change nothing."""
    store = model_options.get("transformer_options", {}).get(RUN_KEY)
    if store is None:
        return executor(x, timestep, model_options, seed)
    sigma = step_sigma(timestep)
    step_terms.set_injection(store, executor.class_obj.model_patcher.get_model_object("model_sampling"), sigma)
    denoised = observed(lambda: executor(x, timestep, model_options, seed), x, store)
    trace_step(model_options["transformer_options"].get(TRACE_KEY), store, sigma, model_options, False, False)
    return denoised


def step_sigma(timestep: torch.Tensor) -> float:
    """The sigma of a prediction, as a number: the one value a step reads from the device,
    before its forward (which steps are guided, which the trace keeps)."""
    return float(timestep.max())


def capture_wrapper(relations: SpatialRelations, layers: tuple[Layer, ...], family: ModelFamily):
    """OUTER_SAMPLE: install the family's capture for one run; its `trace` keeps the finished runs."""
    trace = Trace(relations)

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        # CFGGuider.sample made guider.model_options a per-run copy of nested dicts.
        settings, refine = guidance_settings(guider.model_options), refine_settings(guider.model_options)
        # the maps are read at the guidance's temperature (else the refinement's), so the trace
        # shows what the loss saw
        temperature = settings.loss.temperature if settings else refine.temperature if refine else 1.0
        store = CaptureStore(relations, layers, temperature=temperature)
        run = trace.start(settings.loss if settings is not None else LossSettings(), guided=settings is not None,
                          objective=step_terms.run_objective(store, settings, refine))
        # capture only records each step itself; InfSplign Refine's `continuous` records its own
        _install_capture(guider.model_options, family, store, guider.model_patcher.model.diffusion_model, run,
                         observe=settings is None and not (refine is not None and refine.continuous))
        try:
            output = executor(*args, **kwargs)
        finally:
            store.capturing = False
            store.take()
            store.last = []
        if not run.failed:
            try:
                trace.finish(run, output)
            except Exception as e:  # noqa: BLE001
                log.warning("InfSplign: this run is not kept for the attention preview: %s", e)
        return output
    outer_sample.trace = trace
    return outer_sample


def run_store(model_options: dict, relations: SpatialRelations) -> CaptureStore:
    """The run's CaptureStore, checked to capture these relations."""
    store = model_options.get("transformer_options", {}).get(RUN_KEY)
    if store is None:
        raise RuntimeError("InfSplign: no attention capture on this model run; apply "
                           "InfSplign (KSampler) or InfSplign Guider to the model that samples.")
    if store.relations != relations:
        raise ValueError("InfSplign got other relations than the Attention Capture Patch on this "
                         "model. Connect the same Spatial Relation Parse output to both.")
    return store


def guidance_wrapper(relations: SpatialRelations, settings: GuidanceSettings):
    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        store = run_store(model_options, relations)
        sampling = executor.class_obj.model_patcher.get_model_object("model_sampling")
        sigma = step_sigma(timestep)
        objective = step_terms.step_objective(store, settings, sampling, sigma)
        step_settings = settings
        refine = refine_settings(model_options)
        if refine is not None and refine.continuous:  # InfSplign Refine's per-step terms join this step
            objective, step_settings = step_terms.with_continuous(objective, settings, store, refine, sampling, sigma)
        return guided_prediction(executor, x, timestep, model_options, seed, store, step_settings, objective, sigma)
    predict_noise.settings = settings  # read by the capture wrapper: the loss its trace shows
    return predict_noise


def guided_prediction(executor, x, timestep, model_options, seed, store: CaptureStore,
                      settings: GuidanceSettings, objective, sigma: float) -> torch.Tensor:
    """PREDICT_NOISE of a step with these terms: guided (guidance.step.guided_step, in the
    run's memory mode) when the objective has terms, observed when it has none (the
    sampler's own forward, as plain sampling runs it, with the maps recorded beside it)."""
    guider = executor.class_obj
    run = model_options["transformer_options"].get(TRACE_KEY)
    sampling = guider.model_patcher.get_model_object("model_sampling")
    step_terms.set_injection(store, sampling, sigma)
    if objective.empty:
        denoised = observed(lambda: executor(x, timestep, model_options, seed), x, store)
        trace_step(run, store, sigma, model_options, False, False)
        return denoised
    plan = memory_plan(model_options, guider.model_patcher, x.shape) if settings.strength > 0 else None
    options = model_options["transformer_options"]
    formula = of_run(options).guidance_formula(sampling)
    store.step_active, store.latent_hw, cropped = True, tuple(x.shape[2:]), store.cropped_calls

    def guided(mode: str):
        batched = plan.batched(mode)
        with memory_modes.guided_forward(guider.inner_model, store, mode, options, batched=batched,
                                         copy_everywhere=plan.copy_everywhere):
            # On a guided step the sampler's sigma, an inference tensor, is given as a normal
            # copy: post-CFG and cfg functions (RescaleCFG) compute with it and the latent.
            denoised, report = guided_step(
                lambda xx: executor(xx, timestep.clone() if xx.requires_grad else timestep, model_options, seed),
                x, timestep, store, settings, objective, sigma, formula)
        report.forward = "batched" if batched else "split"
        return denoised, report

    def unguided(reason: str):
        denoised = observed(lambda: executor(x, timestep, model_options, seed), x, store)
        return denoised, StepReport(sigma, float("nan"), float("nan"), skipped=reason)
    try:
        if plan is None:  # strength 0 only observes: no autograd, no extra memory
            denoised, report = guided_step(lambda xx: executor(xx, timestep, model_options, seed),
                                           x, timestep, store, settings, objective, sigma, formula)
        else:
            denoised, report = memory_modes.step_with_fallback(plan, plan.step_mode(), guided, unguided, size_text(x))
    finally:
        store.step_active = False
    trace_step(run, store, sigma, model_options, True, report.applied)
    if store.cropped_calls > cropped and not store.warned_crop:
        store.warned_crop = True
        log.warning("InfSplign: a positive conditioning covers only part of the latent (ConditioningSetArea, "
                    "or ConditioningSetMask with mask bounds); its attention maps show the crop, not the "
                    "image, so it is not guided. InfSplign guides the conditionings over the whole image%s.",
                    "" if report.skipped != NO_MAPS else "; there are none here, so this run is unguided")
    if report.skipped:  # (running out of memory has its own warning, once per run)
        log.log(logging.INFO if report.memory_mode == "unguided" else logging.WARNING,
                "InfSplign skipped guidance at sigma %.4f: %s; this step runs unguided.",
                sigma, report.skipped, extra={"infsplign": report})
    else:
        log.info("InfSplign %s step at sigma %.4f: loss %.5f, |grad| %.4g%s",
                 "guided" if report.applied else "observed", sigma, report.loss, report.grad_norm,
                 f" ({report.memory_mode}, {FORWARDS[report.forward]})" if report.forward else "",
                 extra={"infsplign": report})
    return denoised


def guidance_settings(model_options: dict) -> GuidanceSettings | None:
    guidance = get_wrappers_with_key(WrappersMP.PREDICT_NOISE, GUIDANCE_KEY, model_options, is_model_options=True)
    return getattr(guidance[0], "settings", None) if guidance else None


def refine_settings(model_options: dict):
    """InfSplign Refine's RefineSettings on this model (None without it)."""
    refine = get_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, REFINE_KEY, model_options, is_model_options=True)
    return getattr(refine[0], "settings", None) if refine else None


def memory_plan(model_options: dict, model, noise_shape):
    """The run's MemoryPlan (counted once per run, at PREPARE_SAMPLING or the first guided
    step or refinement); None when nothing in the run takes a gradient (no guidance or
    strength 0, and no refinement). The memory mode is the guidance's, else the refinement's."""
    options = model_options.setdefault("transformer_options", {})
    store, settings, refine = options.get(RUN_KEY), guidance_settings(model_options), refine_settings(model_options)
    if settings is not None and settings.strength > 0:
        mode = settings.memory
    elif refine is not None and refine.takes_gradient:
        mode = refine.memory
    else:
        return None
    if store is None:
        return None
    if options.get(PLAN_KEY) is None:
        options[PLAN_KEY] = memory_modes.plan_run(model, store, mode, noise_shape)
    return options[PLAN_KEY]


def size_text(x: torch.Tensor) -> str:
    """"1024x1024 px (latent 128x128), batch 1" for a latent of an 8x-downscaling VAE."""
    h, w = x.shape[-2:]
    return f"{w * 8}x{h * 8} px (latent {h}x{w}), batch {x.shape[0]}"


def control_modules(conds):
    """The torch modules of every ControlNet / T2I-Adapter / Control-LoRA on these conds
    (each ControlNet chain followed through previous_controlnet), once each."""
    seen, modules = set(), []
    for cond in conds:
        for entry in cond or ():
            control = entry.get("control")
            while control is not None and id(control) not in seen:
                seen.add(id(control))
                for name in ("control_model", "t2i_model"):
                    module = getattr(control, name, None)
                    if isinstance(module, torch.nn.Module) and all(module is not m for m in modules):
                        modules.append(module)
                control = getattr(control, "previous_controlnet", None)
    return modules


def split_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """The sampler's own forward of a guided step: recorded; cond rows with autograd, the
    other conds (uncond) without, in a forward of their own ("split"), or all rows in one
    forward with autograd ("batched", store.batched: fewer operations, the uncond rows'
    activations kept too; memory_modes chooses). Later model passes of the step:
    unrecorded, no autograd."""
    store = model_options.get("transformer_options", {}).get(RUN_KEY)
    if store is None or not store.step_active:
        return executor(model, conds, x_in, timestep, model_options)
    if not store.capturing:
        # a further pass inside this step's prediction (SelfAttentionGuidance's blurred pass,
        # PerturbedAttentionGuidance's perturbed pass): the loss does not read it
        with torch.no_grad():
            return executor(model, conds, x_in, timestep, model_options)
    try:
        if not torch.is_grad_enabled():
            return executor(model, conds, x_in, timestep, model_options)
        # ControlNets loaded inside the executor hold inference tensors, like the UNet
        controls = control_modules(conds)
        for module in controls:
            make_autograd_safe(module)
        store.controlled = bool(controls)
        if store.batched or len(conds) < 2 or all(c is None for c in conds[1:]):
            return executor(model, conds, x_in, timestep, model_options)
        first = executor(model, [conds[0]] + [None] * (len(conds) - 1), x_in, timestep, model_options)
        store.capturing = False
        # the other rows as plain sampling runs them: inference mode, no autograd at all
        with torch.inference_mode():
            rest = executor(model, [None, *conds[1:]], x_in.detach(), timestep, model_options)
        return [first[0], *(r.clone() if torch.is_tensor(r) else r for r in rest[1:])]
    finally:
        store.capturing = False  # only the sampler's own forward of a step is recorded


def has_capture(model) -> bool:
    return bool(model.get_wrappers(WrappersMP.OUTER_SAMPLE, CAPTURE_KEY))


def with_capture(model, relations: SpatialRelations, layers: tuple[Layer, ...]):
    """A clone of `model` that captures the relations' object maps on `layers` (of the
    model's family)."""
    family = family_of(model)
    m = model.clone()
    m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, CAPTURE_KEY)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, CAPTURE_KEY, capture_wrapper(relations, layers, family))
    return m


def with_default_capture(model, relations: SpatialRelations):
    """`model` if it captures already (Attention Capture Patch), else a clone capturing its
    family's default layers."""
    return model if has_capture(model) else with_capture(model, relations, family_of(model).default_layers(model))


def with_guidance(model, relations: SpatialRelations, settings: GuidanceSettings):
    """A clone of `model` guided by InfSplign (capturing the default layers if nothing
    captures yet)."""
    m = with_default_capture(model, relations)
    m = m.clone()
    m.remove_wrappers_with_key(WrappersMP.PREDICT_NOISE, GUIDANCE_KEY)
    m.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, GUIDANCE_KEY, guidance_wrapper(relations, settings))
    m.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, SPLIT_KEY)
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, SPLIT_KEY, split_cond_batch)
    m.remove_wrappers_with_key(WrappersMP.PREPARE_SAMPLING, MEMORY_KEY)
    m.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, MEMORY_KEY, memory_modes.reserve_memory(memory_plan))
    return m

