"""The shapes world of the demo model: one to three coloured shapes on black, captions
without relations.

Pure torch, no ComfyUI. Images are 128 px; latents are 16 x 16 x 4, the area average of
8 x 8 pixel cells: channels red, green, blue and "object here", each mapped to [-1, 1].
The objects of a scene differ in colour and in shape (so each word names one object; three
objects are the three shapes). A caption names every object in random order ("a red
circle", "a red circle and a blue square", "a green circle, a yellow square and a purple
triangle") and never says where they are, so a model trained on it places the objects
without regard to any "left of" or "above" in a prompt: the failure InfSplign is for.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE = 128
CELL = 8  # pixels per latent cell: the VAE's 1/8
LATENT = IMAGE // CELL
SUPERSAMPLE = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
    "yellow": (1, 1, 0), "purple": (1, 0, 1), "white": (1, 1, 1),
}
SHAPES = ("circle", "square", "triangle")
SIZE_RANGE = (30.0, 44.0)  # object width in pixels
MARGIN = 3.0  # pixels between an object and the image border
GAP = 6.0  # pixels between any two objects' boxes
MAX_OBJECTS = len(SHAPES)  # objects differ in shape

# Words placed between two object phrases in training captions. None of them names a
# place; the random vocabulary words added now and then teach the model to read past words
# it has never seen (such as "left of" at inference time).
CONNECTORS = ("and", "and", "and", "with", "plus", "and also", "together with", "as well as",
              "along with", "and then")
RESERVED = frozenset(COLORS) | frozenset(SHAPES) | frozenset("""
left right above below top bottom over under underneath beneath near next beside side front
behind up down upper lower
""".split())


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    cx: float  # centre, pixels
    cy: float
    size: float  # width and height of the shape's box, pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


@dataclass(frozen=True, init=False)
class Scene:
    """The objects of one image: Scene(a, b) or Scene(a), Scene(a, b, c)."""
    things: tuple[Thing, ...]

    def __init__(self, *things: Thing):
        if not 1 <= len(things) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, not {len(things)}")
        object.__setattr__(self, "things", tuple(things))

    @property
    def a(self) -> Thing:
        return self.things[0]

    @property
    def b(self) -> Thing:
        if len(self.things) < 2:
            raise AttributeError("a one-object scene has no object b")
        return self.things[1]


def pick_objects(rng: random.Random, n: int = 2) -> tuple[tuple[str, str], ...]:
    """n objects that differ in colour and in shape, so each word names one object
    (n = 2 draws exactly as the two-object world always did)."""
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"1 to {MAX_OBJECTS} objects, not {n}")
    colors = rng.sample(sorted(COLORS), n)
    shapes = rng.sample(SHAPES, n)
    return tuple(zip(colors, shapes))


def _separated(p: Thing, q: Thing) -> bool:
    pa, qa = p.box(), q.box()
    return (pa[2] + GAP <= qa[0] or qa[2] + GAP <= pa[0]
            or pa[3] + GAP <= qa[1] or qa[3] + GAP <= pa[1])


def all_separated(things) -> bool:
    return all(_separated(p, q) for i, p in enumerate(things) for q in things[i + 1:])


def place(rng: random.Random, *objects: tuple[str, str]) -> Scene:
    """Uniformly random, pairwise non-overlapping positions and sizes for the given objects."""
    while True:
        things = []
        for color, shape in objects:
            size = rng.uniform(*SIZE_RANGE)
            lo, hi = MARGIN + size / 2, IMAGE - MARGIN - size / 2
            things.append(Thing(color, shape, rng.uniform(lo, hi), rng.uniform(lo, hi), size))
        if all_separated(things):
            return Scene(*things)


def random_scene(rng: random.Random, n: int = 2) -> Scene:
    return place(rng, *pick_objects(rng, n))


def parse_counts(spec) -> tuple[int, ...]:
    """Objects-per-image choices: "2", "1-3" (1, 2 or 3 alike) or "1,2,2,3" (a list drawn
    from uniformly, so repeats weigh a count); an int or a tuple passes through."""
    if isinstance(spec, int):
        counts: tuple[int, ...] = (spec,)
    elif isinstance(spec, str):
        spec = spec.strip()
        if re.fullmatch(r"\d+-\d+", spec):
            lo, hi = map(int, spec.split("-"))
            counts = tuple(range(lo, hi + 1))
        else:
            counts = tuple(int(v) for v in spec.split(","))
    else:
        counts = tuple(int(v) for v in spec)
    if not counts or any(not 1 <= n <= MAX_OBJECTS for n in counts):
        raise ValueError(f"objects per image must be 1 to {MAX_OBJECTS}, got {spec!r}")
    return counts


def random_scene_of(rng: random.Random, counts: tuple[int, ...]) -> Scene:
    """A scene with a count drawn from `counts` (a single count draws nothing extra)."""
    return random_scene(rng, counts[0] if len(counts) == 1 else rng.choice(counts))


def _middle(rng: random.Random, filler_words: tuple[str, ...], words=CONNECTORS) -> str:
    middle = rng.choice(words)
    if filler_words and rng.random() < 0.3:
        middle = f"{middle} {rng.choice(filler_words)}" if rng.random() < 0.5 else f"{rng.choice(filler_words)} {middle}"
    return middle


LIST_ENDS = ("and", "and", "and", "with", "plus", "as well as")  # "a ..., a ... and a ..."


def caption(scene: Scene, rng: random.Random, filler_words: tuple[str, ...] = ()) -> str:
    """'a red circle and a blue square', objects in random order, never their relation.
    One object: 'a red circle'; three: 'a green circle, a yellow square and a purple
    triangle' (a comma list) or connectors between each ('... with a ... and a ...')."""
    lead_words = ("a", "a", "a", "an image of a", "one")
    if len(scene.things) == 1:
        return f"{rng.choice(lead_words)} {scene.a.name}"
    if len(scene.things) == 2:  # the two-object world's draws, unchanged
        first, second = (scene.a, scene.b) if rng.random() < 0.5 else (scene.b, scene.a)
        middle = _middle(rng, filler_words)
        lead = rng.choice(lead_words)
        return f"{lead} {first.name} {middle} a {second.name}"
    order = rng.sample(scene.things, len(scene.things))
    lead = rng.choice(lead_words)
    if rng.random() < 0.5:
        head = ", a ".join(t.name for t in order[:-1])
        return f"{lead} {head}{',' if rng.random() < 0.2 else ''} {_middle(rng, filler_words, LIST_ENDS)} a {order[-1].name}"
    text = f"{lead} {order[0].name}"
    for t in order[1:]:
        text += f" {_middle(rng, filler_words)} a {t.name}"
    return text


