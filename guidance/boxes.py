"""Layout boxes: where each object goes, as fractions of the image, and their loss terms.

- `parse_boxes`: the InfSplign Layout Boxes node's JSON, read as data only and checked
  (a list of {"object": words of the prompt, "box": [x0, y0, x1, y1]}, origin top-left).
- `plan_boxes`: boxes from relations ("A left of B": A in the left part, B in the right).
- the boxes as the box loss reads them (two near or overlapping boxes kept `box_margin`
  apart), and which boxes the placing burst pulls on: box_geometry.py.
- `box_masks`: each box's coverage of every cell of an attention map (fractions, so a box
  that covers a third of a 4 x 4 map's cell counts a third).
- loss terms per box on its object's map A (h x w, >= 0) and mask M:
  - "ilgd" (iLGD, after Chen et al.'s backward guidance): (1 - sum(A M) / sum(A))^2, the
    share of the object's attention outside its box, squared;
  - "maalign" (GOAL's masked attention alignment, Eqs. 12-14): (1 - max(A M)) + max(A (1 - M));
  - "peak": iLGD's term on the object's peak P = relu(A - mean(A)), the attention above its
    mean over the map: (1 - sum(P M) / sum(P))^2. A softened map (read at a high
    temperature) is mostly flat, so under "ilgd" an object sitting in its box still leaves
    most of its attention outside, and the loss keeps rewarding more attention inside: it
    grows the object to fill the box and presses it against the box's edges, bending its
    shape (and two near boxes' objects into each other). The peak of an object in its box
    lies in the box, so "peak" stops pulling there. Its gradient is larger for the same
    loss (the peak is a small part of the map), so its weights are smaller.
  - "peak_centre": "peak" plus the distance from the peak's centroid to the middle half of
    the box (0 once there). When an object forms wholly outside its box, the box's cells are
    below the map's mean, its peak is 0 there and "peak" has no gradient at all; the
    distance pulls such an object in from anywhere (peak_centre_terms).
- `injection_bias`: iLGD's attention injection, softmax(q k^T / sqrt(d) + nu_t M): a bias on
  the object tokens' logits at the query positions inside their box. nu_t is nu' times each
  token's logit range over the image (per head, at this step), so nu' is the same on a
  model with soft attention (SD, logits a few units apart) and with very sharp attention
  (the demo model, 30 apart); it acts only inside the injection window (high noise).
- `LayoutSettings.places`: the placing burst, the box terms descended by Adam on the latent
  at one early step (guidance/refine.refine_latent, engine/refine_hooks.with_placing), which
  moves objects into their boxes before their shapes form; the box loss of the later steps
  then only keeps them there. It leaves out boxes that overlap another much
  (box_geometry.placed_by_burst).
Pure torch, no ComfyUI.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention_stats import at_least_float32

BOX_LOSSES = ("none", "ilgd", "maalign", "peak", "peak_centre")
MAX_PLACING_ITERATIONS = 200  # as InfSplign Refine's iterations
PLACING_LEARNING_RATE = 0.03  # Adam's, in the model's input units (tuned; InfSplign Refine's default is GSN's 0.05)
CENTRE_ZONE = 0.5  # "peak_centre": the peak's centroid may lie anywhere in the middle half of the box
MAX_BOXES = 16
EPS = 1e-8


class BoxError(ValueError):
    """Boxes that cannot be used; the message names the value and the fix."""


@dataclass(frozen=True)
class Box:
    """An object of the prompt and where it goes: fractions of the image, origin top-left."""

    object: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def corners(self) -> tuple[float, float, float, float]:
        return self.x0, self.y0, self.x1, self.y1

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2


@dataclass(frozen=True)
class BoundBox:
    """A box with its object's token positions in the encoded prompt."""

    box: Box
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class LayoutSettings:
    """The box settings of InfSplign Layout Boxes, carried with the relations."""

    injection: float = 0.0  # nu' of iLGD; 0 = no attention injection
    injection_end_percent: float = 0.0
    box_loss: str = "none"
    box_weight: float = 0.0
    box_end_percent: float = 0.0
    box_margin: float = 0.0  # the box loss reads boxes nearer than this kept this far apart (apart_boxes)
    # "placing": a burst of Adam steps on the latent at one early step, on the box terms
    # (guidance/refine.refine_latent), which moves objects into their boxes before shapes form
    placing_iterations: int = 0  # 0 = off
    placing_percent: float = 0.05  # the step of the burst, as a fraction of the schedule

    def __post_init__(self):
        problems = []
        if not math.isfinite(self.injection) or self.injection < 0:
            problems.append(f"injection is {self.injection}; use a number >= 0 (0 = off)")
        for name in ("injection_end_percent", "box_end_percent", "placing_percent"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                problems.append(f"{name} is {value}; use a fraction of the schedule in [0, 1]")
        if self.box_loss not in BOX_LOSSES:
            problems.append(f'box_loss "{self.box_loss}" is not one of {", ".join(BOX_LOSSES)}')
        if not math.isfinite(self.box_weight) or self.box_weight < 0:
            problems.append(f"box_weight is {self.box_weight}; use a number >= 0")
        if not (math.isfinite(self.box_margin) and 0.0 <= self.box_margin <= 0.5):
            problems.append(f"box_margin is {self.box_margin}; use a fraction of the image side in [0, 0.5] (0 = off)")
        if (isinstance(self.placing_iterations, bool) or not isinstance(self.placing_iterations, int)
                or not 0 <= self.placing_iterations <= MAX_PLACING_ITERATIONS):
            problems.append(f"placing_iterations is {self.placing_iterations}; use a whole number from 0 (off) to "
                            f"{MAX_PLACING_ITERATIONS}")
        if problems:
            raise BoxError("Layout box settings: " + "; ".join(problems) + ".")

    @property
    def active(self) -> bool:
        return self.injection > 0 or self.has_loss

    @property
    def has_loss(self) -> bool:
        return self.box_loss != "none" and self.box_weight > 0

    @property
    def places(self) -> bool:
        """Is there a placing burst (iterations, and a box loss for it to descend)?"""
        return self.placing_iterations > 0 and self.has_loss


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BoxError(f"{where} is {json.dumps(value)[:40]}; use a number between 0 and 1.")
    return float(value)


def parse_boxes(text: str) -> list[Box]:
    """The boxes of a `boxes` widget value (JSON text). Errors name the entry and the fix."""
    example = '[{"object": "red circle", "box": [0.05, 0.3, 0.45, 0.7]}]'
    try:
        data = json.loads(text) if text.strip() else []
    except (ValueError, RecursionError) as e:
        raise BoxError(f"boxes is not valid JSON ({e}); write a list such as {example}.") from None
    if not isinstance(data, list):
        raise BoxError(f"boxes must be a JSON list of boxes, such as {example}; got a {type(data).__name__}.")
    if len(data) > MAX_BOXES:
        raise BoxError(f"{len(data)} boxes; at most {MAX_BOXES} can be guided. Remove some.")
    boxes: list[Box] = []
    for i, entry in enumerate(data, 1):
        where = f"box {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("object"), str) or "box" not in entry:
            raise BoxError(f'{where} must be {{"object": "<words of the prompt>", "box": [x0, y0, x1, y1]}}.')
        name = " ".join(entry["object"].split())
        if not name:
            raise BoxError(f"{where} has an empty object; name words of the prompt.")
        corners = entry["box"]
        if not isinstance(corners, list) or len(corners) != 4:
            raise BoxError(f'{where} ("{name}"): "box" must be four numbers [x0, y0, x1, y1], fractions '
                           "of the image with the origin top-left.")
        x0, y0, x1, y1 = (_number(v, f'{where} ("{name}") corner {j}') for j, v in enumerate(corners))
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise BoxError(f'{where} ("{name}") is {[x0, y0, x1, y1]}: corners must lie in [0, 1] '
                           "(fractions of the image width and height).")
        if x0 >= x1 or y0 >= y1:
            raise BoxError(f'{where} ("{name}") is {[x0, y0, x1, y1]}: need x0 < x1 and y0 < y1 '
                           "(top-left corner first, then bottom-right).")
        if any(b.object.lower() == name.lower() for b in boxes):
            raise BoxError(f'"{name}" has two boxes; give each object one box.')
        boxes.append(Box(name, x0, y0, x1, y1))
    return boxes


# "A <relation> B" -> A's box and B's box (the documented planning rule).
PLANS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "left": ((0.04, 0.3, 0.44, 0.7), (0.56, 0.3, 0.96, 0.7)),
    "right": ((0.56, 0.3, 0.96, 0.7), (0.04, 0.3, 0.44, 0.7)),
    "above": ((0.3, 0.04, 0.7, 0.44), (0.3, 0.56, 0.7, 0.96)),
    "below": ((0.3, 0.56, 0.7, 0.96), (0.3, 0.04, 0.7, 0.44)),
    "near": ((0.14, 0.3, 0.5, 0.7), (0.5, 0.3, 0.86, 0.7)),
}


