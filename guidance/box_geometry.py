"""Where the box terms read the boxes, and which boxes the placing burst pulls on.

- `apart_boxes`: the boxes as the box loss reads them (the injection reads them as drawn):
  two near or overlapping boxes kept `box_margin` apart, their facing sides moved back,
  overlapping ones further the more they overlap, so their objects are not pulled into each
  other.
- `placed_by_burst`: the boxes Layout Boxes' placing burst pulls on, all but those that
  overlap another much (`overlap_share`): there is no room for both objects, and the burst,
  which moves objects fast, pressed them together.
Pure Python on guidance.boxes.Box, no ComfyUI.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from .boxes import Box


# apart_boxes moves a side back by at most this share of the box's extent. Only pairs that
# overlap much (or margins near 0.5) reach it: with half, a box read could keep half of the
# part two boxes share, the two objects were pulled together and merged (tuning_log.txt).
MAX_MARGIN_SHRINK = 0.9
# Two overlapping boxes are read with their centres as far apart as those of the same boxes
# side by side, this share of the margin apart. The margin alone left their centres closer
# the more they overlap (by half the overlap), and objects the size of their boxes met
# there (tuning_log.txt, "overlapping boxes, centres").
OVERLAP_SPACING = 0.25


def axis_gaps(p: Box, q: Box) -> tuple[float, float]:
    """The gap between two boxes along x and along y; negative: how far one must move along
    that axis to clear the other."""
    return max(p.x0 - q.x1, q.x0 - p.x1), max(p.y0 - q.y1, q.y0 - p.y1)


@functools.lru_cache(maxsize=64)
def apart_boxes(boxes: tuple[Box, ...], margin: float) -> tuple[Box, ...]:
    """The boxes the box loss reads: each pair of boxes that lie less than `margin` apart
    (fractions of the image), or overlap, has its facing sides moved back, half the
    shortfall each, along the axis that separates them most, so the loss pulls the two
    objects toward their boxes' far sides and leaves a gap between them. An overlapping
    pair moves back further, by the overlap plus OVERLAP_SPACING * margin each, when that is
    more: its centres read then lie as far apart as those of the two boxes drawn side by
    side, OVERLAP_SPACING * margin apart, however much they overlap. A side moves back by at
    most MAX_MARGIN_SHRINK of its box's extent, so the result lies inside the boxes as drawn
    (a strip along the far side, where the boxes overlap much) and two boxes that overlap
    almost wholly may still overlap as read."""
    if margin <= 0 or len(boxes) < 2:
        return boxes
    cut = [[0.0, 0.0, 0.0, 0.0] for _ in boxes]  # how far each side moves in: x0, y0, x1, y1
    for i, p in enumerate(boxes):
        for j, q in enumerate(boxes):
            if j <= i:
                continue
            dx, dy = axis_gaps(p, q)
            if math.hypot(max(dx, 0.0), max(dy, 0.0)) >= margin:
                continue
            gap = max(dx, dy)
            shortfall = (margin - gap) / 2
            if gap < 0:  # overlapping by -gap: centres read as if side by side, OVERLAP_SPACING * margin apart
                shortfall = max(shortfall, OVERLAP_SPACING * margin - gap)
            (pc_x, pc_y), (qc_x, qc_y) = p.centre, q.centre
            if dx >= dy:  # side by side: p's right side faces q's left side, or the reverse
                side_p, side_q = (0, 2) if pc_x > qc_x else (2, 0)
            else:
                side_p, side_q = (1, 3) if pc_y > qc_y else (3, 1)
            cut[i][side_p] = max(cut[i][side_p], shortfall)
            cut[j][side_q] = max(cut[j][side_q], shortfall)
    out = []
    for b, (cx0, cy0, cx1, cy1) in zip(boxes, cut):
        w, h = (b.x1 - b.x0) * MAX_MARGIN_SHRINK, (b.y1 - b.y0) * MAX_MARGIN_SHRINK
        out.append(Box(b.object, b.x0 + min(cx0, w), b.y0 + min(cy0, h), b.x1 - min(cx1, w), b.y1 - min(cy1, h)))
    return tuple(out)


# The placing burst leaves out two boxes that overlap by more than this share of the smaller
# one's extent, along the axis where they overlap least: objects about the size of their boxes
# cannot both lie in them without meeting, and the burst, which moves objects fast, pressed
# them into each other (on tuning prompts whose boxes overlap by over 0.15 of the side, 13.8 %
# of the images touching with the burst, 1.2 without); the box loss of the later steps still
# guides them (tuning_log.txt, "overlapping boxes: keeping objects apart").
PLACING_MAX_OVERLAP = 0.4


def overlap_share(p: Box, q: Box) -> float:
    """How much two boxes overlap: the overlap along the axis where they overlap least, as a
    share of the smaller box's extent along it (0 when they do not overlap, 1 when one spans
    the other along both axes)."""
    dx, dy = axis_gaps(p, q)
    if dx >= 0 or dy >= 0:
        return 0.0
    if dx >= dy:
        return min(-dx / min(p.x1 - p.x0, q.x1 - q.x0), 1.0)
    return min(-dy / min(p.y1 - p.y0, q.y1 - q.y0), 1.0)


def placed_by_burst(boxes: Sequence[Box]) -> tuple[int, ...]:
    """The indices of the boxes the placing burst pulls on: all but those that overlap
    another box by more than PLACING_MAX_OVERLAP (overlap_share)."""
    left_out = {k for i, p in enumerate(boxes) for j, q in enumerate(boxes)
                if i < j and overlap_share(p, q) > PLACING_MAX_OVERLAP for k in (i, j)}
    return tuple(i for i in range(len(boxes)) if i not in left_out)
