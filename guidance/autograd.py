"""Gradients w.r.t. the latent inside ComfyUI's prompt execution.

ComfyUI runs every prompt under ``torch.inference_mode()``. Weights loaded there (and
weights re-patched later, e.g. by a LoRA or a device move) are inference tensors, which
autograd refuses to save for backward ("Inference tensors cannot be saved for
backward"). Leaving inference mode is not enough: the weights themselves must be normal
tensors. These helpers do both, without touching values.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Leave inference mode and record autograd for the enclosed block."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def make_autograd_safe(module: nn.Module, skip: Callable[[nn.Module], bool] | None = None,
                       modules: Sequence[nn.Module] | None = None) -> int:
    """Replace each inference-tensor parameter/buffer of `module` by an equal normal tensor.

    Returns how many were replaced (0 once done, so calling it every step is cheap).
    Values, dtypes and devices are kept; the new parameters do not require grad (guidance
    differentiates w.r.t. the latent only). The module is changed in place. Submodules for
    which `skip(sub)` is true keep their own tensors (ones whose weights autograd never
    sees, such as weights fetched and cast on each call). `modules`: module.modules(), when
    the caller keeps that list (walking a large model's tree is host time on every step).
    """
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in (module.modules() if modules is None else modules):
            if skip is not None and skip(sub):
                continue
            for name, p in sub._parameters.items():
                if p is not None and p.is_inference():
                    sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    replaced += 1
            for name, b in sub._buffers.items():
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    replaced += 1
    return replaced


def grad_leaf(x: torch.Tensor) -> torch.Tensor:
    """A normal, grad-requiring copy of `x` (which may be an inference tensor).

    Call inside ``grad_enabled()``.
    """
    return x.detach().clone().requires_grad_(True)


@contextlib.contextmanager
def weights_frozen(module: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """While inside, no parameter of `module` requires grad (a flag change, nothing copied).

    Weights loaded under inference mode may carry requires_grad=True; a forward with
    autograd would then save their inputs for a weight gradient nobody asks for, and refuse
    to save the inference-tensor weights themselves. The flags are restored afterwards.
    `modules`: module.modules(), when the caller keeps that list."""
    if modules is None:
        changed = [p for p in module.parameters() if p.requires_grad]
    else:
        changed = [p for m in modules for p in m._parameters.values() if p is not None and p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            if p.is_inference():
                with torch.inference_mode():  # (only there may an inference tensor require grad)
                    p.requires_grad_(True)
            else:
                p.requires_grad_(True)