def plan_boxes(relations: Sequence[tuple[str, str, str]]) -> list[Box]:
    """Boxes for (A, relation, B) triplets: the first relation places both of its objects
    by PLANS (A left of B: A in the left 4-44 % of the width, B in the right 56-96 %, both
    at mid height, 40 % a side); a later relation places an object not yet placed, on the
    side of an already placed one that the relation names. An object keeps its first box."""
    placed: dict[str, Box] = {}
    for a, relation, b in relations:
        box_a, box_b = PLANS[relation]
        if a not in placed and b not in placed:
            placed[a], placed[b] = Box(a, *box_a), Box(b, *box_b)
        elif a not in placed:
            placed[a] = Box(a, *_beside(placed[b], relation).corners)
        elif b not in placed:
            placed[b] = Box(b, *_beside(placed[a], _OPPOSITE[relation]).corners)
    return list(placed.values())


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "near": "near"}


def _beside(anchor: Box, relation: str) -> Box:
    """A box of the anchor's size on the `relation` side of it, kept inside the image."""
    w, h = anchor.x1 - anchor.x0, anchor.y1 - anchor.y0
    dx = {"left": -1.2 * w, "right": 1.2 * w, "near": 1.0 * w}.get(relation, 0.0)
    dy = {"above": -1.2 * h, "below": 1.2 * h}.get(relation, 0.0)
    x0 = min(max(anchor.x0 + dx, 0.0), 1.0 - w)
    y0 = min(max(anchor.y0 + dy, 0.0), 1.0 - h)
    return Box(anchor.object, x0, y0, x0 + w, y0 + h)


