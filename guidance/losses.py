"""InfSplign's losses on attention statistics (ALGORITHM.md section 4).

Per relation <A, R, B> and layer:
    lambda_s * f(alpha (m - Delta)) + lambda_o * |delta|^p + lambda_level * (presence | balance)
with Delta the signed offset that must exceed the margin m, delta the offset on the
orthogonal axis, presence = s2_A + s2_B on the coarse level and balance = |s2_A - s2_B|
on the other levels. The step loss is the mean over layers, summed over the batch and
over the relations of the prompt. Every function takes the maps of one layer (B, K, h, w) or
of a group of layers at once (L, B, K, h, w): a group is computed in one pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_stats import at_least_float32, object_stats
from .boxes import box_layer_loss
from .presence import presence_loss, separation_loss

ACTIVATIONS = ("sigmoid", "relu", "leaky_relu", "gelu")
ORTHOGONAL = {"none": 0, "l1": 1, "l2": 2}
NEAR_RADIUS = 0.5  # "near": centroids closer than NEAR_RADIUS - margin (image widths)


@dataclass(frozen=True)
class LossSettings:
    """Loss hyper-parameters; defaults are the thesis' best sigmoid setting."""

    activation: str = "sigmoid"
    alpha: float = 8.0
    margin: float = 0.0
    orthogonal: str = "none"
    spatial_weight: float = 1.0
    orthogonal_weight: float = 1.0
    presence_weight: float = 1.0
    balance_weight: float = 1.0
    threshold: bool = False
    leaky_slope: float = 0.05
    temperature: float = 1.0  # softmax temperature of the maps the loss reads (capture.token_maps)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f'loss "{self.activation}" is not one of {", ".join(ACTIVATIONS)}.')
        if self.orthogonal not in ORTHOGONAL:
            raise ValueError(f'orthogonal term "{self.orthogonal}" is not one of {", ".join(ORTHOGONAL)}.')


@dataclass(frozen=True)
class Pair:
    """Relation between object slots a and b of the maps tensor (a is `relation` of b)."""

    a: int
    b: int
    relation: str


def activation(z: Tensor, s: LossSettings) -> Tensor:
    """f(z) for f in {sigmoid, relu, leaky_relu, gelu}."""
    if s.activation == "sigmoid":
        return torch.sigmoid(z)
    if s.activation == "relu":
        return F.relu(z)
    if s.activation == "leaky_relu":
        return F.leaky_relu(z, s.leaky_slope)
    return F.gelu(z)


def offsets(ca: Tensor, cb: Tensor, relation: str) -> tuple[Tensor, Tensor | None]:
    """(Delta, delta) of ALGORITHM.md's table for centroids (..., 2) of A and B.

    Delta > margin means the relation holds; delta is the orthogonal offset (None for near).
    """
    xa, ya, xb, yb = ca[..., 0], ca[..., 1], cb[..., 0], cb[..., 1]
    if relation == "left":
        return xb - xa, ya - yb
    if relation == "right":
        return xa - xb, ya - yb
    if relation == "above":
        return yb - ya, xa - xb
    if relation == "below":
        return ya - yb, xa - xb
    if relation == "near":
        # Closeness as a margin: Delta = R - |c_A - c_B|, so Delta > m <=> distance < R - m.
        return NEAR_RADIUS - torch.linalg.vector_norm(ca - cb, dim=-1), None
    raise ValueError(f'relation "{relation}" is not one of left, right, above, below, near.')


def spatial_loss(delta: Tensor, s: LossSettings) -> Tensor:
    """L_s = f(alpha (m - Delta))."""
    return activation(s.alpha * (s.margin - delta), s)


def orthogonal_loss(delta: Tensor | None, s: LossSettings) -> Tensor | float:
    """L_o = |delta|^p, p from {none: 0 (off), l1: 1, l2: 2}."""
    p = ORTHOGONAL[s.orthogonal]
    if p == 0 or delta is None:
        return 0.0
    return delta.abs() ** p


