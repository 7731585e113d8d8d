"""Per-object statistics of cross-attention maps (ALGORITHM.md section 3).

Coordinates are normalised image coordinates: x = linspace(0, 1, w) grows to the right,
y = linspace(0, 1, h) grows downwards. All functions are differentiable and finite for
an all-zero map (every division is guarded by `eps`).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

EPS = 1e-8


def grid(h: int, w: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """x (1 x w) and y (h x 1) coordinate grids in [0, 1], on `like`'s device and dtype
    (made once per size, device and dtype)."""
    return _grid(h, w, like.device, like.dtype)


@functools.lru_cache(maxsize=64)
def _grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False):  # normal tensors even inside inference mode: autograd saves them
        x = torch.linspace(0.0, 1.0, w, device=device, dtype=dtype).view(1, w)
        y = torch.linspace(0.0, 1.0, h, device=device, dtype=dtype).view(h, 1)
    return x, y


def at_least_float32(maps: Tensor) -> Tensor:
    """Statistics are computed in float32 (or float64 when given), never in fp16/bf16."""
    return maps.to(torch.promote_types(maps.dtype, torch.float32))


def mean_threshold(maps: Tensor) -> Tensor:
    """Thesis Eq. 7 variant: keep the values above each map's mean, zero the rest.
    (..., h, w) -> (..., h, w); the gradient flows through the kept values."""
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    return maps * (maps > mean).to(maps.dtype)


def centroids(maps: Tensor, eps: float = EPS) -> Tensor:
    """c = (sum A x / sum A, sum A y / sum A).  (..., h, w) -> (..., 2) as (x, y)."""
    x, y = grid(maps.shape[-2], maps.shape[-1], maps)
    mass = maps.sum(dim=(-2, -1)).clamp_min(eps)
    cx = (maps * x).sum(dim=(-2, -1)) / mass
    cy = (maps * y).sum(dim=(-2, -1)) / mass
    return torch.stack((cx, cy), dim=-1)


def variances(maps: Tensor, centre: Tensor, eps: float = EPS) -> Tensor:
    """s2 = sum A ((x - c_x)^2 + (y - c_y)^2) / sum A.  (..., h, w), (..., 2) -> (...)."""
    x, y = grid(maps.shape[-2], maps.shape[-1], maps)
    dx2 = (x - centre[..., 0, None, None]) ** 2
    dy2 = (y - centre[..., 1, None, None]) ** 2
    return (maps * (dx2 + dy2)).sum(dim=(-2, -1)) / maps.sum(dim=(-2, -1)).clamp_min(eps)


def object_stats(maps: Tensor, threshold: bool = False, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Centroids (..., 2) and variances (...) of maps (..., h, w), optionally thresholded."""
    if threshold:
        maps = mean_threshold(maps)
    c = centroids(maps, eps)
    return c, variances(maps, c, eps)
