"""Object-token attention maps of several attention layers at once (ALGORITHM.md section 2).

For each layer: p = softmax(q k^T / (sqrt(d) T)) over all T context tokens, in float32
whatever the model's dtype, mean over heads, then the object tokens' columns (a
multi-token object: the mean of its tokens' columns). T = 1 is the paper's map; a higher
temperature softens only these maps, never the model's own attention.

Layers whose queries and keys have the same shapes (one resolution level of a UNet) are
computed as one batch: on a GPU a step's cost is the number of operations the host
dispatches, and a level of 30 layers costs what one layer costs. `MapIndex` holds the index
tensors of a run on one device (made once, never from Python lists inside a step).

The gradient: `_TokenMaps` keeps only references to the layers' own q and k (which the
model's attention keeps for its backward anyway) and computes the softmax again in backward,
so no (heads x queries x tokens) tensor outlives the forward.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MapIndex:
    """The object columns and their grouping, on one device.

    columns: (J,) the distinct object token positions; groups: (K, J), row k holding
    1 / len(group k) at the columns of object k (the mean of a multi-token object)."""

    columns: Tensor
    groups: Tensor

    @staticmethod
    def of(groups: Sequence[Sequence[int]], device) -> MapIndex:
        columns = sorted({t for g in groups for t in g})
        slot = {t: i for i, t in enumerate(columns)}
        # (normal tensors even inside ComfyUI's inference mode: autograd saves them)
        with torch.inference_mode(False):
            weights = torch.zeros(len(groups), len(columns), dtype=torch.float32)
            for k, group in enumerate(groups):
                for token in group:
                    weights[k, slot[token]] += 1.0 / len(group)
            return MapIndex(torch.tensor(columns, dtype=torch.long).to(device), weights.to(device))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the model computes in it."""
    return torch.promote_types(dtype, torch.float32)


def _stacked(tensors: Sequence[Tensor], rows: slice | Tensor | None) -> Tensor:
    """(L, B', n, C) in the compute dtype: the layers' tensors, rows `rows` of the batch."""
    t = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tuple(tensors))
    if isinstance(rows, slice):
        t = t[:, rows]
    elif rows is not None:
        t = t.index_select(1, rows)
    want = compute_dtype(t.dtype)
    return t if t.dtype == want else t.to(want)


def _heads(q: Tensor, k: Tensor, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """(L, B, N, C), (L, B, T, C) -> q (LB, H, N, d) and k * scale as (LB, H, d, T)."""
    l, b, n, c = q.shape
    d = c // heads
    qh = q.reshape(l * b, n, heads, d).transpose(1, 2)
    kh = (k * scale).view(l * b, k.shape[2], heads, d).permute(0, 2, 3, 1)
    return qh, kh


def _probs(qh: Tensor, kh: Tensor) -> Tensor:
    """softmax over the tokens of q k^T (already scaled): (LB, H, N, T)."""
    return torch.softmax(qh @ kh, dim=-1)


class _TokenMaps(torch.autograd.Function):
    """Object maps of L layers, as (LB', K, N): head-mean probabilities of the object
    columns, each object the mean of its columns (`groups` (K, J)).

    Inputs after the settings: q_1..q_L, k_1..k_L of shape (B, N, C) and (B, T, C). Only
    references to them are saved (nothing else: a `low` step's recomputation repeats exactly
    that); backward stacks them again and recomputes the softmax."""

    @staticmethod
    def forward(ctx, heads, scale, columns, groups, rows, *qk):
        layers = len(qk) // 2
        qh, kh = _heads(_stacked(qk[:layers], rows), _stacked(qk[layers:], rows), heads, scale)
        probs = _probs(qh, kh).index_select(-1, columns).mean(dim=1)  # (LB', N, J)
        ctx.save_for_backward(*qk)
        ctx.heads, ctx.scale, ctx.columns, ctx.groups, ctx.rows = heads, scale, columns, groups, rows
        return groups.to(probs.dtype) @ probs.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad):
        qk = ctx.saved_tensors
        layers = len(qk) // 2
        qs, ks = qk[:layers], qk[layers:]
        first = 5  # inputs before the q's
        want_q, want_k = any(ctx.needs_input_grad[first:first + layers]), any(ctx.needs_input_grad[first + layers:])
        q, k = _stacked(qs, ctx.rows), _stacked(ks, ctx.rows)
        qh, kh = _heads(q, k, ctx.heads, ctx.scale)
        p = _probs(qh, kh)  # (LB, H, N, T)
        # maps = groups @ mean_h(P_J)^T: the gradient per head and object column
        g = ((grad.transpose(-1, -2) @ ctx.groups.to(grad.dtype)) / ctx.heads).unsqueeze(1).expand(
            -1, ctx.heads, -1, -1)  # (LB, H, N, J)
        # d P_j / d l_t = P_j (delta_jt - P_t):  dL/dl = P * (G - sum_j g_j P_j)
        spread = torch.zeros_like(p).index_add_(-1, ctx.columns, g)
        dlogits = p * (spread - (g * p.index_select(-1, ctx.columns)).sum(dim=-1, keepdim=True))
        grads_q = grads_k = (None,) * layers
        if want_q:  # d logits / d q = k * scale
            dq = (dlogits @ kh.transpose(-1, -2)).transpose(1, 2).reshape(q.shape)
            grads_q = _unstacked(dq, qs, ctx.rows)
        if want_k:  # d logits / d k = q * scale
            dk = (dlogits.transpose(-1, -2) @ qh).transpose(1, 2).reshape(k.shape) * ctx.scale
            grads_k = _unstacked(dk, ks, ctx.rows)
        return (None, None, None, None, None, *grads_q, *grads_k)


