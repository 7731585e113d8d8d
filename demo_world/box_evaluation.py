"""Layout-box prompts for the demo model and their scores: is each object in its box, and whole?

A box prompt names two objects and no relation ("a red circle and a blue square") and gives
each a box. Three layout sets draw the boxes (LAYOUTS):
- "object-sized": the world's own placement rule (world.place: uniformly random,
  non-overlapping, 30 to 44 px of 128 a side, the objects' own sizes, at least 6 px apart);
- "wide": square boxes of 0.24 to 0.40 of the side, anywhere, not overlapping;
- "near": as "wide", the two boxes at most 0.05 of the side apart (0 = edges touching);
- "overlapping" (not one of the three sets the README's targets are measured on): as
  "wide", the two boxes overlapping.
The three sets name the same object pairs (drawn as they always were); only the boxes differ.
Per object: is the detected object's centre inside its box, the IoU of its detected box with
the requested one (0 when it is not detected), and its shape fidelity (shape_fidelity.py:
the blob of its colour fits its named shape); per image: are both objects there (OA), and
do the two touch or merge. Tuning and evaluation use disjoint object pairs, their own layout
seeds and noise seeds.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from . import scorer, shape_fidelity, world

TUNING_PROMPT_SEED, EVAL_PROMPT_SEED = 303, 404
TUNING_NOISE_SEED, EVAL_NOISE_SEED = 2000, 9
# Box tuning pools these: one seed gives only the batch's four initial noises, shared by every
# prompt, and a setting tuned on one seed was seen to fit those four (tuning_log.txt).
TUNING_NOISE_SEEDS = (TUNING_NOISE_SEED, 2001, 2002)
LAYOUTS = ("object-sized", "wide", "near", "overlapping")
WIDE_SIDE = (0.24, 0.40)  # box side, fraction of the image side
NEAR_GAP = 0.05  # "near": the boxes at most this far apart, fraction of the image side


@dataclass(frozen=True)
class BoxPrompt:
    a: tuple[str, str]  # (colour, shape)
    b: tuple[str, str]
    box_a: tuple[float, float, float, float]  # fractions of the image, origin top-left
    box_b: tuple[float, float, float, float]

    @property
    def text(self) -> str:
        return f"a {self.a[0]} {self.a[1]} and a {self.b[0]} {self.b[1]}"

    @property
    def boxes_json(self) -> str:
        return json.dumps([{"object": " ".join(self.a), "box": [round(v, 4) for v in self.box_a]},
                           {"object": " ".join(self.b), "box": [round(v, 4) for v in self.box_b]}])


def _pairs_and_world_boxes(seed: int, n: int, exclude: set[tuple] = frozenset()) -> list[BoxPrompt]:
    # every pair world.pick_objects can draw (two colours and two shapes, each differing), in order
    objects = [(c, s) for c in sorted(world.COLORS) for s in world.SHAPES]
    allowed = sum(1 for a in objects for b in objects if a[0] != b[0] and a[1] != b[1]
                  and (a, b) not in exclude and (b, a) not in exclude)
    if n > allowed:
        raise ValueError(f"{n} box prompts asked for, but only {allowed} object pairs are left once the other "
                         f"set's pairs are left out; ask for at most {allowed}.")
    rng = random.Random(seed)
    out: list[BoxPrompt] = []
    while len(out) < n:
        a, b = world.pick_objects(rng)
        if (a, b) in exclude or (b, a) in exclude or any((p.a, p.b) == (a, b) for p in out):
            continue
        scene = world.place(rng, a, b)
        frac = lambda t: tuple(v / world.IMAGE for v in t.box())  # noqa: E731
        out.append(BoxPrompt(a, b, frac(scene.a), frac(scene.b)))
    return out


def box_gap(p: tuple[float, ...], q: tuple[float, ...]) -> float:
    """Distance between two boxes (0 when they touch or overlap)."""
    dx = max(p[0] - q[2], q[0] - p[2], 0.0)
    dy = max(p[1] - q[3], q[1] - p[3], 0.0)
    return (dx * dx + dy * dy) ** 0.5


def overlap(p: tuple[float, ...], q: tuple[float, ...]) -> bool:
    return min(p[2], q[2]) > max(p[0], q[0]) and min(p[3], q[3]) > max(p[1], q[1])


def _random_box(rng: random.Random) -> tuple[float, float, float, float]:
    side = rng.uniform(*WIDE_SIDE)
    x0, y0 = rng.uniform(0.0, 1.0 - side), rng.uniform(0.0, 1.0 - side)
    return x0, y0, x0 + side, y0 + side


def layout_boxes(rng: random.Random, layout: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Two boxes of the "wide", "near" or "overlapping" layout set (uniform among those the
    set allows)."""
    while True:
        p, q = _random_box(rng), _random_box(rng)
        if layout == "overlapping":
            if overlap(p, q):
                return p, q
        elif not overlap(p, q) and (layout == "wide" or box_gap(p, q) <= NEAR_GAP):
            return p, q


