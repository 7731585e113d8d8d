"""Recomputation for the guided step's backward pass (the `low` memory mode).

`recomputing(modules, ...)` makes each given module, for the duration of a block, run as
one non-reentrant activation checkpoint (torch.utils.checkpoint): its forward keeps only
its inputs, and its activations are computed again, module by module, while the backward
pass reaches it. The result and the gradient are those of the plain forward; what the
backward pass holds at once is the inputs of the modules plus one module's activations.

Inside a recomputed module, tensor arguments that are inference tensors (weights loaded
or patched under ComfyUI's inference mode, conditioning) are given to each operation as
normal copies (`CloneInferenceArgs`): autograd refuses to save inference tensors, and a
checkpoint keeps nothing of them, so the copies live only while one operation or one
module's recomputation needs them. No weight of a recomputed module is ever copied for
good.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint


def _normal(value):
    if isinstance(value, Tensor) and value.is_inference():
        return value.clone()
    return value


class CloneInferenceArgs(TorchFunctionMode):
    """Every torch function called inside gets normal copies of inference-tensor arguments."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*tree_map(_normal, args), **tree_map(_normal, kwargs or {}))


def recomputed_call(forward: Callable, replaying: Callable[[bool], None] | None = None,
                    per_operation: bool = True) -> Callable:
    """`forward` as one activation checkpoint. `replaying(True/False)` is told when the
    backward pass recomputes it (the capture then computes its maps again without
    recording them a second time). `per_operation`: every operation inside gets normal
    copies of inference-tensor arguments (a module whose own weights may be inference
    tensors); else only the module's call arguments are copied, once (a Python mode on
    every operation is host time a GPU step cannot afford)."""
    calls = [0]

    def run(*args, **kwargs):
        calls[0] += 1
        replay = calls[0] > 1
        if replay and replaying is not None:
            replaying(True)
        try:
            if not per_operation:
                return forward(*tree_map(_normal, args), **tree_map(_normal, kwargs))
            with CloneInferenceArgs():
                return forward(*args, **kwargs)
        finally:
            if replay and replaying is not None:
                replaying(False)

    def call(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        calls[0] = 0
        # no randomness in an inference UNet's forward: no RNG state to keep
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return call


@contextlib.contextmanager
def recomputing(modules: Sequence[nn.Module], snapshot: Callable[[tuple, dict], tuple[tuple, dict]] | None = None,
                replaying: Callable[[bool], None] | None = None,
                per_operation: Callable[[nn.Module], bool] = lambda module: True) -> Iterator[None]:
    """While inside, each module's forward runs as its own activation checkpoint.

    `snapshot(args, kwargs)` may copy mutable arguments at call time (a dict the caller
    changes later, such as ComfyUI's transformer_options), so the recomputation sees what
    the forward saw. Each module's own `forward` attribute is restored on the way out."""
    patched = []
    try:
        for module in modules:
            if "forward" in module.__dict__:  # already an instance attribute (another pack's)
                original = module.__dict__["forward"]
            else:
                original = None
            inner = recomputed_call(module.forward, replaying, per_operation(module))

            def forward(*args, _inner=inner, **kwargs):
                if snapshot is not None:
                    args, kwargs = snapshot(args, kwargs)
                return _inner(*args, **kwargs)
            module.forward = forward
            patched.append((module, original))
        yield
    finally:
        for module, original in reversed(patched):
            if original is None:
                del module.forward
            else:
                module.forward = original
