"""Shape fidelity for the shapes world: is an object drawn whole, and are two objects apart?

The detector (scorer.py) names a blob a square when it fills 86.5 % of its bounding box,
else a circle unless it narrows toward the top: a square with rounded corners, a stretched
circle or a blob with a bite out of it still pass as something. This module is stricter.

- Per object, its blob is the largest component of its named colour (scorer's pixels and
  connectivity); it is shape-intact when the best-fitting ideal shape of its named kind
  covers it with an IoU of at least its shape's SHAPE_IOU_THRESHOLDS. The ideal shapes are the world's
  own (world._mask: width = height, a triangle apex up) at any size and centre: the fit
  searches sizes and centres around the blob's bounding box. An object that is not there
  is not intact.
- Per image, two named objects touch or merge when their blobs lie in one connected piece
  of the image's non-black pixels (8-connected): they touch, or a bridge of any colour
  (a mixed colour where they run into each other included) joins them. The world keeps
  objects at least world.GAP = 6 px apart, so an image of it never has this.

SHAPE_IOU_THRESHOLDS are calibrated per shape on unguided images of the box tuning prompts
(demo/evaluate_boxes.py --calibrate; the rule and the figures are in
demo_world/tuning_log.txt): the demo VAE rounds every shape (its triangles fit an ideal
triangle with an IoU of about 0.8, its circles an ideal circle with 0.95) and the model draws
a few shapes badly unguided too, so each threshold is where unguided objects of that shape
fall off, and guidance is judged by how many more fall below it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .scorer import MIN_AREA
from .world import COLORS, SHAPES

# Calibrated: demo_world/tuning_log.txt, "shape-fidelity thresholds".
SHAPE_IOU_THRESHOLDS = {"circle": 0.92, "square": 0.88, "triangle": 0.78}
_EIGHT = np.ones((3, 3), dtype=bool)
_SIZE_STEPS = np.linspace(0.85, 1.2, 15)  # sizes tried, times the bounding box's mean side
_SHIFTS = np.arange(-2.0, 2.01, 1.0)  # centre offsets tried, pixels, on each axis


def colour_codes(image: np.ndarray) -> np.ndarray:
    """(H, W) ints: red * 4 + green * 2 + blue of each pixel, channels thresholded at one half
    as scorer.detect does (0 = black)."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    bits = (img[..., :3] > 0.5).astype(np.int8)
    return bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]


def colour_blob(codes: np.ndarray, colour: str) -> np.ndarray | None:
    """Boolean mask of the largest component of `colour` (scorer.detect's components), or
    None when it has no component of at least scorer.MIN_AREA pixels."""
    r, g, b = COLORS[colour]
    labels, n = ndimage.label(codes == r * 4 + g * 2 + b)
    if n == 0:
        return None
    areas = np.bincount(labels.ravel())[1:]
    best = int(areas.argmax())
    if areas[best] < MIN_AREA:
        return None
    return labels == best + 1


def _ideal(shape: str, xs: np.ndarray, ys: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: np.ndarray) -> np.ndarray:
    """(N, H, W) masks of N ideal shapes (world._mask's geometry) at pixel centres xs, ys."""
    dx, dy, h = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None], size[:, None, None] / 2
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        t = (dy + h) / (2 * h)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def shape_iou(mask: np.ndarray, shape: str) -> float:
    """IoU of a blob with the best-fitting ideal `shape` (any size and centre near the blob's
    bounding box)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = ((x1 - x0) + (y1 - y0)) / 2
    pad = int(np.ceil(0.25 * side)) + 4
    top, left = max(y0 - pad, 0), max(x0 - pad, 0)
    crop = mask[top:y1 + pad, left:x1 + pad]
    gy, gx = np.mgrid[0:crop.shape[0], 0:crop.shape[1]].astype(np.float32) + 0.5
    sizes = side * _SIZE_STEPS
    ox, oy = np.meshgrid(_SHIFTS, _SHIFTS)
    cx0, cy0 = (x0 + x1) / 2 - left, (y0 + y1) / 2 - top
    cx = np.repeat(cx0 + ox.ravel(), len(sizes))
    cy = np.repeat(cy0 + oy.ravel(), len(sizes))
    size = np.tile(sizes, ox.size)
    ideal = _ideal(shape, gx, gy, cx, cy, size)
    inter = (ideal & crop[None]).sum(axis=(1, 2))
    union = (ideal | crop[None]).sum(axis=(1, 2))
    return float((inter / np.maximum(union, 1)).max())


@dataclass(frozen=True)
class ObjectShape:
    shape: str  # its named shape
    found: bool  # a blob of its colour is there
    iou: float  # IoU with the best-fitting ideal shape of its named kind (0 when not found)

    @property
    def intact(self) -> bool:
        return self.found and self.iou >= SHAPE_IOU_THRESHOLDS[self.shape]


def object_shape(codes: np.ndarray, thing: tuple[str, str]) -> tuple[ObjectShape, np.ndarray | None]:
    """The named object's (colour, shape) fidelity and its blob."""
    blob = colour_blob(codes, thing[0])
    if blob is None:
        return ObjectShape(thing[1], False, 0.0), None
    return ObjectShape(thing[1], True, shape_iou(blob, thing[1])), blob


def joined(codes: np.ndarray, blobs: list[np.ndarray]) -> bool:
    """Whether any two of the blobs lie in one 8-connected piece of non-black pixels."""
    if len(blobs) < 2:
        return False
    pieces, _ = ndimage.label(codes != 0, structure=_EIGHT)
    seen: set[int] = set()
    for blob in blobs:
        ids = set(np.unique(pieces[blob]).tolist()) - {0}
        if ids & seen:
            return True
        seen |= ids
    return False


@dataclass(frozen=True)
class ImageShapes:
    objects: tuple[ObjectShape, ...]
    touching: bool  # two named objects touch or merged


def image_shapes(image: np.ndarray, things) -> ImageShapes:
    """Fidelity of the named objects ((colour, shape) each) of one RGB image."""
    codes = colour_codes(image)
    results = [object_shape(codes, t) for t in things]
    blobs = [b for _, b in results if b is not None]
    return ImageShapes(tuple(s for s, _ in results), joined(codes, blobs))