def _mask(thing: Thing, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    dx, dy, h = xs - thing.cx, ys - thing.cy, thing.size / 2
    if thing.shape == "circle":
        return (dx * dx + dy * dy <= h * h).float()
    if thing.shape == "square":
        return ((dx.abs() <= h) & (dy.abs() <= h)).float()
    if thing.shape == "triangle":  # apex up, base down
        t = (dy + h) / (2 * h)
        return ((t >= 0) & (t <= 1) & (dx.abs() <= h * t)).float()
    raise ValueError(f"unknown shape {thing.shape!r}")


def render(scenes: list[Scene], size: int = IMAGE) -> torch.Tensor:
    """RGB images in [0, 1], (B, 3, size, size), anti-aliased by supersampling."""
    n = size * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) * (IMAGE / n)
    ys, xs = coords.view(n, 1), coords.view(1, n)
    out = torch.zeros(len(scenes), 3, n, n)
    for i, scene in enumerate(scenes):
        for thing in scene.things:
            m = _mask(thing, xs, ys)
            color = torch.tensor(COLORS[thing.color], dtype=torch.float32).view(3, 1, 1)
            out[i] = out[i] * (1 - m) + color * m
    return F.avg_pool2d(out, SUPERSAMPLE)


def latent_signal(images: torch.Tensor) -> torch.Tensor:
    """The latent an image encodes to, in [-1, 1]: (B, 3, H, W) -> (B, 4, H/8, W/8).
    Channels: the cell's mean red, green and blue, and the share of the cell an object covers."""
    occupied = images.sum(dim=1, keepdim=True).clamp(max=1.0)
    cells = F.avg_pool2d(torch.cat([images, occupied], dim=1), CELL)
    return cells * 2 - 1


def scene_latents(scenes: list[Scene], samples_per_cell: int = 8) -> torch.Tensor:
    """latent_signal(render(scenes)) from a coarser grid (samples_per_cell per axis, times the
    2x supersampling): cheaper, equal up to sampling error at edges (mean 0.005 at 4)."""
    images = render(scenes, size=LATENT * samples_per_cell)
    occupied = images.sum(dim=1, keepdim=True).clamp(max=1.0)
    return F.avg_pool2d(torch.cat([images, occupied], dim=1), samples_per_cell) * 2 - 1


def object_coverage(scenes: list[Scene], samples_per_cell: int = 4, objects: int | None = None) -> torch.Tensor:
    """(B, N, 16, 16): the share of each latent cell that each object covers, in the scene's
    order (a, b, ...); N = `objects` or the most objects of a scene, zeros past a scene's own."""
    n = LATENT * samples_per_cell * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) * (IMAGE / n)
    ys, xs = coords.view(n, 1), coords.view(1, n)
    count = objects or max(len(s.things) for s in scenes)
    out = torch.zeros(len(scenes), count, n, n)
    for i, s in enumerate(scenes):
        for j, t in enumerate(s.things):
            out[i, j] = _mask(t, xs, ys)
    return F.avg_pool2d(out, samples_per_cell * SUPERSAMPLE)


def masks(scene: Scene, size: int = IMAGE) -> torch.Tensor:
    """(N, size, size) coverage of each object (a, b, ...)."""
    return torch.stack([F.avg_pool2d(_mask_image(t, size)[None, None], SUPERSAMPLE)[0, 0]
                        for t in scene.things])


def _mask_image(thing: Thing, size: int) -> torch.Tensor:
    n = size * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) * (IMAGE / n)
    return _mask(thing, coords.view(1, n), coords.view(n, 1))
