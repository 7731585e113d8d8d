"""Object maps of a joint (MMDiT) attention call: image queries over the object text keys.

An MMDiT block attends over one sequence that holds the text tokens and the image tokens
(Flux: [text | image]; SD3: [context | image]). The object map of that call, for object k
and image token i, is

    m[k, i] = mean over heads of  sum_j W[k, j] P[h, i, c_j],
    P[h, i, :] = softmax over ALL keys of the call (text and image) of q_hi . k_h: * scale,

i.e. the probability the model itself gives to the object's text keys, with W the MapIndex
weights of attention_maps (a multi-token object: the mean of its tokens' columns, as on the
UNet; `object_index(..., reduce="sum")` gives the summed probability mass instead). Rows are
image queries only; the result is (B, K, h, w).

Memory. The full softmax normalises over text + image keys: the logits of one Flux 1024 px
call are 24 heads x 4096 image queries x 4352 keys, 1.7 GB in float32. They are never held
at once: the image queries go in chunks, each chunk's logsumexp over all keys is computed
with its logits and dropped with them, and only the object columns leave the chunk. The
gradient (`_JointMaps`) saves nothing but references to q and k (which the model's own
attention keeps for its backward anyway) and recomputes the chunks in backward.
Computed in float32 (float64 for a float64 model), whatever the model's dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .attention_maps import MapIndex, compute_dtype

CHUNK_BYTES = 256 * 2**20  # the logits of one chunk of image queries (B x H x rows x L, compute dtype)


def object_index(groups: Sequence[Sequence[int]], device, reduce: str = "mean") -> MapIndex:
    """MapIndex of object token positions in the call's sequence: `reduce` "mean" (the
    pack's convention for a multi-token object) or "sum" (the probability mass)."""
    index = MapIndex.of(groups, device)
    if reduce == "mean":
        return index
    if reduce == "sum":
        return MapIndex(index.columns, (index.groups > 0).to(index.groups.dtype))
    raise ValueError(f"reduce must be 'mean' or 'sum', not {reduce!r}")


