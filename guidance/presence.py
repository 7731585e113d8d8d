"""Presence and separation terms on the objects' attention maps (GSN, after Attend-and-Excite
and A-Star), for the refinement of InfSplign Refine and its per-step gradient.

- presence (Attend-and-Excite): 1 - max of each object's smoothed map; the weakest object
  counts (the max over objects of that loss), so the object the model is about to leave
  out is the one pushed.
- separation (A-Star's IoU): for every pair of objects, the soft intersection over union of
  their smoothed maps, each scaled to a peak of 1: sum(min(A_i, A_j)) / sum(max(A_i, A_j)).
  Two objects whose attention covers the same place (about to fuse) score high.

Maps are smoothed by a 3 x 3 Gaussian of sigma 0.5, as Attend-and-Excite does. Unlike
Attend-and-Excite the maps are not renormalised over the prompt's words: they are the
capture's own probabilities (over all context tokens, at the capture's temperature). Pure
torch, no ComfyUI.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_stats import at_least_float32

SMOOTH_SIGMA = 0.5
SMOOTH_SIZE = 3
EPS = 1e-8


def smoothed(maps: Tensor, sigma: float = SMOOTH_SIGMA, size: int = SMOOTH_SIZE) -> Tensor:
    """(B, K, h, w) -> (B, K, h, w): each map convolved with a size x size Gaussian
    (reflected at the borders)."""
    r = size // 2
    offsets = torch.arange(size, dtype=maps.dtype, device=maps.device) - r
    g = torch.exp(-offsets ** 2 / (2 * sigma * sigma))
    kernel = (g[:, None] * g[None, :]) / g.sum() ** 2
    b, k, h, w = maps.shape
    flat = maps.reshape(b * k, 1, h, w)
    if min(h, w) > r:
        flat = F.pad(flat, (r, r, r, r), mode="reflect")
    else:  # a map smaller than the kernel's reach: replicate instead
        flat = F.pad(flat, (r, r, r, r), mode="replicate")
    return F.conv2d(flat, kernel[None, None]).reshape(b, k, h, w)


def presence_loss(maps: Tensor, slots: Sequence[int]) -> Tensor:
    """Per image (B,): max over the objects `slots` of 1 - max of the smoothed map."""
    if not slots:
        return maps.new_zeros(maps.shape[0])
    m = smoothed(at_least_float32(maps)[:, list(slots)])
    peaks = m.flatten(2).amax(dim=-1)  # (B, K)
    return (1.0 - peaks).amax(dim=-1)


def separation_loss(maps: Tensor, slots: Sequence[int]) -> Tensor:
    """Per image (B,): sum over pairs of objects of the soft IoU of their peak-scaled maps."""
    total = maps.new_zeros(maps.shape[0], dtype=torch.promote_types(maps.dtype, torch.float32))
    if len(slots) < 2:
        return total
    m = smoothed(at_least_float32(maps)[:, list(slots)]).flatten(2)
    m = m / (m.amax(dim=-1, keepdim=True) + EPS)
    for i, j in itertools.combinations(range(len(slots)), 2):
        inter = torch.minimum(m[:, i], m[:, j]).sum(dim=-1)
        union = torch.maximum(m[:, i], m[:, j]).sum(dim=-1)
        total = total + inter / (union + EPS)
    return total