def _unstacked(grad: Tensor, like: Sequence[Tensor], rows: slice | Tensor | None) -> tuple[Tensor, ...]:
    """The gradient (L, B', n, C) of the stacked rows as one gradient per layer (B, n, C)."""
    if rows is not None:
        full = grad.new_zeros(len(like), *like[0].shape)
        full[:, rows] = grad
        grad = full
    grad = grad.to(like[0].dtype)
    return tuple(grad.unbind(0)) if len(like) > 1 else (grad[0],)


class _SavesQK(torch.autograd.Function):
    """Saves what _TokenMaps saves, computes nothing: the recomputation of a `low` memory
    step repeats a captured layer's forward only to give autograd back its saved tensors,
    and _TokenMaps' saved tensors are q and k themselves."""

    @staticmethod
    def forward(ctx, *qk):
        ctx.save_for_backward(*qk)
        return qk[0].new_empty(0)

    @staticmethod
    def backward(ctx, grad):
        return (None,) * len(ctx.saved_tensors)


def token_maps_of_layers(qs: Sequence[Tensor], ks: Sequence[Tensor], heads: int, index: MapIndex,
                         hw: tuple[int, int], temperature: float = 1.0, rows: slice | Tensor | None = None) -> Tensor:
    """Object maps of L layers with equal shapes: q_i (B, N, H*d), k_i (B, T, H*d), rows
    `rows` of the batch (a slice, or a long tensor of positions) -> (L, B', K, h, w), in
    float32 (float64 for a float64 model)."""
    scale = (qs[0].shape[-1] // heads) ** -0.5 / temperature
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*qs, *ks)):
        maps = _TokenMaps.apply(heads, scale, index.columns, index.groups, rows, *qs, *ks)
    else:
        qh, kh = _heads(_stacked(qs, rows), _stacked(ks, rows), heads, scale)
        probs = _probs(qh, kh).index_select(-1, index.columns).mean(dim=1)  # (LB', N, J)
        maps = index.groups.to(probs.dtype) @ probs.transpose(-1, -2)
    return maps.view(len(qs), -1, maps.shape[1], *hw)  # (LB', K, N) -> (L, B', K, h, w)


def replay_saved(q: Tensor, k: Tensor) -> None:
    """In a `low` step's recomputation: save for backward what token_maps_of_layers saved."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        _SavesQK.apply(q, k)


def token_maps(q: Tensor, k: Tensor, heads: int, groups: Sequence[Sequence[int]],
               hw: tuple[int, int], temperature: float = 1.0) -> Tensor:
    """One layer's object maps, (B, N, H*d), (B, T, H*d) -> (B, K, h, w) (index made here:
    for tests and one-off use; a sampling run keeps its MapIndex)."""
    return token_maps_of_layers((q,), (k,), heads, MapIndex.of(groups, q.device), hw, temperature)[0]