def _layers(maps: Tensor) -> Tensor:
    """One layer's maps (B, K, h, w) or a group's (L, B, K, h, w), as (L, B, K, h, w)."""
    return maps.unsqueeze(0) if maps.dim() == 4 else maps


def _per_image(fn, maps: Tensor, *args) -> Tensor:
    """fn of (N, K, h, w) -> (N,) applied to (L, B, K, h, w): (L, B)."""
    return fn(maps.reshape(-1, *maps.shape[-3:]), *args).view(maps.shape[:2])


def relation_terms(maps: Tensor, pairs: Sequence[Pair], level: str, s: LossSettings) -> tuple[Tensor, Tensor]:
    """The relation terms of maps (..., K, h, w) of K object slots, per leading index:
    (all of them, the spatial term alone), each (...)."""
    if not pairs:
        zeros = maps.new_zeros(maps.shape[:-3], dtype=torch.promote_types(maps.dtype, torch.float32))
        return zeros, zeros
    c, s2 = object_stats(at_least_float32(maps), s.threshold)
    total = spatial = c.new_zeros(c.shape[:-2])
    for p in pairs:
        big_delta, small_delta = offsets(c[..., p.a, :], c[..., p.b, :], p.relation)
        term = s.spatial_weight * spatial_loss(big_delta, s)
        spatial = spatial + term
        total = total + term
        total = total + s.orthogonal_weight * orthogonal_loss(small_delta, s)
        if level == "coarse":
            total = total + s.presence_weight * (s2[..., p.a] + s2[..., p.b])
        else:
            total = total + s.balance_weight * (s2[..., p.a] - s2[..., p.b]).abs()
    return total, spatial


def layer_loss(maps: Tensor, pairs: Sequence[Pair], level: str, s: LossSettings) -> Tensor:
    """Loss of one layer per image, maps (B, K, h, w) of K object slots -> (B,) (or of a
    group of layers, (L, B, K, h, w) -> (L, B))."""
    return relation_terms(maps, pairs, level, s)[0]


def step_loss(layers: Sequence[tuple[str, Tensor]], pairs: Sequence[Pair], s: LossSettings) -> Tensor:
    """Mean over layers of the layer losses, summed over the batch: a scalar. `layers`:
    (level, maps) of one layer (B, K, h, w) or of a group of layers (L, B, K, h, w) each."""
    if not layers:
        raise ValueError("no attention maps were captured for this step.")
    per_layer = torch.cat([layer_loss(_layers(maps), pairs, level, s) for level, maps in layers])
    return per_layer.mean(dim=0).sum()


@dataclass(frozen=True)
class Objective:
    """What one guided step's (or refinement iteration's) loss sums: the relations' terms
    (pairs of map slots, times relation_weight), the boxes' terms (box i on map slot
    box_slots[i], times box_weight), and the presence and separation terms of the objects
    on map slots `objects` (guidance/presence.py, times their weights)."""

    pairs: tuple[Pair, ...] = ()
    box_slots: tuple[int, ...] = ()
    boxes: tuple = ()  # guidance.boxes.Box, one per slot in box_slots
    box_loss: str = "none"
    box_weight: float = 0.0
    objects: tuple[int, ...] = ()
    presence: float = 0.0
    separation: float = 0.0
    relation_weight: float = 1.0

    @property
    def has_boxes(self) -> bool:
        return bool(self.boxes) and self.box_loss != "none" and self.box_weight > 0

    @property
    def has_relations(self) -> bool:
        return bool(self.pairs) and self.relation_weight > 0

    @property
    def has_presence(self) -> bool:
        return bool(self.objects) and self.presence > 0

    @property
    def has_separation(self) -> bool:
        return len(self.objects) > 1 and self.separation > 0

    @property
    def empty(self) -> bool:
        return not (self.has_relations or self.has_boxes or self.has_presence or self.has_separation)


