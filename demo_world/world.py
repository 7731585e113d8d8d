"""The shapes world of the demo model: two coloured shapes on black, captions without relations.

Pure torch, no ComfyUI. Images are 128 px; latents are 16 x 16 x 4, the area average of
8 x 8 pixel cells: channels red, green, blue and "object here", each mapped to [-1, 1].
A caption names both objects in random order ("a red circle and a blue square") and never
says where they are, so a model trained on it places the objects without regard to any
"left of" or "above" in a prompt: the failure InfSplign is for.
"""
from __future__ import annotations

import random
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
GAP = 6.0  # pixels between the two objects' boxes

# Words placed between the two object phrases in training captions. None of them names a
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


@dataclass(frozen=True)
class Scene:
    a: Thing
    b: Thing


def pick_objects(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two objects that differ in colour and in shape, so each word names one object."""
    ca, cb = rng.sample(sorted(COLORS), 2)
    sa, sb = rng.sample(SHAPES, 2)
    return (ca, sa), (cb, sb)


def _separated(p: Thing, q: Thing) -> bool:
    pa, qa = p.box(), q.box()
    return (pa[2] + GAP <= qa[0] or qa[2] + GAP <= pa[0]
            or pa[3] + GAP <= qa[1] or qa[3] + GAP <= pa[1])


def place(rng: random.Random, a: tuple[str, str], b: tuple[str, str]) -> Scene:
    """Uniformly random, non-overlapping positions and sizes for two given objects."""
    while True:
        things = []
        for color, shape in (a, b):
            size = rng.uniform(*SIZE_RANGE)
            lo, hi = MARGIN + size / 2, IMAGE - MARGIN - size / 2
            things.append(Thing(color, shape, rng.uniform(lo, hi), rng.uniform(lo, hi), size))
        if _separated(*things):
            return Scene(*things)


def random_scene(rng: random.Random) -> Scene:
    return place(rng, *pick_objects(rng))


def caption(scene: Scene, rng: random.Random, filler_words: tuple[str, ...] = ()) -> str:
    """'a red circle and a blue square', objects in random order, never their relation."""
    first, second = (scene.a, scene.b) if rng.random() < 0.5 else (scene.b, scene.a)
    middle = rng.choice(CONNECTORS)
    if filler_words and rng.random() < 0.3:
        middle = f"{middle} {rng.choice(filler_words)}" if rng.random() < 0.5 else f"{rng.choice(filler_words)} {middle}"
    lead = rng.choice(("a", "a", "a", "an image of a", "one"))
    return f"{lead} {first.name} {middle} a {second.name}"


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
        for thing in (scene.a, scene.b):
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


def object_coverage(scenes: list[Scene], samples_per_cell: int = 4) -> torch.Tensor:
    """(B, 2, 16, 16): the share of each latent cell that object a / object b covers."""
    n = LATENT * samples_per_cell * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) * (IMAGE / n)
    ys, xs = coords.view(n, 1), coords.view(1, n)
    out = torch.stack([torch.stack([_mask(t, xs, ys) for t in (s.a, s.b)]) for s in scenes])
    return F.avg_pool2d(out, samples_per_cell * SUPERSAMPLE)


def masks(scene: Scene, size: int = IMAGE) -> torch.Tensor:
    """(2, size, size) coverage of object a and object b."""
    return torch.stack([F.avg_pool2d(_mask_image(t, size)[None, None], SUPERSAMPLE)[0, 0]
                        for t in (scene.a, scene.b)])


def _mask_image(thing: Thing, size: int) -> torch.Tensor:
    n = size * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) * (IMAGE / n)
    return _mask(thing, coords.view(1, n), coords.view(n, 1))