def box_masks(boxes: Sequence[Box], h: int, w: int, like: Tensor) -> Tensor:
    """(len(boxes), h, w): the fraction of each map cell that each box covers, on `like`'s
    device in its float32-or-wider dtype. Made once per boxes, size and device (the box
    terms read them at every guided step); not to be changed in place."""
    if not boxes:
        return like.new_zeros(0, h, w)
    return _box_masks(tuple(boxes), h, w, like.device, at_least_float32(like).dtype)


@functools.lru_cache(maxsize=64)
def _box_masks(boxes: tuple[Box, ...], h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    def cover(lo: float, hi: float, n: int) -> Tensor:
        edges = torch.arange(n + 1, device=device, dtype=torch.float32) / n
        return (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp_min(0) * n
    with torch.inference_mode(False):  # normal tensors even inside inference mode: autograd saves them
        return torch.stack([cover(b.y0, b.y1, h)[:, None] * cover(b.x0, b.x1, w)[None, :] for b in boxes]).to(dtype)


def box_layer_loss(maps: Tensor, slots: Sequence[int], boxes: Sequence[Box], kind: str) -> Tensor:
    """Box loss of one layer per image: maps (B, K, h, w), box i on slot slots[i] -> (B,)."""
    maps = at_least_float32(maps)
    total = maps.new_zeros(maps.shape[0])
    if kind == "none" or not boxes:
        return total
    masks = box_masks(boxes, maps.shape[-2], maps.shape[-1], maps)
    if kind == "peak_centre":  # all boxes at once
        return total + peak_centre_terms(_slot_maps(maps, slots), masks, boxes).sum(dim=-1)
    for slot, mask in zip(slots, masks):
        a = maps[:, slot]
        if kind == "ilgd":
            inside = (a * mask).sum(dim=(-2, -1)) / a.sum(dim=(-2, -1)).clamp_min(EPS)
            total = total + (1.0 - inside) ** 2
        elif kind == "peak":
            peak = (a - a.mean(dim=(-2, -1), keepdim=True)).clamp_min(0.0)
            inside = (peak * mask).sum(dim=(-2, -1)) / peak.sum(dim=(-2, -1)).clamp_min(EPS)
            total = total + (1.0 - inside) ** 2
        elif kind == "maalign":
            total = total + (1.0 - (a * mask).amax(dim=(-2, -1))) + (a * (1.0 - mask)).amax(dim=(-2, -1))
        else:
            raise ValueError(f'box loss "{kind}" is not one of {", ".join(BOX_LOSSES)}.')
    return total


def _slot_maps(maps: Tensor, slots: Sequence[int]) -> Tensor:
    """maps[:, slots] (B, n, h, w): a view when the slots are consecutive (the usual case),
    without making an index tensor on the maps' device at every step."""
    slots = tuple(slots)
    if slots == tuple(range(slots[0], slots[0] + len(slots))):
        return maps[:, slots[0]:slots[0] + len(slots)]
    return torch.stack([maps[:, s] for s in slots], dim=1)


def peak_centre_terms(maps: Tensor, masks: Tensor, boxes: Sequence[Box]) -> Tensor:
    """(B, n) "peak_centre" terms of n objects' maps (B, n, h, w) and their boxes' masks
    (n, h, w): the "peak" term (1 - share of the peak P inside the box)^2 plus the distance
    from P's centroid to the middle CENTRE_ZONE of its box (0 inside it). The peak term alone
    has no gradient when the whole peak lies outside the box (the box's cells are below the
    mean, so P is 0 there); the distance pulls such an object toward its box from anywhere,
    and stops once its peak is centred enough, so it never presses on the box's edges."""
    h, w = maps.shape[-2:]
    x, y, centre, half = _centre_zone(tuple(boxes), h, w, maps.device, maps.dtype)
    peak = (maps - maps.mean(dim=(-2, -1), keepdim=True)).clamp_min(0.0)
    mass = peak.sum(dim=(-2, -1)).clamp_min(EPS)  # (B, n)
    share = (peak * masks).sum(dim=(-2, -1)) / mass
    centroid = torch.stack(((peak.sum(dim=-2) * x).sum(dim=-1), (peak.sum(dim=-1) * y).sum(dim=-1)), dim=-1)
    centroid = centroid / mass[..., None]  # (B, n, 2) as (x, y)
    out = ((centroid - centre).abs() - half).clamp_min(0.0)
    distance = (out.square().sum(dim=-1) + EPS).sqrt() - EPS ** 0.5
    return (1.0 - share) ** 2 + distance


@functools.lru_cache(maxsize=64)
def _centre_zone(boxes: tuple[Box, ...], h: int, w: int, device: torch.device, dtype: torch.dtype):
    """The map cells' centres x (w,) and y (h,) as fractions of the image, and the boxes'
    centres and CENTRE_ZONE half-sizes (n, 2): made once per run, not per step."""
    with torch.inference_mode(False):  # normal tensors even inside inference mode: autograd saves them
        x = ((torch.arange(w, dtype=torch.float64) + 0.5) / w).to(device=device, dtype=dtype)
        y = ((torch.arange(h, dtype=torch.float64) + 0.5) / h).to(device=device, dtype=dtype)
        corners = torch.tensor([b.corners for b in boxes], dtype=torch.float64)
        centre = ((corners[:, :2] + corners[:, 2:]) / 2).to(device=device, dtype=dtype)
        half = ((corners[:, 2:] - corners[:, :2]) / 2 * CENTRE_ZONE).to(device=device, dtype=dtype)
    return x, y, centre, half


def inside_share(maps: Tensor, slots: Sequence[int], boxes: Sequence[Box]) -> Tensor:
    """(B, len(boxes)): the share of each object's attention that lies in its box (for logs)."""
    maps = at_least_float32(maps)
    masks = box_masks(boxes, maps.shape[-2], maps.shape[-1], maps)
    shares = [(maps[:, s] * m).sum(dim=(-2, -1)) / maps[:, s].sum(dim=(-2, -1)).clamp_min(EPS)
              for s, m in zip(slots, masks)]
    return torch.stack(shares, dim=-1) if shares else maps.new_zeros(maps.shape[0], 0)


def injection_bias(logits: Tensor, columns: Sequence[int] | Tensor, masks: Tensor, strength: float) -> Tensor:
    """Additive logits bias (B, H, N, T) of iLGD's injection: for object token columns[i],
    strength times that token's logit range over the N query positions (per image and head,
    not differentiated) at the positions its box covers (masks (len(columns), N)). `columns`
    may be a long tensor on the logits' device (made once per run)."""
    bias = torch.zeros_like(logits)
    if strength <= 0 or not len(columns):
        return bias
    index = columns if isinstance(columns, Tensor) else torch.tensor(list(columns), device=logits.device)
    picked = logits.detach().index_select(-1, index)  # (B, H, N, J)
    spread = picked.amax(dim=-2, keepdim=True) - picked.amin(dim=-2, keepdim=True)  # (B, H, 1, J)
    bias.index_add_(-1, index, strength * spread * masks.t().to(logits.dtype)[None, None])
    return bias


def injection_delta(q: Tensor, k: Tensor, v: Tensor, heads: int, columns: Sequence[int], masks: Tensor,
                    strength: float) -> Tensor:
    """What iLGD's injection changes in an attention layer's output: softmax(l + bias) v -
    softmax(l) v, l = q k^T / sqrt(d), bias = injection_bias. (B, N, H*d), added to the output
    of whatever computed the layer (another pack's attention patch included), in float32
    and cast back. masks: (len(columns), N) box coverage of each query position."""
    b, n, inner = q.shape
    d = inner // heads
    qh = at_least_float32(q).view(b, n, heads, d).transpose(1, 2)
    kh = at_least_float32(k).view(b, -1, heads, d).transpose(1, 2)
    vh = at_least_float32(v).view(b, -1, heads, d).transpose(1, 2)
    logits = (qh @ kh.transpose(-1, -2)) * d ** -0.5
    bias = injection_bias(logits, columns, masks, strength)
    delta = (torch.softmax(logits + bias, dim=-1) - torch.softmax(logits, dim=-1)) @ vh
    return delta.transpose(1, 2).reshape(b, n, inner).to(q.dtype)
