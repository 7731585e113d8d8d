"""The guided step in ComfyUI's parameterisation (ALGORITHM.md section 5).

Samplers hold x = x0 + sigma n; the UNet sees z_t = x / sqrt(1 + sigma^2), and every model
type reduces to eps = (x - D) / sigma. Thesis Eq. 6 adds w grad_{z_t} L to eps; with
grad_{z_t} L = sqrt(1 + sigma^2) grad_x L that is, on the denoised prediction D,
    D' = D - sigma * w * sqrt(1 + sigma^2) * grad_x L.
Flow matching (ComfyUI's CONST sampling: x = sigma n + (1 - sigma) x0, the model input is x
itself, D = x - sigma v, so the sampler's eps (x - D) / sigma is v) takes the step on v:
    v' = v + w grad_x L,  D' = D - sigma * w * grad_x L,
finite at sigma = 1, where adding to the noise estimate itself would be singular.
Which formula a model gets is its family's choice (engine/families).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .autograd import grad_enabled, grad_leaf
from .capture import CaptureStore
from .losses import LossSettings, Objective, Terms, objective_terms

# Steps within this relative distance of a window boundary count as on it.
WINDOW_TOLERANCE = 1e-3
# How the guided step spends memory (engine/memory_modes.py): `fast` keeps what autograd
# saves, `low` recomputes inside the UNet's blocks during backward, `auto` picks per step.
MEMORY_MODES = ("auto", "fast", "low")


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


def guided_flow_denoised(denoised: Tensor, grad_x: Tensor, sigma: Tensor, strength: float) -> Tensor:
    """Flow matching (CONST): v' = v + w grad_x L on D = x - sigma v, so D' = D - sigma w grad_x L."""
    return denoised - _per_sample(sigma, denoised) * strength * grad_x


def in_window(sigma: float, sigma_start: float, sigma_end: float, tol: float = WINDOW_TOLERANCE) -> bool:
    """Is a step with this sigma guided? The window is [start_percent, end_percent) of the
    schedule, as sigmas: sigma_end < sigma <= sigma_start, each bound widened or narrowed by
    `tol` (relative) so that a step a hair beside a bound counts as on it. With 20 steps and
    end_percent 0.25 this guides steps 0..4 (the step at 25% itself is not guided)."""
    return sigma <= sigma_start * (1.0 + tol) and sigma > sigma_end * (1.0 + tol)


@dataclass(frozen=True)
class GuidanceSettings:
    """What InfSplign Guider / InfSplign (KSampler) set; validated with messages that say
    which value is wrong and what to use instead."""

    strength: float = 1000.0
    loss: LossSettings = LossSettings()
    start_percent: float = 0.0
    end_percent: float = 0.25
    memory: str = "auto"

    def __post_init__(self):
        problems = []
        if self.memory not in MEMORY_MODES:
            problems.append(f'memory is "{self.memory}"; use one of {", ".join(MEMORY_MODES)} (auto picks per step)')
        if not math.isfinite(self.strength) or self.strength < 0:
            problems.append(f"strength is {self.strength}; use a number >= 0 (1000 is the paper's)")
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            problems.append(f"start_percent {self.start_percent} / end_percent {self.end_percent}: "
                            "need 0 <= start_percent < end_percent <= 1 (default 0.0 / 0.25)")
        if not math.isfinite(self.loss.alpha) or self.loss.alpha <= 0:
            problems.append(f"alpha is {self.loss.alpha}; use a number > 0 (8 for sigmoid)")
        if not math.isfinite(self.loss.temperature) or self.loss.temperature <= 0:
            problems.append(f"temperature is {self.loss.temperature}; use a number > 0 (1 reads the model's "
                            "own attention; 2-8 softens maps that are ~0 away from the object)")
        if not math.isfinite(self.loss.margin):
            problems.append(f"margin is {self.loss.margin}; use a finite number (0 for sigmoid)")
        for name in ("presence_weight", "balance_weight", "orthogonal_weight", "spatial_weight"):
            value = getattr(self.loss, name)
            if not math.isfinite(value) or value < 0:
                problems.append(f"{name} is {value}; use a number >= 0")
        if problems:
            raise ValueError("InfSplign settings: " + "; ".join(problems) + ".")


@dataclass
class StepReport:
    """What one guided (or observed) step did, for the log and the trace."""

    sigma: float
    loss: float
    spatial: float  # the spatial term alone (the thesis' loss-reduction measure)
    box: float = float("nan")  # the box terms alone (weighted), when the step had boxes
    grad_norm: float = 0.0
    applied: bool = False
    skipped: str = ""
    maps_dtype: str = ""  # dtype of the attention maps and the loss (float32 whatever the model's)
    batch: int = 0  # images whose maps the loss read
    memory_mode: str = ""  # "fast" | "low" as the step ran, "unguided" after running out of memory
    forward: str = ""  # "batched": cond and uncond rows in one forward with autograd; "split": apart


NO_MAPS = "no attention maps were captured for this step"


def _values(terms: Terms, grad: Tensor | None) -> Tensor:
    """The report's numbers as one device tensor: loss, spatial term, box terms (NaN without
    boxes), gradient norm (0 without a gradient)."""
    with torch.no_grad():
        loss = terms.loss.detach()
        parts = terms.per_image
        spatial = parts["spatial"].detach().sum() if "spatial" in parts else torch.zeros_like(loss)
        box = parts["boxes"].detach().sum() if "boxes" in parts else torch.full_like(loss, float("nan"))
        norm = grad.norm().to(loss.dtype) if grad is not None else torch.zeros_like(loss)
        return torch.stack((loss, spatial, box, norm))


def _report(values: Tensor, sigma: float, layers, took_gradient: bool) -> StepReport:
    """The StepReport of a step, its numbers read from the device once."""
    loss, spatial, box, norm = values.tolist()
    report = StepReport(sigma, loss, spatial, box, grad_norm=norm,
                        maps_dtype=str(layers[0][1].dtype).removeprefix("torch."), batch=layers[0][1].shape[-4])
    if took_gradient:
        if not math.isfinite(loss):
            report.skipped = "loss is not finite"
        elif not math.isfinite(norm):
            report.skipped = "gradient is not finite"
        else:
            report.applied = True
    return report


def _unguided(sigma: float) -> StepReport:
    nan = float("nan")
    return StepReport(sigma, nan, nan, skipped=NO_MAPS)


def guided_step(predict: Callable[[Tensor], Tensor], x: Tensor, sigma: Tensor,
                store: CaptureStore, settings: GuidanceSettings,
                objective: Objective | None = None, sigma_value: float | None = None,
                formula: Callable[[Tensor, Tensor, Tensor, float], Tensor] = guided_denoised,
                ) -> tuple[Tensor, StepReport]:
    """One InfSplign step around the sampler's own prediction.

    `predict(x)` is the sampler's batched cond/uncond forward returning the denoised x0.
    It runs once with autograd recording; the loss on the captured cond maps is
    differentiated once w.r.t. x (one backward, no second forward), and `formula` (Eq. 6
    by default; the model family's for its sampling type) is applied to the detached
    prediction. Strength 0 only observes the loss. A non-finite loss or
    gradient, or a step on which no maps were captured, leaves the prediction unguided and
    says so in the report. `objective`: the terms of this step (default: the relations).

    Nothing inside waits for the device: the forward, the loss and the backward are queued
    as they come, a non-finite loss or gradient is caught on the device (the prediction
    stays unguided there), and the report's numbers are read once, after the step.
    `sigma_value`: the step's sigma as a number, when the caller has it (else read here).
    """
    objective = objective if objective is not None else Objective(store.pairs)
    sigma_value = float(sigma.max()) if sigma_value is None else sigma_value
    store.capturing = True
    try:
        if settings.strength == 0:
            with torch.no_grad():
                denoised = predict(x)
                layers = store.take()
                if not layers:
                    return denoised, _unguided(sigma_value)
                values = _values(objective_terms(layers, objective, settings.loss), None)
            return denoised, _report(values, sigma_value, layers, took_gradient=False)
        with grad_enabled():
            x_leaf = grad_leaf(x)
            denoised = predict(x_leaf)
            store.capturing = False
            layers = store.take()
            if not layers:  # e.g. every cond saw only a crop of the latent: nothing to guide on
                return denoised.detach(), _unguided(sigma_value)
            terms = objective_terms(layers, objective, settings.loss)
            (grad,) = torch.autograd.grad(terms.loss, x_leaf)
        denoised = denoised.detach()
        values = _values(terms, grad)
        finite = torch.isfinite(terms.loss.detach() + values[3])  # loss and gradient both finite
        guided = formula(denoised, grad.to(denoised.dtype), sigma.to(denoised.device), settings.strength)
        return torch.where(finite, guided, denoised), _report(values, sigma_value, layers, took_gradient=True)
    finally:
        store.capturing = False
        store.discard()