@dataclass
class Terms:
    """One step's loss, and its terms per image (B,) as the loss weighs them, each the mean
    over the captured layers: "relations" (all the relations' terms, times relation_weight),
    "spatial" (their spatial term alone, the thesis' loss-reduction measure), "boxes",
    "presence", "separation" (those present)."""

    loss: Tensor
    per_image: dict[str, Tensor]


def box_map_sizes(sizes: Sequence[Sequence[int]]) -> frozenset[tuple[int, int]]:
    """The map sizes (h, w) the box terms read: every captured size but the coarsest when the
    step's maps come at more than one size. On a map a few cells wide a box covers about one
    cell, its peak cannot lie inside it, and the term keeps pulling the object against the box
    (on the demo model the UNet's coarse 4 x 4 maps bent shapes and pressed near objects into
    each other without placing more; demo_world/tuning_log.txt). One size (an MMDiT's token
    grid, or one UNet level captured) is always read."""
    unique = {(int(h), int(w)) for h, w in sizes}
    if len(unique) > 1:
        unique.discard(min(unique, key=lambda hw: hw[0] * hw[1]))
    return frozenset(unique)


def objective_terms(layers: Sequence[tuple[str, Tensor]], objective: Objective, s: LossSettings) -> Terms:
    """The objective on a step's maps: per layer the relation terms times relation_weight,
    plus the presence, separation and box terms times their weights (the box terms on the
    layers of box_map_sizes); the loss is the mean
    over layers, summed over the batch. `layers`: (level, maps) of one layer (B, K, h, w) or
    of a group of layers with equal maps (L, B, K, h, w) each (capture.CaptureStore.take),
    computed a group at a time."""
    if not layers:
        raise ValueError("no attention maps were captured for this step.")
    totals, parts = [], {}
    boxed = box_map_sizes([maps.shape[-2:] for _, maps in layers]) if objective.has_boxes else frozenset()

    def part(name: str, value: Tensor) -> None:
        parts.setdefault(name, []).append(value)
    for level, maps in layers:
        maps = at_least_float32(_layers(maps))
        total, spatial = relation_terms(maps, objective.pairs, level, s)
        if objective.relation_weight != 1.0:
            total = objective.relation_weight * total
        if objective.pairs:
            part("spatial", spatial)
            part("relations", total)
        if objective.has_presence:
            term = objective.presence * _per_image(presence_loss, maps, objective.objects)
            part("presence", term)
            total = total + term
        if objective.has_separation:
            term = objective.separation * _per_image(separation_loss, maps, objective.objects)
            part("separation", term)
            total = total + term
        if tuple(maps.shape[-2:]) in boxed:
            term = objective.box_weight * _per_image(box_layer_loss, maps, objective.box_slots, objective.boxes,
                                                     objective.box_loss)
            part("boxes", term)
            total = total + term
        elif boxed:  # a layer the box terms skip counts as 0 in their mean, as in the loss's
            part("boxes", torch.zeros_like(total))
        totals.append(total)
    mean = (lambda ts: (ts[0] if len(ts) == 1 else torch.cat(ts)).mean(dim=0))  # noqa: E731
    return Terms(mean(totals).sum(), {name: mean(values) for name, values in parts.items()})


def objective_loss(layers: Sequence[tuple[str, Tensor]], objective: Objective, s: LossSettings) -> Tensor:
    """Mean over layers of the relation terms plus box_weight times the box terms (plus the
    presence and separation terms), summed over the batch: a scalar (step_loss when there
    is nothing but relations)."""
    return objective_terms(layers, objective, s).loss


def relation_holds(maps: Tensor, pairs: Sequence[Pair], s: LossSettings) -> Tensor:
    """(B, len(pairs)) booleans: Delta > margin on these maps (for logs and tests)."""
    c, _ = object_stats(at_least_float32(maps), s.threshold)
    return torch.stack([offsets(c[..., p.a, :], c[..., p.b, :], p.relation)[0] > s.margin for p in pairs], dim=-1)
