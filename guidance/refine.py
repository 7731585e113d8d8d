"""GSN's one-step refinement: at one chosen sampling step, shift the latent by a burst of
Adam steps on the loss of the objects' attention maps, then let the sampler go on from the
shifted latent (Grimal et al., "Text-to-Image Alignment in Denoising-Based Models through
Step Selection": 50 Adam steps at one well-chosen step instead of thresholded refinement at
many steps).

The loss is the engine's Objective (guidance/losses.py): InfSplign's relation terms times
`spatial`, the boxes' terms when there are boxes, and the presence and separation terms of
guidance/presence.py. The latent is optimised as the model sees it: z = x / scale, with
scale = sqrt(sigma^2 + sigma_data^2) on eps and v models (ComfyUI's x = x0 + sigma n) and 1
under flow matching (ComfyUI's calculate_input), so the learning rate means the same at every
step. Pure torch, no ComfyUI.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .autograd import grad_enabled

MAX_ITERATIONS = 200
STEP_TOLERANCE = 1e-3  # relative, as guidance.step.WINDOW_TOLERANCE


@dataclass(frozen=True)
class RefineSettings:
    """InfSplign Refine's settings, validated with messages that name the value and the fix."""

    presence: float = 1.0
    separation: float = 0.0
    spatial: float = 0.0
    refine_percent: float = 0.4
    iterations: int = 50
    learning_rate: float = 0.05
    continuous: bool = False
    continuous_strength: float = 30.0
    continuous_end_percent: float = 0.5
    memory: str = "auto"
    temperature: float = 1.0  # of the captured maps, when no guidance node sets one
    boxes: float = 0.0  # weight of the layout's box terms in the burst (Layout Boxes' placing)

    def __post_init__(self):
        problems = []
        for name in ("presence", "separation", "spatial", "continuous_strength", "boxes"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                problems.append(f"{name} is {value}; use a number >= 0")
        if not 0.0 <= self.refine_percent <= 1.0 or not math.isfinite(self.refine_percent):
            problems.append(f"refine_percent is {self.refine_percent}; use a fraction of the schedule in [0, 1] "
                            "(0 = the first step)")
        if not 0.0 <= self.continuous_end_percent <= 1.0 or not math.isfinite(self.continuous_end_percent):
            problems.append(f"continuous_end_percent is {self.continuous_end_percent}; use a fraction in [0, 1]")
        if not isinstance(self.iterations, int) or not 0 <= self.iterations <= MAX_ITERATIONS:
            problems.append(f"iterations is {self.iterations}; use a whole number from 0 (off) to "
                            f"{MAX_ITERATIONS} (GSN uses 50)")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            problems.append(f"temperature is {self.temperature}; use a number > 0 (1 = the model's own maps)")
        if self.memory not in ("auto", "fast", "low"):
            problems.append(f'memory is "{self.memory}"; use one of auto, fast, low')
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            problems.append(f"learning_rate is {self.learning_rate}; use a number > 0")
        if problems:
            raise ValueError("InfSplign Refine settings: " + "; ".join(problems) + ".")

    @property
    def has_terms(self) -> bool:
        return self.presence > 0 or self.separation > 0 or self.spatial > 0 or self.boxes > 0

    @property
    def takes_gradient(self) -> bool:
        """Does a run with these settings differentiate anything (a refinement burst, or the
        per-step gradient of `continuous`)?"""
        return self.has_terms and (self.iterations > 0 or (self.continuous and self.continuous_strength > 0))


def refine_index(sigmas, sigma_at_percent: float, tol: float = STEP_TOLERANCE) -> int | None:
    """The schedule step the refinement runs at: the first step whose sigma is at or below
    the refine point (steps 0..len(sigmas)-2); None when the point lies past the last step."""
    for k, s in enumerate(float(v) for v in sigmas[:-1]):
        if s <= sigma_at_percent * (1.0 + tol):
            return k
    return None


@dataclass
class RefineReport:
    """What one refinement did: its step and the loss of every iteration (before its update)."""

    step: int
    sigma: float
    losses: list[float] = field(default_factory=list)  # summed over the batch, one per iteration
    final: float = float("nan")  # loss at the refined latent (after the last update)
    skipped: str = ""
    memory_mode: str = ""
    source: str = "InfSplign Refine"  # which node's burst: InfSplign Refine, or Layout Boxes' placing


def refine_latent(loss_at: Callable[[Tensor], Tensor | None], x: Tensor, sigma: float, iterations: int,
                  learning_rate: float, scale: float | None = None,
                  report: RefineReport | None = None) -> tuple[Tensor, RefineReport]:
    """Adam on z = x / scale for `iterations` steps of `loss_at`; `scale`: how the model
    divides its input latent at this sigma (default sqrt(sigma^2 + 1), an eps / v model's).

    `loss_at(x)` runs the model's forward at latent x (with autograd) and returns the scalar
    loss, or None when no maps were captured. The loss is evaluated once more at the result
    (report.final). A non-finite loss or gradient ends the burst: the latent stays at the
    last one whose loss was finite. That is decided on the device (the iterations after it
    change nothing), so the burst never waits for it; the losses are read once, at the end.
    Returns the refined latent (x's dtype) and the report."""
    report = report if report is not None else RefineReport(-1, sigma)
    scale = math.sqrt(sigma * sigma + 1.0) if scale is None else float(scale)
    losses, finite = [], []  # per evaluation: the loss, and whether it and its gradient were finite
    with grad_enabled():
        z = (x.detach().to(torch.promote_types(x.dtype, torch.float32)) / scale).clone().requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=learning_rate)
        kept = z.detach().clone()
        alive = torch.ones((), dtype=torch.bool, device=z.device)  # no non-finite value so far
        for i in range(iterations + 1):
            loss = loss_at((z * scale).to(x.dtype))
            if loss is None:
                report.skipped = "no attention maps were captured for this step"
                break
            loss = loss.detach() if i == iterations else loss
            alive = alive & torch.isfinite(loss)
            losses.append(loss.detach())
            with torch.no_grad():
                kept = torch.where(alive, z, kept)
            if i == iterations:
                finite.append(alive)
                break
            (grad,) = torch.autograd.grad(loss, z)
            alive = alive & torch.isfinite(grad).all()
            finite.append(alive)
            optimiser.zero_grad(set_to_none=True)
            z.grad = torch.where(alive, grad, torch.zeros_like(grad))
            optimiser.step()
            with torch.no_grad():  # after a non-finite value z stays where it was
                z.copy_(torch.where(alive, z, kept))
    if not losses:  # nothing was evaluated: the latent is the sampler's own
        return x, report
    values = torch.stack(losses).tolist()
    ok = torch.stack(finite).tolist()
    for i, (value, good) in enumerate(zip(values, ok)):
        if not math.isfinite(value):
            report.skipped = "the loss is not finite"
            break
        if i == iterations:
            report.final = value
            break
        report.losses.append(value)
        if not good:
            report.skipped = "the gradient is not finite"
            break
    if not report.losses:
        return x, report
    return (kept * scale).to(x.dtype), report
