"""Three-object prompts for InfSplign Refine on the demo model: is every named object drawn?

A presence prompt names three objects of distinct colours and the three shapes, and no
relation ("a green circle, a yellow square and a purple triangle"). Per image: which named
objects the detector finds (scorer.find: the largest component of the colour and shape),
and whether two objects fused. Tuning and evaluation prompts share no object triple and use
their own prompt and noise seeds.

Fused (for relation and presence prompts alike): a named object is missing while a blob of
its colour is there in another shape, or two named objects' blobs touch (their pixel boxes,
grown by one pixel, overlap): what the model draws when two objects run into one.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from . import scorer, world

TUNING_PROMPT_SEED, EVAL_PROMPT_SEED = 707, 808
TUNING_NOISE_SEED, EVAL_NOISE_SEED = 4000, 13
CHECK_PROMPT_SEED = 303  # demo/evaluate.py --presence: the unguided check of a model's weights


@dataclass(frozen=True)
class PresencePrompt:
    objects: tuple[tuple[str, str], ...]  # (colour, shape) each

    @property
    def text(self) -> str:
        names = [f"a {c} {s}" for c, s in self.objects]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"

    @property
    def objects_list(self) -> str:
        """Spatial Relation Parse's `objects` input for this prompt."""
        return ", ".join(f"{c} {s}" for c, s in self.objects)


def object_prompts(n: int, objects: int = 3, seed: int = CHECK_PROMPT_SEED) -> list[PresencePrompt]:
    """n distinct prompts naming `objects` objects, drawn as the world draws a scene's
    objects (world.pick_objects), from a fixed seed."""
    rng = random.Random(seed)
    out: list[PresencePrompt] = []
    while len(out) < n:
        p = PresencePrompt(world.pick_objects(rng, objects))
        if p not in out:
            out.append(p)
    return out


def _triples(seed: int, n: int, exclude=frozenset()) -> list[PresencePrompt]:
    rng = random.Random(seed)
    out: list[PresencePrompt] = []
    while len(out) < n:
        colours = rng.sample(sorted(world.COLORS), 3)
        shapes = rng.sample(world.SHAPES, 3)
        objects = tuple(zip(colours, shapes))
        key = frozenset(objects)
        if key in exclude or any(frozenset(p.objects) == key for p in out):
            continue
        out.append(PresencePrompt(objects))
    return out


def prompt_sets(n_eval: int, n_tune: int) -> tuple[list[PresencePrompt], list[PresencePrompt]]:
    """(evaluation, tuning): no object triple of one set is in the other."""
    evaluation = _triples(EVAL_PROMPT_SEED, n_eval)
    return evaluation, _triples(TUNING_PROMPT_SEED, n_tune, {frozenset(p.objects) for p in evaluation})


@dataclass(frozen=True)
class PresenceScore:
    found: int  # named objects detected
    named: int
    fused: bool

    @property
    def all_present(self) -> bool:
        return self.found == self.named


def _touch(a: scorer.Detection, b: scorer.Detection) -> bool:
    return a.box[0] - 1 < b.box[2] and b.box[0] - 1 < a.box[2] and a.box[1] - 1 < b.box[3] and b.box[1] - 1 < a.box[3]


def fused(detections, objects) -> bool:
    """Two named objects ran into one (the module's rule)."""
    found = [scorer.find(detections, c, s) for c, s in objects]
    for (c, _s), d in zip(objects, found):
        if d is None and scorer.find_by_color(detections, c) is not None:
            return True
    present = [d for d in found if d is not None]
    return any(_touch(a, b) for i, a in enumerate(present) for b in present[i + 1:])


def score_image(objects, image: np.ndarray) -> PresenceScore:
    dets = scorer.detect(image)
    found = sum(scorer.find(dets, c, s) is not None for c, s in objects)
    return PresenceScore(found, len(objects), fused(dets, objects))


def share(scores: list[list[PresenceScore]], what=lambda s: s.all_present) -> float:
    flat = [s for row in scores for s in row]
    return 100.0 * sum(bool(what(s)) for s in flat) / len(flat)


def paired_interval(base: list[list[PresenceScore]], other: list[list[PresenceScore]], what=lambda s: s.all_present,
                    resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean difference (other - base, percentage points) of the share with `what`, and a 95 %
    interval from a paired bootstrap over prompts (each prompt's seeds are the same initial
    noises in both arms, so prompts are the independent unit)."""
    per_prompt = [sum(bool(what(o)) - bool(what(b)) for b, o in zip(rb, ro)) / len(rb)
                  for rb, ro in zip(base, other)]
    n = len(per_prompt)
    mean = 100.0 * sum(per_prompt) / n
    rng = random.Random(seed)
    means = sorted(100.0 * sum(per_prompt[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo, hi = means[math.floor(0.025 * resamples)], means[math.ceil(0.975 * resamples) - 1]
    return mean, lo, hi
