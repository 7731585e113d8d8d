"""Exact byte counts of a computation: live tensor memory, its peak, and what autograd keeps.

`MemoryCounter` is a TorchDispatchMode: every storage an operation creates inside it is
counted while it lives (views and in-place results share their input's storage and are
not counted again), so `peak` is the most memory that the computation's own tensors held
at once. The same run also records what autograd saves for backward (saved_tensors_hooks),
once per storage: `saved()` is what a backward pass would keep alive. Tensors that existed
before the count (weights, inputs) are never counted. It works the same on real tensors
and on the meta device, where nothing is allocated and a full SDXL step is counted in
seconds; real and meta counts of the same step agree (bench/memory.py shows it).

Two attention functions with the memory behaviour of real kernels, for counting on
devices that do not have them (meta, CPU): `efficient_attention` keeps what a
memory-efficient / flash kernel keeps (q, k, v, output, one float32 logsumexp per query
and head; no n x n weights), `math_attention` the softmax weights of every head.
Both compute the real result on real tensors (the first with PyTorch's flash kernel for
the CPU, whose work buffers, like a CUDA kernel's, are not tensors the count sees).
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages(values) -> dict[int, object]:
    out = {}
    for t in tree_leaves(values):
        if isinstance(t, Tensor) and t.layout == torch.strided:
            st = t.untyped_storage()
            out[st._cdata] = st
    return out


class MemoryCounter(TorchDispatchMode):
    """Live bytes of the storages created inside the mode, their peak, and the storages
    autograd saved for backward. Use as a context manager; `mark()` starts a new peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._saved: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def __enter__(self):
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._hooks.__exit__(*exc)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._saved.pop(key, None)

    def _pack(self, t: Tensor) -> Tensor:
        if t.layout == torch.strided:
            key = t.untyped_storage()._cdata
            if key in self.live:  # weights and inputs from outside are not the step's memory
                self._saved[key] = self.live[key]
        # An alias without grad_fn: handing back `t` itself would tie an op's saved output to
        # its own graph node in C++ (a cycle Python's collector cannot see, a graph kept alive).
        return t.detach()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storages((args, kwargs))
        for key, st in _storages(out).items():
            if key in inputs or key in self.live:  # a view or an in-place result
                continue
            size = st.nbytes()
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)
        return out

    def saved(self) -> int:
        """Bytes of the distinct storages autograd keeps for backward right now."""
        return sum(self._saved.values())

    def mark(self) -> int:
        """Start a new peak from the current level; returns the current level."""
        self.peak = self.current
        return self.current


def _heads(t: Tensor, heads: int) -> Tensor:
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


class _EfficientAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v by PyTorch's flash-attention kernel for the CPU, which
    also runs on meta tensors: it keeps q, k, v, the output and a float32 logsumexp for
    backward, and its work buffers are its own, as memory-efficient CUDA kernels do.
    (b, n, h*d) in and out."""

    @staticmethod
    def forward(ctx, q, k, v, heads):
        qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh)[:2]
        ctx.save_for_backward(qh, kh, vh, out, lse)
        return out.transpose(1, 2).reshape(q.shape)

    @staticmethod
    def backward(ctx, grad):
        qh, kh, vh, out, lse = ctx.saved_tensors
        g = grad.view(out.shape[0], out.shape[2], out.shape[1], out.shape[3]).transpose(1, 2)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, qh, kh, vh, out, lse, 0.0, False)
        back = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # noqa: E731
        return back(dq), back(dk), back(dv), None


def efficient_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Attention with a memory-efficient kernel's footprint (no n x n weights kept)."""
    return _EfficientAttention.apply(q, k, v, heads)


def math_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, upcast: bool = False) -> Tensor:
    """Attention by explicit softmax weights (autograd keeps them: n x n per head)."""
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    if upcast:
        qh, kh = qh.float(), kh.float()
    weights = torch.softmax((qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5, dim=-1).to(v.dtype)
    return (weights @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
