"""Which terms a sampling step has: the relations' window, the boxes' window, injection.

Each term acts on the part of the schedule it was given, as ComfyUI's percents
(model_sampling.percent_to_sigma, guidance.step.in_window's rule and tolerance):
- the relation terms (InfSplign's centroid loss) inside [start_percent, end_percent);
- the box terms (InfSplign Layout Boxes' box_loss, box_weight) inside [0, box_end_percent);
- iLGD's attention injection (`injection`) inside [0, injection_end_percent), on every
  step there, guided or not (it changes the forward, not the gradient);
- Layout Boxes' placing burst (`placing_iterations`): the box terms, in one burst at
  `placing_percent` (engine/refine_hooks.with_placing);
- InfSplign Refine's terms (presence, separation, its spatial weight on the relations): in
  its refinement burst, and with `continuous` on every step inside
  [0, continuous_end_percent) at strength continuous_strength.
"""
from __future__ import annotations

from dataclasses import replace

from ..guidance.box_geometry import apart_boxes, placed_by_burst
from ..guidance.capture import CaptureStore, box_slots
from ..guidance.losses import Objective
from ..guidance.refine import RefineSettings
from ..guidance.step import GuidanceSettings, in_window


def _sigma_at(store: CaptureStore, sampling, percent: float) -> float:
    """model_sampling.percent_to_sigma, once per run and percent (it reads a number back
    from the model's device)."""
    if percent not in store.sigma_at:
        store.sigma_at[percent] = float(sampling.percent_to_sigma(percent))
    return store.sigma_at[percent]


def _within(store: CaptureStore, sampling, sigma: float, start: float, end: float) -> bool:
    return end > start and in_window(sigma, _sigma_at(store, sampling, start), _sigma_at(store, sampling, end))


def loss_boxes(relations) -> tuple:
    """The boxes the box loss reads: as drawn, near or overlapping ones kept `box_margin` apart
    (apart_boxes)."""
    return apart_boxes(tuple(b.box for b in relations.boxes), relations.layout.box_margin)


def step_objective(store: CaptureStore, settings: GuidanceSettings, sampling, sigma: float) -> Objective:
    """The loss terms of the step at `sigma` (empty outside every window)."""
    relations, layout = store.relations, store.relations.layout
    pairs = store.pairs if _within(store, sampling, sigma, settings.start_percent, settings.end_percent) else ()
    boxed = (relations.boxes and layout.box_loss != "none" and layout.box_weight > 0
             and _within(store, sampling, sigma, 0.0, layout.box_end_percent))
    if not boxed:
        return Objective(pairs)
    return Objective(pairs, box_slots(relations), loss_boxes(relations), layout.box_loss, layout.box_weight)


def run_objective(store: CaptureStore, settings: GuidanceSettings | None, refine: RefineSettings | None) -> Objective:
    """Every term that guides a run, with the weights the nodes set (strengths aside), for
    the Attention Preview's loss plot: the relations' (InfSplign's guidance, or InfSplign
    Refine's `spatial` weight), the boxes', and InfSplign Refine's presence and separation
    (its refined step, and every step with `continuous`). A run with none of them (Attention
    Capture Patch alone) shows its relations' and boxes' terms, observed."""
    relations, layout = store.relations, store.relations.layout
    weight = refine.spatial if settings is None and refine is not None else 1.0
    objective = Objective(store.pairs, relation_weight=weight)
    if relations.boxes and layout.box_loss != "none" and layout.box_weight > 0:
        objective = replace(objective, box_slots=box_slots(relations), boxes=loss_boxes(relations),
                            box_loss=layout.box_loss, box_weight=layout.box_weight)
    if refine is not None:
        objective = replace(objective, objects=tuple(range(len(store.groups))), presence=refine.presence,
                            separation=refine.separation)
    return objective


def set_injection(store: CaptureStore, sampling, sigma: float) -> None:
    """Turn the store's attention injection on for a step inside the injection window."""
    layout = store.relations.layout
    store.injecting = bool(store.relations.boxes) and layout.injection > 0 and _within(
        store, sampling, sigma, 0.0, layout.injection_end_percent)


def refine_objective(store: CaptureStore, refine: RefineSettings) -> Objective:
    """The loss of a refinement burst: every object slot's presence and separation, the
    relations' terms times `spatial` (InfSplign Refine), and the layout's box terms times
    `boxes` (Layout Boxes' placing burst), but those of boxes that overlap another much."""
    objective = Objective(store.pairs, objects=tuple(range(len(store.groups))), presence=refine.presence,
                          separation=refine.separation, relation_weight=refine.spatial)
    relations = store.relations
    if refine.boxes > 0 and relations.boxes and relations.layout.box_loss != "none":
        # the burst leaves out boxes that overlap another much (placed_by_burst)
        keep = placed_by_burst(tuple(b.box for b in relations.boxes))
        slots, read = box_slots(relations), loss_boxes(relations)
        objective = replace(objective, box_slots=tuple(slots[i] for i in keep), boxes=tuple(read[i] for i in keep),
                            box_loss=relations.layout.box_loss, box_weight=refine.boxes)
    return objective


def continuous_step(store: CaptureStore, refine: RefineSettings, sampling, sigma: float) -> bool:
    return refine.continuous and refine.continuous_strength > 0 and refine.has_terms and _within(
        store, sampling, sigma, 0.0, refine.continuous_end_percent)


def with_continuous(objective: Objective, settings: GuidanceSettings, store: CaptureStore, refine: RefineSettings,
                    sampling, sigma: float) -> tuple[Objective, GuidanceSettings]:
    """The step's guidance objective joined by InfSplign Refine's per-step terms, as one loss
    at strength 1: strength * (guidance terms) + continuous_strength * (refine terms). The
    gradient is linear in the terms, so this is exactly the sum of both guided steps' shifts,
    with one forward and one backward. Unchanged outside the continuous window."""
    if not continuous_step(store, refine, sampling, sigma):
        return objective, settings
    s, c = settings.strength, refine.continuous_strength
    relation = (s * objective.relation_weight if objective.pairs else 0.0) + c * refine.spatial
    joined = Objective(store.pairs, objective.box_slots, objective.boxes, objective.box_loss,
                       s * objective.box_weight, objects=tuple(range(len(store.groups))),
                       presence=c * refine.presence, separation=c * refine.separation, relation_weight=relation)
    return joined, replace(settings, strength=1.0)
