"""An exact detector for the shapes world and the VISOR metrics (Gokhale et al., 2022).

Detection: each pixel's colour is read by thresholding red, green and blue at one half;
the pixels of each palette colour are split into connected components; a component of at
least MIN_AREA pixels is classified by its shape (a triangle is much wider at the bottom
than at the top; a square fills its box, a circle about pi/4 of it). An object named in a
prompt is the largest component of its colour and shape, so an extra blob elsewhere does
not change the answer.

VISOR's rules: a relation holds when the centres of the two detected objects satisfy it
(left: x_a < x_b, above: y_a < y_b, image y grows downwards). OA is the share of images
with both objects; VISOR_uncond the share with both objects and the relation right;
VISOR_cond = VISOR_uncond / OA; VISOR_n the share of prompts right in at least n of their
images (4 seeds per prompt).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .world import COLORS

MIN_AREA = 60  # pixels at 128 px; the smallest trained shape covers about 450
_CODES = {tuple(v): k for k, v in COLORS.items()}


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    cx: float  # centre of mass, pixels
    cy: float
    area: int
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 of its pixels (x1, y1 exclusive)


def classify(mask: np.ndarray) -> str:
    """'circle' | 'square' | 'triangle' for one component's boolean mask (cropped or not)."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    area = len(ys)
    mid = (ys.min() + ys.max()) / 2
    top, bottom = (ys < mid).sum(), (ys > mid).sum()
    # Thresholds sit midway between the classes as the demo VAE decodes true shapes
    # (top/bottom: triangles 0.49-0.75, circles and squares 0.89-1.10; fill: circles
    # 0.73-0.82, squares 0.91-0.97); exact renderings are far from both (1/3, pi/4, 1).
    if top < 0.82 * max(bottom, 1):
        return "triangle"
    return "square" if area / (h * w) >= 0.865 else "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """All objects in an RGB image (H, W, 3) with values in [0, 1] (or 0..255)."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    bits = (img[..., :3] > 0.5).astype(np.int8)
    code = bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]
    found = []
    for rgb, name in _CODES.items():
        labels, n = ndimage.label(code == rgb[0] * 4 + rgb[1] * 2 + rgb[2])
        if n == 0:
            continue
        for i, obj in enumerate(ndimage.find_objects(labels), 1):
            comp = labels[obj] == i
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            cy, cx = ndimage.center_of_mass(comp)
            found.append(Detection(name, classify(comp), cx + obj[1].start, cy + obj[0].start, area,
                                   (obj[1].start, obj[0].start, obj[1].stop, obj[0].stop)))
    return found


def find(detections: list[Detection], color: str, shape: str) -> Detection | None:
    hits = [d for d in detections if d.color == color and d.shape == shape]
    return max(hits, key=lambda d: d.area) if hits else None


def find_by_color(detections: list[Detection], color: str) -> Detection | None:
    """The largest object of a colour, whatever its shape (for locating, not for scoring)."""
    hits = [d for d in detections if d.color == color]
    return max(hits, key=lambda d: d.area) if hits else None


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    if relation == "left":
        return a.cx < b.cx
    if relation == "right":
        return a.cx > b.cx
    if relation == "above":
        return a.cy < b.cy
    if relation == "below":
        return a.cy > b.cy
    raise ValueError(f"VISOR scores left, right, above and below, not {relation!r}")


@dataclass(frozen=True)
class Score:
    both: bool  # object accuracy: both objects detected
    correct: bool  # both detected and the relation holds


def score(image: np.ndarray, a: tuple[str, str], relation: str, b: tuple[str, str]) -> Score:
    dets = detect(image)
    da, db = find(dets, *a), find(dets, *b)
    both = da is not None and db is not None
    return Score(both, both and relation_holds(da, db, relation))


def visor(scores: list[list[Score]]) -> dict[str, float]:
    """VISOR metrics in percent; scores[prompt][seed]."""
    flat = [s for row in scores for s in row]
    n = len(flat)
    oa = sum(s.both for s in flat) / n
    uncond = sum(s.correct for s in flat) / n
    out = {"OA": 100 * oa, "VISOR_uncond": 100 * uncond,
           "VISOR_cond": 100 * uncond / oa if oa else 0.0}
    seeds = len(scores[0])
    for k in range(1, seeds + 1):
        out[f"VISOR_{k}"] = 100 * sum(sum(s.correct for s in row) >= k for row in scores) / len(scores)
    return out


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_seed_interval(unguided: list[list[Score]], guided: list[list[Score]], metric: str) -> tuple[float, float, float]:
    """Mean guided-minus-unguided difference of `metric` over seeds, with a 95% t interval
    from the per-seed paired differences (each seed: the same prompts and initial noise)."""
    seeds = len(unguided[0])
    diffs = []
    for s in range(seeds):
        u = visor([[row[s]] for row in unguided])[metric]
        g = visor([[row[s]] for row in guided])[metric]
        diffs.append(g - u)
    mean = sum(diffs) / seeds
    if seeds < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (seeds - 1))
    half = T_975.get(seeds - 1, 1.96) * sd / math.sqrt(seeds)
    return mean, mean - half, mean + half
