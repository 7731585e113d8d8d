"""Layout-box prompts for the demo model and their scores: is each object in its box?

A box prompt names two objects and no relation ("a red circle and a blue square"); its
boxes are drawn by the world's own placement rule (world.place: uniformly random,
non-overlapping, 30 to 44 px of 128 a side, the objects' own sizes). Per object: is the
detected object's centre inside its box, and the IoU of its detected box with the
requested one (0 when it is not detected); per image: are both objects there (OA).
Tuning and evaluation use disjoint prompts, their own layout seeds and noise seeds.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from . import scorer, world

TUNING_PROMPT_SEED, EVAL_PROMPT_SEED = 303, 404
TUNING_NOISE_SEED, EVAL_NOISE_SEED = 2000, 9


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


def _prompts(seed: int, n: int, exclude: set[tuple] = frozenset()) -> list[BoxPrompt]:
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


def prompt_sets(n_eval: int, n_tune: int) -> tuple[list[BoxPrompt], list[BoxPrompt]]:
    """(evaluation, tuning): no object pair of one set is in the other."""
    evaluation = _prompts(EVAL_PROMPT_SEED, n_eval)
    return evaluation, _prompts(TUNING_PROMPT_SEED, n_tune, {(p.a, p.b) for p in evaluation})


@dataclass(frozen=True)
class ObjectScore:
    detected: bool
    inside: bool  # the detected centre lies inside the requested box
    iou: float


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def score_object(detections, thing: tuple[str, str], box: tuple[float, ...], size: int) -> ObjectScore:
    d = scorer.find(detections, *thing)
    if d is None:
        return ObjectScore(False, False, 0.0)
    px = tuple(v * size for v in box)
    inside = px[0] <= d.cx <= px[2] and px[1] <= d.cy <= px[3]
    return ObjectScore(True, inside, iou(tuple(float(v) for v in d.box), px))


def score_image(prompt: BoxPrompt, image) -> tuple[ObjectScore, ObjectScore]:
    dets = scorer.detect(image)
    size = image.shape[0]
    return score_object(dets, prompt.a, prompt.box_a, size), score_object(dets, prompt.b, prompt.box_b, size)


def summary(scores: list[tuple[ObjectScore, ObjectScore]]) -> dict[str, float]:
    """Percent of objects with their centre in their box, mean IoU (percent), OA."""
    objects = [o for pair in scores for o in pair]
    return {"inside": 100 * sum(o.inside for o in objects) / len(objects),
            "IoU": 100 * sum(o.iou for o in objects) / len(objects),
            "OA": 100 * sum(a.detected and b.detected for a, b in scores) / len(scores)}
