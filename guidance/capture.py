"""Object-token cross-attention maps, recorded during the UNet's own forward pass.

Only the captured layers materialise attention probabilities, only for the cond rows,
and only the object tokens' columns are kept (ALGORITHM.md section 2):
    p = softmax(q k^T / (sqrt(d) T)) over all context tokens, mean over heads,
in float32 whatever the model's dtype. T = 1 is the paper's map. A temperature T > 1
softens only these recorded maps (the UNet's own attention is untouched): on a model whose
word attention is so sharp that an object's map is ~0 away from the object, the centroid
has no gradient toward the place it must go, and a softer map gives it one.
The store lives for one sampling run.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .boxes import box_masks, injection_delta
from .losses import Pair
from .relations import SpatialRelations


@dataclass(frozen=True)
class Layer:
    """A captured cross-attention layer: decoder block, transformer index, level."""

    block: int
    transformer: int
    level: str  # "coarse" | "mid" | "fine"


def object_slots(relations: SpatialRelations) -> tuple[tuple[tuple[int, ...], ...], tuple[Pair, ...]]:
    """Distinct token groups of all objects (the relations' first, then the boxes', then the
    listed objects'), and the relations as pairs of slot indices."""
    groups: list[tuple[int, ...]] = []
    pairs = []
    for item in relations.items:
        slots = []
        for tokens in (item.tokens_a, item.tokens_b):
            if tokens not in groups:
                groups.append(tokens)
            slots.append(groups.index(tokens))
        pairs.append(Pair(slots[0], slots[1], item.relation.relation))
    for bound in (*relations.boxes, *relations.objects):
        if bound.tokens not in groups:
            groups.append(bound.tokens)
    return tuple(groups), tuple(pairs)


def box_slots(relations: SpatialRelations) -> tuple[int, ...]:
    """The map slot (object_slots' order) of each of the relations' boxes."""
    groups, _ = object_slots(relations)
    return tuple(groups.index(b.tokens) for b in relations.boxes)


class _ObjectTokenProbs(torch.autograd.Function):
    """softmax(q k^T * scale)[..., columns], per head, keeping only q, k, the float32
    logsumexp and the result for backward: (B, N, H*d), (B, T, H*d) -> (B, H, N, J).

    The softmax over all T context tokens is needed (its normaliser), but only the object
    tokens' J columns are kept; backward recomputes the logits from q and k. q and k are
    the attention's own inputs, which the attention keeps for its backward anyway."""

    @staticmethod
    def forward(ctx, q, k, heads, columns, scale):
        qh, kh = _split_heads(q, heads), _split_heads(k, heads)
        logits = (qh @ kh.transpose(-1, -2)) * scale  # (B, H, N, T), transient
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits.index_select(-1, columns) - lse[..., None])
        ctx.save_for_backward(q, k, lse, probs, columns)
        ctx.heads, ctx.scale = heads, scale
        return probs

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, probs, columns = ctx.saved_tensors
        qh, kh = _split_heads(q, ctx.heads), _split_heads(k, ctx.heads)
        p_all = torch.exp((qh @ kh.transpose(-1, -2)) * ctx.scale - lse[..., None])  # (B, H, N, T)
        # d p_j / d l_t = p_j (delta_jt - p_t):  dL/dl = P * (G - sum_j g_j p_j)
        spread = torch.zeros_like(p_all).index_add_(-1, columns, grad)
        dlogits = p_all * (spread - (grad * probs).sum(dim=-1, keepdim=True))
        dq = (dlogits @ kh) * ctx.scale
        dk = (dlogits.transpose(-1, -2) @ qh) * ctx.scale
        return _merge_heads(dq, q), _merge_heads(dk, k), None, None, None


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d) in float32 at least (whatever the model's dtype)."""
    b, n, inner = t.shape
    return t.to(torch.promote_types(t.dtype, torch.float32)).view(b, n, heads, inner // heads).transpose(1, 2)


def _merge_heads(t: Tensor, like: Tensor) -> Tensor:
    return t.transpose(1, 2).reshape(like.shape).to(like.dtype)


def token_maps(q: Tensor, k: Tensor, heads: int, groups: Sequence[Sequence[int]],
               hw: tuple[int, int], temperature: float = 1.0) -> Tensor:
    """Mean-over-heads attention of each token group, (B, N, H*d), (B, T, H*d) -> (B, K, h, w).

    A group of several tokens (a multi-token object) gets the mean of its tokens' maps.
    `temperature` divides the logits before the softmax (1: the model's own probabilities).
    Only the object tokens' probabilities are kept for backward (_ObjectTokenProbs).
    """
    b, n, inner = q.shape
    d = inner // heads
    columns = sorted({t for g in groups for t in g})
    index = torch.tensor(columns, device=q.device)
    probs = _ObjectTokenProbs.apply(q, k, heads, index, d ** -0.5 / temperature).mean(dim=1)  # (B, N, J)
    slot = {t: i for i, t in enumerate(columns)}
    maps = torch.stack([probs[..., [slot[t] for t in g]].mean(dim=-1) for g in groups], dim=1)
    return maps.view(b, len(groups), *hw)


class TokenPositionError(ValueError):
    pass


@dataclass
class CaptureStore:
    """Maps of one sampling run's current step; `capturing` is on only while a step needs them.

    The ComfyUI glue narrows `capturing` to the sampler's own cond forward of a step (not the
    extra passes of SelfAttentionGuidance or PerturbedAttentionGuidance) and to calls that
    see the whole latent; `step_active`, `latent_hw` and `cropped_calls` are its bookkeeping.
    `replaying` is on while the backward pass of a `low` memory step computes a module's
    forward again (guidance/recompute.py): the maps are computed again, exactly as in the
    forward (the recomputation must repeat every saved tensor), and not recorded twice.
    """

    relations: SpatialRelations
    layers: tuple[Layer, ...]
    temperature: float = 1.0  # softmax temperature of the recorded maps (token_maps)
    groups: tuple[tuple[int, ...], ...] = ()
    pairs: tuple[Pair, ...] = ()
    capturing: bool = False
    replaying: bool = False
    injecting: bool = False  # this step's cond forward gets the boxes' attention injection
    step_active: bool = False  # inside a guided (or observed) step's prediction
    latent_hw: tuple[int, ...] | None = None  # spatial size of the whole latent of this step
    cropped_calls: int = 0  # attn2 calls of cond rows skipped because they saw a crop (area conds)
    warned_crop: bool = False
    controlled: bool = False  # this step's forward adds ControlNet residuals to the skips
    last: list[tuple[str, Tensor]] = field(default_factory=list)  # last non-empty take(), detached
    _maps: dict[Layer, list[Tensor]] = field(default_factory=lambda: defaultdict(list))

    def __post_init__(self):
        self.groups, self.pairs = object_slots(self.relations)

    def record(self, layer: Layer, q: Tensor, k: Tensor, heads: int,
               cond_or_uncond: Sequence[int], hw: tuple[int, int]) -> None:
        """Keep the cond rows' object maps of one attn2 call (a no-op unless capturing; computed
        and dropped while replaying)."""
        if not (self.capturing or self.replaying) or 0 not in cond_or_uncond:
            return
        longest = max(max(g) for g in self.groups)
        if longest >= k.shape[1]:
            raise TokenPositionError(
                f"Object token position {longest} is beyond the conditioning's {k.shape[1]} tokens: "
                "the relations were parsed from another text than the positive prompt. Connect the "
                "positive prompt's text to Spatial Relation Parse.")
        chunk = q.shape[0] // len(cond_or_uncond)
        rows = [i * chunk + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(chunk)]
        if len(rows) < q.shape[0]:  # (a guided step's forward holds cond rows only: no copy there)
            rows_t = torch.tensor(rows, device=q.device)
            q, k = q.index_select(0, rows_t), k.index_select(0, rows_t)
        maps = token_maps(q, k, heads, self.groups, hw, self.temperature)
        if self.capturing:
            # several cond entries (e.g. combined conditionings) are averaged per image
            self._maps[layer].append(maps.view(-1, chunk, *maps.shape[1:]).mean(dim=0))

    def injected(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: int,
                 cond_or_uncond: Sequence[int], hw: tuple[int, int]) -> Tensor:
        """An attention layer's output with the boxes' injection added on its cond rows
        (guidance.boxes.injection_delta), while injecting; else `out` itself. The delta is
        computed without autograd: for the step's gradient it is a constant shift of the
        output, so injection adds nothing to what backward keeps (its (B, H, N, 77) logits
        would be ~0.6 GiB on SDXL at 1024 px)."""
        if not self.injecting or 0 not in cond_or_uncond or not self.relations.boxes:
            return out
        chunk = q.shape[0] // len(cond_or_uncond)
        rows = torch.tensor([i * chunk + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(chunk)],
                            device=q.device)
        columns, masks = [], []
        for bound, mask in zip(self.relations.boxes, box_masks([b.box for b in self.relations.boxes], *hw, q)):
            for token in bound.tokens:
                columns.append(token)
                masks.append(mask.flatten())
        with torch.no_grad():
            delta = injection_delta(q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows),
                                    heads, columns, torch.stack(masks), self.relations.layout.injection)
        return out.index_add(0, rows, delta.to(out.dtype))

    def take(self) -> list[tuple[str, Tensor]]:
        """(level, maps (B, K, h, w)) per captured layer of this step; clears the store.
        A detached copy of a non-empty result stays in `last` for the run's trace."""
        out = [(layer.level, torch.stack(m).mean(dim=0)) for layer, m in self._maps.items() if m]
        self._maps = defaultdict(list)
        if out:
            self.last = [(level, maps.detach()) for level, maps in out]
        return out
