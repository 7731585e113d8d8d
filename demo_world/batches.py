"""Training batches of the shapes world: scenes of one to three objects, their captions,
token positions, coverage and end-token donors.

Each step's batch is drawn from a generator seeded by (seed, step) alone, so batches can be
built ahead in worker processes and the result does not depend on how many there are.
No ComfyUI here: `tokenizer` is anything with ComfyUI's tokenize_with_weights.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.utils.data

from . import world
from .attention import token_weights
from .text import positions, token_ids


@dataclass
class Batch:
    x0: torch.Tensor  # (B, 4, 16, 16) in the UNet's latent scale
    ids: list[list[int]]  # token ids, 77 per caption
    groups: list[tuple[tuple[int, ...], ...]]  # token positions of objects a, b, ... (N slots, () past a scene's own)
    centres: torch.Tensor  # (B, N, 2) object centres (x, y) in [0, 1] of the image (zeros past a scene's own)
    empty: torch.Tensor  # (B,) bool: unconditional caption
    coverage: torch.Tensor  # (B, N, 16, 16) share of each latent cell covered by each object
    donors: list[int]  # row whose end-token output each row gets in training (itself if empty)
    weights: torch.Tensor  # (B, N, 77) token_weights of the groups; N = the most objects of the settings

    def to(self, device) -> "Batch":
        return Batch(self.x0.to(device), self.ids, self.groups, self.centres.to(device),
                     self.empty.to(device), self.coverage.to(device), self.donors, self.weights.to(device))


def make_batch(tokenizer, rng: random.Random, size: int, fillers: tuple[str, ...],
               p_empty: float = 0.1, objects: tuple[int, ...] = (2,)) -> Batch:
    """One batch of `size` scenes, each with a count of objects drawn from `objects`
    (a single count draws nothing extra, so objects=(2,) is the two-object world's batch)."""
    slots = max(objects)
    scenes = [world.random_scene_of(rng, objects) for _ in range(size)]
    x0 = world.scene_latents(scenes, samples_per_cell=4)
    ids, groups, empty = [], [], []
    for scene in scenes:
        is_empty = rng.random() < p_empty
        text = "" if is_empty else world.caption(scene, rng, fillers)
        t = token_ids(tokenizer, text)
        ids.append(t)
        empty.append(is_empty)
        named = [] if is_empty else [positions(t, tokenizer, thing.name) for thing in scene.things]
        groups.append(tuple(named) + ((),) * (slots - len(named)))
    centres = torch.zeros(size, slots, 2)
    for i, s in enumerate(scenes):
        for j, thing in enumerate(s.things):
            centres[i, j] = torch.tensor([thing.cx, thing.cy]) / world.IMAGE
    rows = [i for i in range(size) if not empty[i]]
    shuffled = rows[:]
    rng.shuffle(shuffled)
    donors = list(range(size))
    for r, d in zip(rows, shuffled):
        donors[r] = d
    return Batch(x0, ids, groups, centres, torch.tensor(empty), world.object_coverage(scenes, objects=slots),
                 donors, token_weights(groups, len(ids[0])))


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


class TrainingBatches(torch.utils.data.Dataset):
    """Item k is the batch of step k + 1, a pure function of (seed, step)."""

    def __init__(self, tokenizer, seed: int, steps: int, size: int, fillers: tuple[str, ...],
                 objects: tuple[int, ...] = (2,)):
        self.tokenizer, self.seed, self.steps, self.size, self.fillers = tokenizer, seed, steps, size, fillers
        self.objects = objects

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, k: int) -> Batch:
        return make_batch(self.tokenizer, random.Random(step_seed(self.seed, k + 1)), self.size, self.fillers,
                          objects=self.objects)
