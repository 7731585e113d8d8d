"""The guided step in ComfyUI's parameterisation (ALGORITHM.md section 5).

Samplers hold x = x0 + sigma n; the UNet sees z_t = x / sqrt(1 + sigma^2), and every model
type reduces to eps = (x - D) / sigma. Thesis Eq. 6 adds w grad_{z_t} L to eps; with
grad_{z_t} L = sqrt(1 + sigma^2) grad_x L that is, on the denoised prediction D,
    D' = D - sigma * w * sqrt(1 + sigma^2) * grad_x L.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Steps within this relative distance of a window boundary count as on it.
WINDOW_TOLERANCE = 1e-3


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def grad_z_from_grad_x(grad_x: Tensor, sigma: Tensor) -> Tensor:
    """grad_{z_t} L = sqrt(1 + sigma^2) grad_x L, sigma per sample (B,)."""
    s = _per_sample(sigma, grad_x)
    return torch.sqrt(1.0 + s * s) * grad_x


def guided_eps(eps: Tensor, grad_x: Tensor, sigma: Tensor, strength: float) -> Tensor:
    """Thesis Eq. 6: eps' = eps + w grad_{z_t} L."""
    return eps + strength * grad_z_from_grad_x(grad_x, sigma)


def guided_denoised(denoised: Tensor, grad_x: Tensor, sigma: Tensor, strength: float) -> Tensor:
    """Eq. 6 on ComfyUI's denoised output: D' = D - sigma w sqrt(1 + sigma^2) grad_x L."""
    s = _per_sample(sigma, denoised)
    return denoised - s * strength * grad_z_from_grad_x(grad_x, sigma)


def in_window(sigma: float, sigma_start: float, sigma_end: float, tol: float = WINDOW_TOLERANCE) -> bool:
    """Is a step with this sigma guided? The window is [start_percent, end_percent) of the
    schedule, as sigmas: sigma_end < sigma <= sigma_start, each bound widened or narrowed by
    `tol` (relative) so that a step a hair beside a bound counts as on it. With 20 steps and
    end_percent 0.25 this guides steps 0..4 (the step at 25% itself is not guided)."""
    return sigma <= sigma_start * (1.0 + tol) and sigma > sigma_end * (1.0 + tol)
