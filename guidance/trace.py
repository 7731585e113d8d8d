"""What a sampling run's attention looked like, kept small for the preview.

Per recorded step: the objects' maps (mean over the captured layers, at one resolution of
at most MAX_SIDE pixels a side), their centroids (the loss's own statistics, mean over
layers), the loss and its spatial term per image, each term of the run's objective per image
(relations, boxes, presence, separation: `term_losses`), and whether the step was guided. Only
the first MAX_IMAGES images of a batch are kept, and a Trace keeps the last MAX_RUNS
finished runs. While a run samples, each step's maps stay as the capture computed them
(detached, on their device); when it finishes they are summarised, all steps together,
into float32 CPU tensors and numbers. Nothing holds a graph.

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
from .boxes import LayoutSettings
from .capture import box_slots, object_slots
from .losses import LossSettings, Objective, Pair, layer_loss, objective_terms, offsets
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
    """(maps, centroids, loss, spatial) of one step's captured layers [(level, maps)], maps
    of one layer (B, K, h, w) or of a group of layers (L, B, K, h, w) each: detached, the
    first `max_images` images, float32 on the CPU."""
    maps, centres, loss, spatial = summarise_steps([_grouped(layers, max_images)], pairs, settings)
    return maps[0], centres[0], loss[0], spatial[0]


def _grouped(layers: Sequence[tuple[str, Tensor]], max_images: int = MAX_IMAGES) -> tuple[tuple[str, Tensor], ...]:
    """A step's maps as groups (level, (L, B', K, h, w)), detached, the first images only."""
    out = []
    for level, m in layers:
        m = m.detach() if m.requires_grad else m
        m = m.unsqueeze(0) if m.dim() == 4 else m
        out.append((level, m[:, :max_images] if m.shape[1] > max_images else m))
    return tuple(out)


def summarise_steps(steps: Sequence[Sequence[tuple[str, Tensor]]], pairs: Sequence[Pair],
                    settings: LossSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """summarise for S steps whose groups have equal shapes, computed together: maps
    (S, B', K, h', w'), centroids (S, B', K, 2), loss and spatial term (S, B'), each the mean
    over the captured layers, float32 on the CPU."""
    spatial_only = replace(settings, orthogonal="none", presence_weight=0.0, balance_weight=0.0)
    with torch.no_grad():
        groups = [(level, at_least_float32(m).float()) for level, m in _stacked_steps(steps)]
        layers = sum(m.shape[1] for _, m in groups)
        loss = sum(layer_loss(m, pairs, level, settings).sum(dim=1) for level, m in groups) / layers
        spatial = sum(layer_loss(m, pairs, level, spatial_only).sum(dim=1) for level, m in groups) / layers
        centres = sum(object_stats(m, settings.threshold)[0].sum(dim=1) for _, m in groups) / layers
        size = display_size([tuple(m.shape[-2:]) for _, m in groups])
        maps = sum(_resampled(m, size).sum(dim=1) for _, m in groups) / layers
    return maps.cpu(), centres.cpu(), loss.cpu(), spatial.cpu()


def term_losses(layers: Sequence[tuple[str, Tensor]], objective: Objective, settings: LossSettings,
                max_images: int = MAX_IMAGES) -> dict[str, Tensor]:
    """Each term of `objective` per image (B',) (TERMS: relations, boxes, presence,
    separation; those it has), weighted as the objective's loss sums it and averaged over the
    layers: their sum is the objective's loss per image. `layers`: [(level, maps)] of one
    layer (B, K, h, w) or a group (L, B, K, h, w) each; `settings`: the relations' loss."""
    groups = [(level, m.unsqueeze(0)) for level, m in _grouped(layers, max_images)]  # (S=1, L, B', ...)
    return {name: t[0] for name, t in _terms(groups, objective, settings).items()}


def _terms(groups: Sequence[tuple[str, Tensor]], objective: Objective, settings: LossSettings) -> dict[str, Tensor]:
    """term_losses of S steps at once, groups (S, L, B', K, h, w) -> {term: (S, B')}."""
    s, b = groups[0][1].shape[0], groups[0][1].shape[2]
    with torch.no_grad():
        flat = [(level, at_least_float32(m.transpose(0, 1).reshape(m.shape[1], s * b, *m.shape[3:])).float())
                for level, m in groups]  # (L, S*B', K, h, w): the steps' images side by side
        per_image = objective_terms(flat, objective, settings).per_image
    return {name: per_image[name].view(s, b).cpu() for name in TERMS if name in per_image and (
        name != "relations" or objective.has_relations)}


def _stacked_steps(steps: Sequence[Sequence[tuple[str, Tensor]]]) -> list[tuple[str, Tensor]]:
    """Steps of equal group shapes as groups (level, (S, L, B', K, h, w))."""
    return [(level, torch.stack([step[g][1] for step in steps])) for g, (level, _) in enumerate(steps[0])]


def _resampled(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """resample over any leading dimensions: (..., K, h, w) -> (..., K, *size)."""
    lead = maps.shape[:-3]
    return resample(maps.reshape(-1, *maps.shape[-3:]), size).view(*lead, maps.shape[-3], *size)


@dataclass
class _Recorded:
    """A step as recorded during sampling: its maps on their device, summarised later."""

    index: int
    sigma: float
    layers: tuple[tuple[str, Tensor], ...]  # (level, (L, B', K, h, w)) detached
    in_window: bool
    applied: bool


@dataclass
class RunTrace:
    """One sampling run, filled step by step while it samples; `fingerprint` once finished.

    A step's maps are kept as the capture computed them (on their device, detached, the
    first MAX_IMAGES images) and summarised when the run finishes, all steps at once: the
    recording itself costs a step no operation and no wait for the device."""

    objects: tuple[str, ...]
    pairs: tuple[Pair, ...]
    settings: LossSettings  # the loss the plot shows (the guidance's, or the defaults when observing only)
    guided: bool = False  # a guidance node was on the model
    batch: int = 0
    schedule: tuple[float, ...] = ()  # the sampler's sigmas, the last one 0
    fingerprint: str = ""
    failed: str = ""  # why recording stopped, if it did
    boxes: tuple[tuple[int, tuple[float, float, float, float]], ...] = ()  # (map slot, x0, y0, x1, y1)
    refinement: object = None  # guidance.refine.RefineReport of InfSplign Refine's step, if it ran
    # the terms that guide the run's steps, with the nodes' weights (None: the relations' alone);
    # every recorded step gets each of them (StepRecord.terms), guided or observed
    objective: Objective | None = None
    layout: LayoutSettings | None = None  # InfSplign Layout Boxes' settings, when the run has boxes
    _recorded: dict[int, _Recorded] = field(default_factory=dict)
    _steps: dict[int, StepRecord] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return max(len(self.schedule) - 1, 0)

    @property
    def steps(self) -> dict[int, StepRecord]:
        """The recorded steps by schedule position (summarised on first use)."""
        if self._recorded:
            self.summarise()
        return self._steps

    def step_index(self, sigma: float) -> int | None:
        """The schedule step whose sigma this is (None for a sampler's sub-step)."""
        for i, s in enumerate(self.schedule[:-1]):
            if abs(s - sigma) <= SIGMA_TOLERANCE * max(abs(s), 1e-8):
                return i
        return None

    def record(self, sigma: float, schedule: Sequence[float], layers: Sequence[tuple[str, Tensor]],
               in_window: bool, applied: bool) -> int | None:
        """Keep one step's maps [(level, maps)] (one layer's (B, K, h, w) or a group's
        (L, B, K, h, w)); a later prediction at the same schedule sigma replaces an earlier
        one (second-order samplers evaluate some sigmas twice). Returns the step's index,
        None for a sampler's sub-step (not kept). `schedule`: the run's sigmas, read once."""
        if not self.schedule:
            self.schedule = tuple(float(s) for s in schedule)
        index = self.step_index(sigma)
        if index is None or not layers:
            return None
        self.batch = max(self.batch, layers[0][1].shape[-4])
        self._recorded[index] = _Recorded(index, sigma, _grouped(layers), in_window, applied)
        return index

    def summarise(self) -> None:
        """Turn the recorded steps into StepRecords (float32, on the CPU), steps of equal
        shapes together."""
        recorded, self._recorded = self._recorded, {}
        classes: dict[tuple, list[_Recorded]] = {}
        for rec in recorded.values():
            shape = tuple((level, tuple(m.shape)) for level, m in rec.layers)
            classes.setdefault(shape, []).append(rec)
        objective = self.objective if self.objective is not None else Objective(self.pairs)
        for recs in classes.values():
            steps = [r.layers for r in recs]
            maps, centres, loss, spatial = summarise_steps(steps, self.pairs, self.settings)
            terms = _terms(_stacked_steps(steps), objective, self.settings)
            for i, r in enumerate(recs):
                self._steps[r.index] = StepRecord(r.index, r.sigma, maps[i], centres[i], loss[i], spatial[i],
                                                  r.in_window, r.applied, {n: t[i] for n, t in terms.items()})

    def ordered(self) -> list[StepRecord]:
        steps = self.steps
        return [steps[i] for i in sorted(steps)]

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
        run.summarise()
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