def chunk_rows(q: Tensor, keys: int, budget: int = CHUNK_BYTES) -> int:
    """Image queries per chunk so that one chunk's logits stay within `budget` bytes."""
    b, h = q.shape[0], q.shape[1]
    row = b * h * keys * torch.finfo(compute_dtype(q.dtype)).bits // 8
    return max(1, budget // max(row, 1))


def _chunks(image: tuple[int, int], rows: int):
    for start in range(image[0], image[1], rows):
        yield start, min(start + rows, image[1])


def _chunk_probs(q: Tensor, k: Tensor, start: int, stop: int, scale: float) -> Tensor:
    """Softmax over all keys of the image queries start:stop, (B, H, rows, L)."""
    return torch.softmax((q[:, :, start:stop].to(k.dtype) @ k.transpose(-1, -2)) * scale, dim=-1)


def _forward(q: Tensor, k: Tensor, image: tuple[int, int], index: MapIndex, scale: float, rows: int) -> Tensor:
    want = compute_dtype(q.dtype)
    kc = k.to(want)
    heads = q.shape[1]
    weights = index.groups.to(want)  # (K, J)
    out = []
    for start, stop in _chunks(image, rows):
        p = _chunk_probs(q, kc, start, stop, scale).index_select(-1, index.columns)  # (B, H, rows, J)
        out.append(p.sum(dim=1) @ (weights.t() / heads))  # (B, rows, K)
    return torch.cat(out, dim=1).transpose(1, 2)  # (B, K, N)


class _JointMaps(torch.autograd.Function):
    """(B, K, N) object maps of one joint call; saves only q and k, recomputes in backward."""

    @staticmethod
    def forward(ctx, q, k, image, columns, groups, scale, rows):
        index = MapIndex(columns, groups)
        ctx.save_for_backward(q, k)
        ctx.image, ctx.index, ctx.scale, ctx.rows = image, index, scale, rows
        return _forward(q, k, image, index, scale, rows)

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        want = compute_dtype(q.dtype)
        kc = k.to(want)
        heads = q.shape[1]
        columns, weights = ctx.index.columns, ctx.index.groups.to(want)
        grad = grad.to(want)
        dq = torch.zeros(q.shape, dtype=want, device=q.device) if ctx.needs_input_grad[0] else None
        dk = torch.zeros(kc.shape, dtype=want, device=k.device) if ctx.needs_input_grad[1] else None
        n0 = ctx.image[0]
        for start, stop in _chunks(ctx.image, ctx.rows):
            p = _chunk_probs(q, kc, start, stop, ctx.scale)  # (B, H, rows, L)
            # d map[k, i] / d P[h, i, c_j] = W[k, j] / H: per query row and object column
            g = (grad[:, :, start - n0:stop - n0].transpose(1, 2) @ weights / heads).unsqueeze(1)  # (B, 1, rows, J)
            # softmax: dL/ds_l = P_l (G_l - sum_j G_j P_j), G at the object columns (zero
            # elsewhere), times the logit scale: written into p itself, so that a chunk's
            # backward holds one (B, H, rows, L) tensor besides the logits it came from
            p_obj = p.index_select(-1, columns)  # (B, H, rows, J)
            total = (g * p_obj).sum(dim=-1, keepdim=True)
            dlogits = p.mul_(-ctx.scale * total).index_add_(-1, columns, p_obj * g * ctx.scale)
            if dq is not None:
                dq[:, :, start:stop] = dlogits @ kc
            if dk is not None:
                dk += dlogits.transpose(-1, -2) @ q[:, :, start:stop].to(want)
            del p, dlogits  # before the next chunk's logits: one chunk alive at a time
        return (None if dq is None else dq.to(q.dtype), None if dk is None else dk.to(k.dtype),
                None, None, None, None, None)


def joint_maps(q: Tensor, k: Tensor, image: tuple[int, int], index: MapIndex, hw: tuple[int, int],
               scale: float | None = None, rows: int | None = None) -> Tensor:
    """Object maps of one joint attention call.

    q, k: (B, H, L, D), post-RoPE, as the attention function receives them; `image`: the
    (start, stop) of the image tokens in the sequence, stop - start = h * w; `index`: the
    object columns (positions in the sequence) and their weights (object_index); `scale`:
    the call's logit scale (default D ** -0.5); `rows`: image queries per chunk (default from
    CHUNK_BYTES). Returns (B, K, h, w) in float32 (float64 for a float64 model)."""
    if image[1] - image[0] != hw[0] * hw[1]:
        raise ValueError(f"{image[1] - image[0]} image tokens do not make a {hw[0]} x {hw[1]} map")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    rows = chunk_rows(q, k.shape[2]) if rows is None else int(rows)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        maps = _JointMaps.apply(q, k, tuple(image), index.columns, index.groups, scale, rows)
    else:
        maps = _forward(q, k, tuple(image), index, scale, rows)
    return maps.reshape(maps.shape[0], maps.shape[1], *hw)


def joint_injection_delta(q: Tensor, k: Tensor, v: Tensor, image: tuple[int, int], columns: Tensor,
                          masks: Tensor, strength: float, scale: float, rows: int) -> Tensor:
    """iLGD's injection on one joint call: what it changes in the output of the image queries,
    softmax(l + bias) v - softmax(l) v over all keys of the call (text and image), with the bias
    of guidance/boxes.injection_bias: for each object token column, `strength` times the range
    of its logit over all image queries (per image and head) where its box covers the query
    (masks (J, N)). q, k, v (B, H, L, D); returns (B, H, N, D) in the compute dtype, `rows`
    image queries at a time (never an (N, L) matrix of all queries at once). Not differentiated."""
    want = compute_dtype(q.dtype)
    qi = q[:, :, image[0]:image[1]].to(want)
    kc, vc = k.to(want), v.to(want)
    picked = (qi @ kc.index_select(2, columns).transpose(-1, -2)) * scale  # (B, H, N, J)
    weight = strength * (picked.amax(dim=-2, keepdim=True) - picked.amin(dim=-2, keepdim=True))  # (B, H, 1, J)
    cover = masks.to(want)
    out = []
    for start, stop in _chunks((0, qi.shape[2]), rows):
        logits = (qi[:, :, start:stop] @ kc.transpose(-1, -2)) * scale  # (B, H, rows, L)
        bias = torch.zeros_like(logits).index_add_(-1, columns, weight * cover[:, start:stop].t()[None, None])
        out.append((torch.softmax(logits + bias, dim=-1) - torch.softmax(logits, dim=-1)) @ vc)
    return torch.cat(out, dim=2)
