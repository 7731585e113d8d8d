"""What a sampling run's attention looked like, kept small for the preview.

Per recorded step: the objects' maps (mean over the captured layers, at one resolution of
at most MAX_SIDE pixels a side), their centroids (the loss's own statistics, mean over
layers), the loss and its spatial term per image, each term of the run's objective per image
(relations, boxes, presence, separation: `term_losses`), and whether the step was guided. Only
the first MAX_IMAGES images of a batch are kept, and a Trace keeps the last MAX_RUNS
finished runs. Everything is a float32 CPU tensor or a number; nothing holds a graph.

A run is added to its Trace only when sampling finished, with a fingerprint of the
sampler's output latent, so a preview can pick the run that produced a given LATENT and
an interrupted run is never seen half-written.
"""
from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_stats import at_least_float32, object_stats
from .boxes import LayoutSettings, box_layer_loss
from .capture import box_slots, object_slots
from .losses import LossSettings, Objective, Pair, layer_loss, offsets
from .presence import presence_loss, separation_loss
from .relations import SpatialRelations

MAX_RUNS = 8  # finished runs a Trace keeps
MAX_IMAGES = 8  # images of a batch whose maps and losses are kept
MAX_SIDE = 32  # longest side of the kept maps
SIGMA_TOLERANCE = 1e-4  # relative: a prediction's sigma is a schedule step's within this
AUTO_STEPS = 6
TERMS = ("relations", "boxes", "presence", "separation")  # the terms an Objective sums, in this order


def object_names(relations: SpatialRelations) -> tuple[str, ...]:
    """The object of each map slot (object_slots' order), as the prompt names it."""
    groups, _ = object_slots(relations)
    names: dict[tuple[int, ...], str] = {}
    for item in relations.items:
        names.setdefault(item.tokens_a, item.relation.object_a)
        names.setdefault(item.tokens_b, item.relation.object_b)
    for bound in relations.boxes:
        names.setdefault(bound.tokens, bound.box.object)
    for bound in relations.objects:
        names.setdefault(bound.tokens, bound.object)
    return tuple(names[g] for g in groups)