def _prompts(seed: int, n: int, layout: str, exclude: set[tuple] = frozenset()) -> list[BoxPrompt]:
    """n box prompts: the object pairs of the seed (the same in every layout set), with the
    layout set's boxes."""
    if layout not in LAYOUTS:
        raise ValueError(f'layout set "{layout}" is not one of {", ".join(LAYOUTS)}')
    prompts = _pairs_and_world_boxes(seed, n, exclude)
    if layout == "object-sized":
        return prompts
    rng = random.Random(f"{seed} {layout}")
    out = []
    for p in prompts:
        box_a, box_b = layout_boxes(rng, layout)
        out.append(BoxPrompt(p.a, p.b, tuple(round(v, 4) for v in box_a), tuple(round(v, 4) for v in box_b)))
    return out


def prompt_sets(n_eval: int, n_tune: int, layout: str = "object-sized") -> tuple[list[BoxPrompt], list[BoxPrompt]]:
    """(evaluation, tuning) of a layout set: no object pair of one set is in the other."""
    evaluation = _prompts(EVAL_PROMPT_SEED, n_eval, layout)
    return evaluation, _prompts(TUNING_PROMPT_SEED, n_tune, layout, {(p.a, p.b) for p in evaluation})


@dataclass(frozen=True)
class ObjectScore:
    detected: bool  # the detector finds it (colour and shape)
    inside: bool  # the detected centre lies inside the requested box
    iou: float
    intact: bool = False  # its colour's blob has its named shape (shape_fidelity)
    shape_iou: float = 0.0  # IoU of that blob with its best-fitting named shape


@dataclass(frozen=True)
class ImageScore:
    a: ObjectScore
    b: ObjectScore
    touching: bool  # the two objects touch or merged (shape_fidelity.joined)

    def __iter__(self):  # a, b = score
        return iter((self.a, self.b))


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def score_object(detections, thing: tuple[str, str], box: tuple[float, ...], size: int,
                 shape: shape_fidelity.ObjectShape | None = None) -> ObjectScore:
    intact, shape_iou = (shape.intact, shape.iou) if shape is not None else (False, 0.0)
    d = scorer.find(detections, *thing)
    if d is None:
        return ObjectScore(False, False, 0.0, intact, shape_iou)
    px = tuple(v * size for v in box)
    inside = px[0] <= d.cx <= px[2] and px[1] <= d.cy <= px[3]
    return ObjectScore(True, inside, iou(tuple(float(v) for v in d.box), px), intact, shape_iou)


def score_image(prompt: BoxPrompt, image) -> ImageScore:
    dets = scorer.detect(image)
    size = image.shape[0]
    shapes = shape_fidelity.image_shapes(image, (prompt.a, prompt.b))
    return ImageScore(score_object(dets, prompt.a, prompt.box_a, size, shapes.objects[0]),
                      score_object(dets, prompt.b, prompt.box_b, size, shapes.objects[1]), shapes.touching)


def summary(scores: list[ImageScore]) -> dict[str, float]:
    """Percent of objects with their centre in their box, mean IoU (percent), OA; shape
    fidelity: percent of objects shape-intact, of objects in their box and intact, and of
    images whose two objects touch or merged."""
    objects = [o for pair in scores for o in pair]
    return {"inside": 100 * sum(o.inside for o in objects) / len(objects),
            "IoU": 100 * sum(o.iou for o in objects) / len(objects),
            "OA": 100 * sum(a.detected and b.detected for a, b in scores) / len(scores),
            "intact": 100 * sum(o.intact for o in objects) / len(objects),
            "placed_intact": 100 * sum(o.inside and o.intact for o in objects) / len(objects),
            "touching": 100 * sum(s.touching for s in scores) / len(scores)}
