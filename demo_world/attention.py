"""Word attention of the demo UNet in training: the localisation loss and the probe.

Both read the mean-over-heads cross-attention of InfSplign's "auto" layers (decoder output
blocks 3-8 of an SD1.x UNet). For each object named in a caption (one to three), its
words' token-mean attention map is compared with where the object is:
- the loss is the share of that map falling outside the object;
- the probe counts objects whose attention centroid lies nearer their own centre than any
  other object's of the same image.
Object tensors are (B, N, ...) for N object slots; an image with fewer objects has empty
token groups in the rest (zero weights), which both skip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .text import encode

PROBE_BLOCKS = (3, 4, 5, 6, 7, 8)  # InfSplign's "auto" layers on an SD1.x UNet


def recording_attention(blocks: tuple[int, ...], found: list[torch.Tensor]) -> dict:
    """transformer_options whose attn2 on `blocks` computes attention explicitly (with
    autograd) and keeps the mean-over-heads probabilities (B, h, w, T) in `found`."""
    def patch(q, k, v, extra):
        heads = extra["n_heads"]
        b, n, inner = q.shape
        d = inner // heads
        qh = q.view(b, n, heads, d).transpose(1, 2)
        kh = k.view(b, -1, heads, d).transpose(1, 2)
        vh = v.view(b, -1, heads, d).transpose(1, 2)
        p = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
        h, w = extra["activations_shape"][-2:]
        found.append(p.mean(dim=1).view(b, h, w, -1))
        return (p @ vh).transpose(1, 2).reshape(b, n, inner)
    return {"patches_replace": {"attn2": {("output", blk, 0): patch for blk in blocks}}}


def token_weights(groups, length: int, device=None) -> torch.Tensor:
    """(B, N, T): weight 1/n on each of an object's n token positions, rows of zeros for
    none; N is the most groups of a row (two for the classic (a, b) pairs)."""
    slots = max((len(g) for g in groups), default=0)
    w = torch.zeros(len(groups), slots, length)
    for i, row in enumerate(groups):
        for j, tokens in enumerate(row):
            if tokens:
                w[i, j, list(tokens)] = 1.0 / len(tokens)
    return w.to(device)


def object_maps(p: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N, h, w) each object's token-mean attention (B, h, w, T -> ...), summing to 1."""
    m = torch.einsum("bhwt,bjt->bjhw", p, weights)
    return m / m.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def attention_outside(found: list[torch.Tensor], batch) -> torch.Tensor:
    """Mean share of each named object's word attention that falls outside the object
    (`batch`: a training Batch with weights (B, N, T) and coverage (B, N, 16, 16))."""
    if not found:
        return torch.zeros(())
    weights = batch.weights.to(found[0].device)
    named = weights.sum(dim=-1) > 0  # (B, N)
    if not named.any():
        return torch.zeros((), device=found[0].device)
    terms = []
    for p in found:
        cover = F.adaptive_avg_pool2d(batch.coverage, p.shape[1])  # (B, N, h, w)
        inside = (object_maps(p, weights) * cover).sum(dim=(-2, -1))  # (B, N)
        terms.append(1.0 - inside[named])
    return torch.cat(terms).mean()


def attention_probs(base, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                    blocks: tuple[int, ...] = PROBE_BLOCKS) -> list[torch.Tensor]:
    """Mean-over-heads cross-attention (B, h, w, T) of the given output blocks at one step."""
    found: list[torch.Tensor] = []
    with torch.no_grad():
        base.apply_model(x, sigma, c_crossattn=context,
                         transformer_options=recording_attention(blocks, found))
    return found


def word_centroids(probs: list[torch.Tensor], groups) -> torch.Tensor:
    """(B, N, 2) attention centroid of each object's tokens, in image fractions [0, 1], on
    the CPU (the mean over layers; zeros for an object without tokens)."""
    out = torch.zeros(len(groups), max((len(g) for g in groups), default=0), 2)
    for p in probs:
        b, h, w, t = p.shape
        m = object_maps(p.float(), token_weights(groups, t, p.device)).cpu()
        xs = (torch.arange(w) + 0.5) / w
        ys = (torch.arange(h) + 0.5) / h
        out[..., 0] += (m.sum(dim=-2) * xs).sum(dim=-1) / len(probs)
        out[..., 1] += (m.sum(dim=-1) * ys).sum(dim=-1) / len(probs)
    return out


def nearer_own(centroids: torch.Tensor, centres: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: each object's word centroid is nearer its own centre than any other
    present object's (`present` (B, N) bool, default all). With two objects: nearer its own
    than the other's. An object alone in its image counts as nearer."""
    if present is None:
        present = torch.ones(centres.shape[:2], dtype=torch.bool)
    dist = (centroids[:, :, None] - centres[:, None]).norm(dim=-1)  # (B, i: word, j: centre)
    own = dist.diagonal(dim1=1, dim2=2)
    others = present[:, None, :] & ~torch.eye(centres.shape[1], dtype=torch.bool)[None]
    nearest_other = dist.masked_fill(~others, float("inf")).amin(dim=-1)
    return own < nearest_other


def probe_localisation(base, clip, batch, sigma_value: float, generator: torch.Generator) -> float:
    """Share of the named objects of a batch's scenes (with two objects or more) whose word
    attention centroid is nearer their own centre than another object's, at one noise level."""
    present = batch.weights.cpu().sum(dim=-1) > 0  # (B, N)
    keep = ~batch.empty.cpu() & (present.sum(dim=-1) >= 2)
    device = base.model_sampling.sigmas.device
    x0 = batch.x0.cpu()[keep]
    groups = [g for g, e in zip(batch.groups, keep.tolist()) if e]
    ids = [t for t, e in zip(batch.ids, keep.tolist()) if e]
    with torch.no_grad():
        context = encode(clip, ids)
    sigma = torch.full((x0.shape[0],), sigma_value)
    x = x0 + torch.randn(x0.shape, generator=generator) * sigma_value
    probs = attention_probs(base, x.to(device), sigma.to(device), context)
    near = nearer_own(word_centroids(probs, groups), batch.centres.cpu()[keep], present[keep])
    return near[present[keep]].float().mean().item()
