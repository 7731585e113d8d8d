"""Autograd through MMDiT blocks (Flux.1, Chroma, SD3) for the guided step.

Two things in ComfyUI's MMDiT code stand between a guided step and the gradient of a loss
w.r.t. the latent:

1. Flux's and Chroma's blocks add their residuals in place (`img += ...`, `txt += ...`,
   `x += ...` in comfy/ldm/flux/layers.py, after a LayerNorm kept the same tensor for its
   backward). Plain autograd stops with "modified by an inplace operation". Under
   activation checkpointing (the `low` memory mode) it is worse: the block changes its own
   input, the recomputation during backward starts from the changed values, and the
   gradient is wrong without any error.
2. From ComfyUI 0.33 on, the Flux family's RoPE (comfy/ldm/flux/math.py: Flux, Chroma,
   Qwen-Image, HiDream) is a comfy_kitchen custom op with no autograd formula (and no
   float64), unless `comfy.model_management.in_training` is set; backward through it fails.

`differentiable()` removes both, for as long as it is entered:

- Augmented assignments (`a += b`, `-=`, `*=`, `/=`) on tensors that take part in autograd
  (grad mode on, an operand requires grad) run out of place: Python binds the name (or the
  subscript, through __setitem__) to the new tensor, so the code computes the same values
  and no tensor that autograd saved, or that a checkpoint recomputes from, is changed. A
  TorchFunctionMode sees `a += b` as `Tensor.add_`, as it sees `a.add_(b)`; only the
  augmented assignment is turned (the caller's bytecode says which), because a method call
  such as `sim.add_(mask)` (comfy/ldm/modules/attention.py) discards the result and must
  stay in place. Not covered: code that changes a tensor through another name for it
  (`v = x[:, :n]; v += y`, expecting x to change); none of the MMDiT blocks does.
- `comfy.model_management.in_training` is True (where it exists: 0.33 and later; it is
  restored on the way out). It is ComfyUI's own switch for "gradients are needed", set by
  its training node; what it changes, on 0.33: Flux-family RoPE (plain torch instead of
  comfy_kitchen), LTXV's feed-forward and RoPE, Lumina's fused RMSNorm + RoPE, SeedVR's
  RoPE (a copy), Ernie's / Ideogram's / MiniMax's fused RoPE, the INT8 linear's fused input
  activation (comfy/ops.py linear_input_act): each a fused, backward-less kernel swapped for
  its plain torch twin. Values agree to rounding.

Enter it around the guided step's forward AND its backward: `low` recomputes each block
during backward, and the recomputation must take the same paths as the forward did.
Outside it (unguided steps, other prompts, the blocks after the last captured one, which run
without a graph) nothing changes. SD3's JointBlock adds out of place already; the context is
harmless there.

A recomputation does not see the caller's mode: the autograd engine runs a checkpoint's
recomputation (inside backward) without the torch function modes that were active when
backward was called. The mode alone, with the double blocks checkpointed, gave a gradient
5 % off (narrow Flux, float64) and no error: the recomputed `img += ...` changed the block's
saved input in place. So the modules a checkpoint recomputes are passed to
`differentiable(*modules)`, and their forwards enter the mode themselves. Enter it OUTSIDE
the recomputation's own wrapping (guidance/recompute.py `recomputing`), so that the
recomputed forward is the one that enters the mode.
"""
from __future__ import annotations

import contextlib
import dis
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import comfy.model_management

# what `a op= b` dispatches as (Tensor.__iadd__ reaches a TorchFunctionMode as Tensor.add_)
_OUT_OF_PLACE = {torch.Tensor.add_: torch.add, torch.Tensor.sub_: torch.sub,
                 torch.Tensor.mul_: torch.mul, torch.Tensor.div_: torch.div}
_AUGMENTED: dict[tuple[object, int], bool] = {}  # (code, instruction offset) -> is an augmented assignment


def _is_augmented(code, offset: int) -> bool:
    key = (code, offset)
    if key not in _AUGMENTED:
        found = False
        for ins in dis.get_instructions(code):
            if ins.offset == offset:
                # Python 3.11+: BINARY_OP with an in-place operator ("+=", "*=", ...); 3.10: INPLACE_ADD, ...
                found = ins.opname.startswith("INPLACE_") or (ins.opname == "BINARY_OP" and ins.argrepr.endswith("="))
                break
        _AUGMENTED[key] = found
    return _AUGMENTED[key]


def _called_as_augmented_assignment() -> bool:
    """Is the torch call being handled an `a op= b` of Python code? (Frames of
    __torch_function__ handlers, this one and other modes' in between, are skipped.)"""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name == "__torch_function__":
        frame = frame.f_back
    return frame is not None and _is_augmented(frame.f_code, frame.f_lasti)


def _records(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args[:2])


class OutOfPlaceAugmented(TorchFunctionMode):
    """While active, `a op= b` on tensors that take part in autograd runs out of place."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out_of_place = _OUT_OF_PLACE.get(func)
        if (out_of_place is not None and torch.is_grad_enabled() and _records(args)
                and _called_as_augmented_assignment()):
            return out_of_place(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def training_paths() -> Iterator[None]:
    """comfy.model_management.in_training = True while inside (where ComfyUI has it)."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):  # ComfyUI before 0.33: no fused, backward-less paths
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


@contextlib.contextmanager
def _forwards_in_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Each module's forward runs inside OutOfPlaceAugmented, also when the autograd engine
    calls it (a checkpoint's recomputation); each module's own forward is restored on exit."""
    patched = []
    try:
        for module in modules:
            own = module.__dict__.get("forward")  # an instance attribute already (another wrapper's)
            inner = module.forward

            def forward(*args, _inner=inner, **kwargs):
                with OutOfPlaceAugmented():
                    return _inner(*args, **kwargs)
            module.forward = forward
            patched.append((module, own))
        yield
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own


@contextlib.contextmanager
def differentiable(*recomputed: nn.Module) -> Iterator[None]:
    """Correct autograd through Flux / Chroma / SD3 blocks while inside (see the module note).

    `recomputed`: the modules a checkpoint recomputes during backward (the `low` mode's
    units); enter this before the recomputation wraps them."""
    with training_paths(), _forwards_in_mode(recomputed), OutOfPlaceAugmented():
        yield