def fingerprint(latent: Tensor) -> str:
    """Exact identity of a tensor's values (shape, dtype and bytes), wherever it lives."""
    t = latent.detach().to("cpu").contiguous()
    h = hashlib.sha1(f"{tuple(t.shape)} {t.dtype}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def display_size(shapes: Sequence[tuple[int, int]], max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(h, w) of the kept maps: the finest captured resolution, its long side at most max_side."""
    h, w = max(shapes, key=lambda s: s[0] * s[1])
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) -> (B, K, *size): area mean when shrinking, bilinear (pixel centres at
    linspace(0, 1), the centroids' convention) when growing."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


@dataclass(frozen=True)
class StepRecord:
    """One recorded step of a run (B' = min(batch, MAX_IMAGES) images, K objects)."""

    index: int  # position in the sampler's schedule, 0 = first step
    sigma: float
    maps: Tensor  # (B', K, h, w) object maps, mean over the captured layers
    centroids: Tensor  # (B', K, 2) (x, y) in [0, 1], mean over the captured layers
    loss: Tensor  # (B',) loss per image (the guided step's loss is their sum over the batch)
    spatial: Tensor  # (B',) spatial term per image
    in_window: bool  # inside the guidance window (guided, or observed at strength 0)
    applied: bool  # guidance changed this step's prediction
    terms: dict = field(default_factory=dict)  # term name (TERMS) -> (B',) its weighted value per image


def summarise(layers: Sequence[tuple[str, Tensor]], pairs: Sequence[Pair], settings: LossSettings,
              max_images: int = MAX_IMAGES) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(maps, centroids, loss, spatial) of one step's captured layers [(level, (B, K, h, w))],
    detached, first `max_images` images, float32 on the CPU."""
    spatial_only = replace(settings, orthogonal="none", presence_weight=0.0, balance_weight=0.0)
    with torch.no_grad():
        layers = [(level, at_least_float32(m.detach()[:max_images]).float()) for level, m in layers]
        loss = torch.stack([layer_loss(m, pairs, level, settings) for level, m in layers]).mean(dim=0)
        spatial = torch.stack([layer_loss(m, pairs, level, spatial_only) for level, m in layers]).mean(dim=0)
        centres = torch.stack([object_stats(m, settings.threshold)[0] for _, m in layers]).mean(dim=0)
        size = display_size([tuple(m.shape[-2:]) for _, m in layers])
        maps = torch.stack([resample(m, size) for _, m in layers]).mean(dim=0)
    return maps.cpu(), centres.cpu(), loss.cpu(), spatial.cpu()


def term_losses(layers: Sequence[tuple[str, Tensor]], objective: Objective, relations: Tensor,
                max_images: int = MAX_IMAGES) -> dict[str, Tensor]:
    """Each term of `objective` per image (B',), weighted as objective_loss sums it and
    averaged over the layers: their sum is the objective's loss per image. `relations` is the
    relations' terms per image at weight 1 (summarise's loss, on the same maps and pairs)."""
    terms: dict[str, Tensor] = {}
    if objective.has_relations:
        terms["relations"] = objective.relation_weight * relations.cpu()
    others = {name: [] for name, on in (("boxes", objective.has_boxes), ("presence", objective.has_presence),
                                         ("separation", objective.has_separation)) if on}
    if not others:
        return terms
    with torch.no_grad():
        for _, m in layers:
            m = at_least_float32(m.detach()[:max_images]).float()
            if "boxes" in others:
                others["boxes"].append(objective.box_weight * box_layer_loss(m, objective.box_slots, objective.boxes,
                                                                             objective.box_loss))
            if "presence" in others:
                others["presence"].append(objective.presence * presence_loss(m, objective.objects))
            if "separation" in others:
                others["separation"].append(objective.separation * separation_loss(m, objective.objects))
    for name, values in others.items():
        terms[name] = torch.stack(values).mean(dim=0).cpu()
    return terms


@dataclass
class RunTrace:
    """One sampling run, filled step by step while it samples; `fingerprint` once finished."""

    objects: tuple[str, ...]
    pairs: tuple[Pair, ...]
    settings: LossSettings  # the loss the plot shows (the guidance's, or the defaults when observing only)
    guided: bool = False  # a guidance node was on the model
    batch: int = 0
    schedule: tuple[float, ...] = ()  # the sampler's sigmas, the last one 0
    steps: dict[int, StepRecord] = field(default_factory=dict)
    fingerprint: str = ""
    failed: str = ""  # why recording stopped, if it did
    boxes: tuple[tuple[int, tuple[float, float, float, float]], ...] = ()  # (map slot, x0, y0, x1, y1)
    refinement: object = None  # guidance.refine.RefineReport of InfSplign Refine's step, if it ran
    # the terms that guide the run's steps, with the nodes' weights (None: the relations' alone);
    # every recorded step gets each of them (StepRecord.terms), guided or observed
    objective: Objective | None = None
    layout: LayoutSettings | None = None  # InfSplign Layout Boxes' settings, when the run has boxes

    @property
    def total_steps(self) -> int:
        return max(len(self.schedule) - 1, 0)

    def step_index(self, sigma: float) -> int | None:
        """The schedule step whose sigma this is (None for a sampler's sub-step)."""
        for i, s in enumerate(self.schedule[:-1]):
            if abs(s - sigma) <= SIGMA_TOLERANCE * max(abs(s), 1e-8):
                return i
        return None

    def record(self, sigma: float, schedule: Sequence[float], layers: Sequence[tuple[str, Tensor]],
               in_window: bool, applied: bool) -> StepRecord | None:
        """Keep one step's maps; a later prediction at the same schedule sigma replaces an
        earlier one (second-order samplers evaluate some sigmas twice)."""
        if not self.schedule:
            self.schedule = tuple(float(s) for s in schedule)
        index = self.step_index(sigma)
        if index is None or not layers:
            return None
        self.batch = max(self.batch, layers[0][1].shape[0])
        maps, centres, loss, spatial = summarise(layers, self.pairs, self.settings)
        terms = term_losses(layers, self.objective if self.objective is not None else Objective(self.pairs), loss)
        rec = StepRecord(index, sigma, maps, centres, loss, spatial, in_window, applied, terms)
        self.steps[index] = rec
        return rec

    def ordered(self) -> list[StepRecord]:
        return [self.steps[i] for i in sorted(self.steps)]

    def deltas(self, rec: StepRecord) -> Tensor:
        """(B', P) signed offsets Delta of each relation on the step's centroids (> margin: holds)."""
        c = rec.centroids
        return torch.stack([offsets(c[:, p.a], c[:, p.b], p.relation)[0] for p in self.pairs], dim=-1)


class Trace:
    """The last `max_runs` finished runs of one captured model, newest last."""

    def __init__(self, relations: SpatialRelations, max_runs: int = MAX_RUNS):
        self.objects = object_names(relations)
        self.pairs = object_slots(relations)[1]
        self.boxes = tuple(zip(box_slots(relations), (b.box.corners for b in relations.boxes)))
        self.layout = relations.layout if relations.boxes else None
        self.runs: deque[RunTrace] = deque(maxlen=max_runs)

    def start(self, settings: LossSettings, guided: bool, objective: Objective | None = None) -> RunTrace:
        """A run to fill; it joins the trace only through `finish`. `objective`: the terms
        that guide its steps (default: the relations')."""
        return RunTrace(self.objects, self.pairs, settings, guided, boxes=self.boxes, objective=objective,
                        layout=self.layout)

    def finish(self, run: RunTrace, output: Tensor) -> None:
        run.fingerprint = fingerprint(output)
        self.runs.append(run)

    def find(self, latent: Tensor) -> RunTrace | None:
        """The newest finished run whose output is exactly `latent`."""
        key = fingerprint(latent)
        for run in reversed(self.runs):
            if run.fingerprint == key:
                return run
        return None


def choose_steps(spec: str, recorded: Sequence[int], count: int = AUTO_STEPS) -> list[int]:
    """The step indices a preview shows: "auto" = `count` evenly spaced recorded steps (first
    and last included), else a comma list such as "0, 2, 4". Raises ValueError naming the
    recorded steps when the list asks for others."""
    recorded = sorted(recorded)
    if not recorded:
        raise ValueError("no step of this run was recorded.")
    text = spec.strip().lower()
    if text in ("", "auto"):
        if len(recorded) <= count:
            return recorded
        picks = {round(i * (len(recorded) - 1) / (count - 1)) for i in range(count)}
        return [recorded[i] for i in sorted(picks)]
    try:
        wanted = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f'steps "{spec}": write "auto" or step numbers separated by commas, e.g. "0, 2, 4".') from None
    missing = [s for s in wanted if s not in recorded]
    if not wanted or missing:
        what = f'step {", ".join(map(str, missing))} was not recorded' if missing else "no step number given"
        raise ValueError(f'steps "{spec}": {what}; this run recorded steps {_ranges(recorded)} '
                         '(0 = first step). Use "auto" or some of those.')
    return list(dict.fromkeys(wanted))


def _ranges(values: Sequence[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
