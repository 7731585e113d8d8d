"""The run's capture of object-token attention maps, during the model's own forward pass.

Only the captured layers, only the cond rows and only the object tokens' columns are
computed (guidance/attention_maps.py), in float32 whatever the model's dtype. A layer's
q and k are set aside when the model computes its attention, and the maps of all layers
with the same shapes are computed together (a chunk of at most CHUNK_BYTES of work memory
at a time): far fewer operations than one computation per layer, the same numbers. In a
`low` memory step (`immediate`) each layer's maps are computed inside the layer instead,
so that the recomputation of its module covers them.

The store lives for one sampling run; its index tensors are made once per run and device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention_maps import MapIndex, compute_dtype, replay_saved, token_maps_of_layers
from .boxes import box_masks, injection_delta
from .joint_attention import chunk_rows, joint_maps
from .losses import Pair
from .relations import SpatialRelations

# Work memory of one chunk of layers whose maps are computed together (their stacked
# float32 q and k, the logits and the softmax): more layers per chunk means fewer
# operations, and more memory for a moment.
CHUNK_BYTES = 64 * 2**20
# Logits of one chunk of image queries of a joint (MMDiT) call whose maps are computed inside
# the call (a `low` step): what the recomputation holds on top of one block's activations.
JOINT_LOW_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Layer:
    """A captured cross-attention layer: decoder block, transformer index, level."""

    block: int
    transformer: int
    level: str  # "coarse" | "mid" | "fine"
    kind: str = ""  # MMDiT: "double" (joint block) or "single" (single-stream block); UNet: ""


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


class TokenPositionError(ValueError):
    pass


@dataclass(frozen=True)
class Rows:
    """Which rows of an attention call's batch are cond rows: a contiguous run
    [start, stop), or the scattered positions `at`."""

    start: int = 0
    stop: int = 0
    at: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return len(self.at) if self.at else self.stop - self.start

    def as_slice(self) -> slice | None:
        return None if self.at else slice(self.start, self.stop)


def cond_rows(cond_or_uncond: Sequence[int], batch: int) -> tuple[Rows | None, int]:
    """The rows of the cond entries in an attention call's batch of len(cond_or_uncond)
    entries of batch // len(cond_or_uncond) images each, and how many cond entries there
    are (several, e.g. combined conditionings, are averaged per image). None: every row."""
    chunk = batch // len(cond_or_uncond)
    entries = [i for i, c in enumerate(cond_or_uncond) if c == 0]
    if len(entries) == len(cond_or_uncond):
        return None, len(entries)
    if entries == list(range(entries[0], entries[-1] + 1)):
        return Rows(entries[0] * chunk, (entries[-1] + 1) * chunk), len(entries)
    return Rows(at=tuple(i * chunk + j for i in entries for j in range(chunk))), len(entries)


@dataclass
class _Pending:
    """Layers of one shape set aside in this step, waiting to be computed together."""

    layers: list[Layer]
    qs: list[Tensor]
    ks: list[Tensor]
    heads: int
    hw: tuple[int, int]
    rows: object
    entries: int
    capacity: int


@dataclass
class CaptureStore:
    """Maps of one sampling run's current step; `capturing` is on only while a step needs them.

    The ComfyUI glue narrows `capturing` to the sampler's own cond forward of a step (not the
    extra passes of SelfAttentionGuidance or PerturbedAttentionGuidance) and to calls that
    see the whole latent; `step_active`, `latent_hw` and `cropped_calls` are its bookkeeping.
    `immediate` computes each layer's maps at once (a `low` memory step). `replaying` is on
    while the backward pass of a `low` step computes a module's forward again
    (guidance/recompute.py): the layer then saves for backward what its maps saved, and
    records nothing.
    """

    relations: SpatialRelations
    layers: tuple[Layer, ...]
    temperature: float = 1.0  # softmax temperature of the recorded maps
    groups: tuple[tuple[int, ...], ...] = ()
    pairs: tuple[Pair, ...] = ()
    capturing: bool = False
    replaying: bool = False
    immediate: bool = False
    batched: bool = False  # this guided step's forward runs cond and uncond rows together with autograd
    injecting: bool = False  # this step's cond forward gets the boxes' attention injection
    step_active: bool = False  # inside a guided (or observed) step's prediction
    latent_hw: tuple[int, ...] | None = None  # spatial size of the whole latent of this step
    cropped_calls: int = 0  # attn2 calls of cond rows skipped because they saw a crop (area conds)
    warned_crop: bool = False
    controlled: bool = False  # this step's forward adds ControlNet residuals to the skips
    last: list[tuple[str, Tensor]] = field(default_factory=list)  # last non-empty take(), detached
    _pending: dict = field(default_factory=dict)
    _done: list = field(default_factory=list)  # (layers, maps (L, B, K, h, w))
    _index: dict = field(default_factory=dict)  # device -> MapIndex
    _rows: dict = field(default_factory=dict)  # (rows, device) -> index tensor
    _boxes: dict = field(default_factory=dict)  # (h, w, device) -> (columns, masks (J, N))
    sigma_at: dict = field(default_factory=dict)  # schedule percent -> sigma, read once per run
    cache: dict = field(default_factory=dict)  # the model's module lists, walked once per run

    def __post_init__(self):
        self.groups, self.pairs = object_slots(self.relations)

    def index(self, device) -> MapIndex:
        if device not in self._index:
            self._index[device] = MapIndex.of(self.groups, device)
        return self._index[device]

    def _row_index(self, rows: Rows | None, device, as_tensor: bool = False):
        """`rows` (cond_rows) as indexing needs them: None, a slice for a contiguous run, else
        (or with as_tensor) a long tensor on `device`, made once per run."""
        if rows is None or (not rows.at and not as_tensor):
            return None if rows is None else rows.as_slice()
        if (rows, device) not in self._rows:
            values = rows.at or range(rows.start, rows.stop)
            with torch.inference_mode(False):  # (autograd saves index tensors)
                self._rows[(rows, device)] = torch.tensor(list(values), dtype=torch.long).to(device)
        return self._rows[(rows, device)]

    def record(self, layer: Layer, q: Tensor, k: Tensor, heads: int,
               cond_or_uncond: Sequence[int], hw: tuple[int, int]) -> None:
        """Set aside the cond rows' q and k of one attn2 call (a no-op unless capturing; while
        replaying, save what the maps saved)."""
        if not (self.capturing or self.replaying) or 0 not in cond_or_uncond:
            return
        if self.replaying:
            replay_saved(q, k)
            return
        longest = max(max(g) for g in self.groups)
        if longest >= k.shape[1]:
            raise TokenPositionError(
                f"Object token position {longest} is beyond the conditioning's {k.shape[1]} tokens: "
                "the relations were parsed from another text than the positive prompt. Connect the "
                "positive prompt's text to Spatial Relation Parse.")
        rows, entries = cond_rows(cond_or_uncond, q.shape[0])
        key = (tuple(hw), heads, tuple(q.shape), tuple(k.shape), q.dtype, q.device, rows)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending([], [], [], heads, tuple(hw), rows, entries,
                                                    1 if self.immediate else _capacity(q, k, heads, rows))
        pending.layers.append(layer)
        pending.qs.append(q)
        pending.ks.append(k)
        if len(pending.layers) >= pending.capacity:
            self._flush(key)

    def record_joint(self, layer: Layer, q: Tensor, k: Tensor, image: tuple[int, int], hw: tuple[int, int],
                     scale: float, cond_or_uncond: Sequence[int], copies: int = 1) -> None:
        """The object maps of one joint (MMDiT) attention call: q, k (B, H, L, D) over one
        sequence of text and image tokens, `image` the image tokens' (start, stop), the text
        before them (guidance/joint_attention.py); `copies`: how many times the prompt's
        rows repeat in the text (each copy gets an equal share of the probability). Computed now, on the cond rows: the maps
        are kilobytes, and their gradient recomputes the logits from q and k, which the
        model's own attention keeps for its backward anyway. A no-op unless capturing; while
        replaying (a `low` block's recomputation), save what the maps saved."""
        if not (self.capturing or self.replaying) or 0 not in cond_or_uncond:
            return
        rows, entries = cond_rows(cond_or_uncond, q.shape[0])
        if rows is not None:
            index = self._row_index(rows, q.device, as_tensor=bool(rows.at))
            q, k = (t[index] if isinstance(index, slice) else t.index_select(0, index) for t in (q, k))
        if self.replaying:
            replay_saved(q, k)
            return
        longest = max(max(g) for g in self.groups)
        if longest >= image[0]:
            raise TokenPositionError(
                f"Object token position {longest} is beyond the conditioning's {image[0]} text tokens: "
                "the relations were parsed from another text than the positive prompt. Connect the "
                "positive prompt's text to Spatial Relation Parse.")
        budget = JOINT_LOW_CHUNK_BYTES if self.immediate else None
        maps = joint_maps(q, k, image, self.index(q.device), hw, scale=scale / self.temperature,
                          rows=None if budget is None else chunk_rows(q, k.shape[2], budget))
        if copies > 1:
            maps = maps * copies
        if entries > 1:  # several cond entries of each image: their mean
            maps = maps.view(entries, -1, *maps.shape[1:]).mean(dim=0)
        self._done.append(((layer,), maps.unsqueeze(0)))

    def _flush(self, key) -> None:
        p = self._pending.pop(key)
        maps = token_maps_of_layers(p.qs, p.ks, p.heads, self.index(p.qs[0].device), p.hw, self.temperature,
                                    self._row_index(p.rows, p.qs[0].device))
        if p.entries > 1:  # several cond entries of each image: their mean
            maps = maps.view(maps.shape[0], p.entries, -1, *maps.shape[2:]).mean(dim=1)
        self._done.append((tuple(p.layers), maps))

    def injected(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: int,
                 cond_or_uncond: Sequence[int], hw: tuple[int, int]) -> Tensor:
        """An attention layer's output with the boxes' injection added on its cond rows
        (guidance.boxes.injection_delta), while injecting; else `out` itself. The delta is
        computed without autograd: for the step's gradient it is a constant shift of the
        output, so injection adds nothing to what backward keeps (its (B, H, N, 77) logits
        would be ~0.6 GiB on SDXL at 1024 px)."""
        if not self.injecting or 0 not in cond_or_uncond or not self.relations.boxes:
            return out
        rows, _ = cond_rows(cond_or_uncond, q.shape[0])
        columns, masks = self._box_index(tuple(hw), q.device)
        if rows is not None:
            index = self._row_index(rows, q.device, as_tensor=True)
            q, k, v = (t[rows.as_slice()] if not rows.at else t.index_select(0, index) for t in (q, k, v))
        with torch.no_grad():
            delta = injection_delta(q, k, v, heads, columns, masks, self.relations.layout.injection).to(out.dtype)
        return out + delta if rows is None else out.index_add(0, index, delta)

    def _box_index(self, hw: tuple[int, int], device) -> tuple[Tensor, Tensor]:
        """The boxes' token columns and each column's box coverage of the map cells (J, h*w)."""
        key = (hw, device)
        if key not in self._boxes:
            with torch.inference_mode(False):
                probe = torch.empty(0, device=device)
                columns, masks = [], []
                boxes = box_masks([b.box for b in self.relations.boxes], *hw, probe)
                for bound, mask in zip(self.relations.boxes, boxes):
                    for token in bound.tokens:
                        columns.append(token)
                        masks.append(mask.flatten())
                self._boxes[key] = (torch.tensor(columns, dtype=torch.long).to(device), torch.stack(masks))
        return self._boxes[key]

    def take(self) -> list[tuple[str, Tensor]]:
        """(level, maps (L, B, K, h, w)) per group of captured layers of this step (one group
        per level and map size, layers in capture order); clears the store. A layer
        recorded by several calls in one step (the cond rows split over several forward
        passes) gets the mean of its maps. A detached copy of a non-empty result stays in
        `last` for the run's trace."""
        for key in list(self._pending):
            self._flush(key)
        done, self._done = self._done, []
        if not done:
            return []
        counts: dict[Layer, int] = {}
        for layers, _ in done:
            for layer in layers:
                counts[layer] = counts.get(layer, 0) + 1
        out = _grouped(done) if all(c == 1 for c in counts.values()) else _averaged(done)
        self.last = [(level, maps.detach() if maps.requires_grad else maps) for level, maps in out]
        return out

    def discard(self) -> None:
        """Drop whatever this step recorded (the step failed or needs no maps)."""
        self._pending.clear()
        self._done = []


def _capacity(q: Tensor, k: Tensor, heads: int, rows: Rows | None) -> int:
    """How many layers of these shapes one chunk computes together within CHUNK_BYTES."""
    b = q.shape[0] if rows is None else rows.count
    n, c, t = q.shape[1], q.shape[2], k.shape[1]
    wide = torch.finfo(compute_dtype(q.dtype)).bits // 8
    per_layer = b * (n * c * (q.element_size() + wide) + 3 * heads * n * t * wide)
    return max(1, CHUNK_BYTES // max(per_layer, 1))


def _grouped(done) -> list[tuple[str, Tensor]]:
    """Chunks (each layer once) joined per (level, map size), in order of first appearance."""
    groups: dict[tuple, list[Tensor]] = {}
    for layers, maps in done:
        groups.setdefault((layers[0].level, tuple(maps.shape[-2:])), []).append(maps)
    return [(key[0], chunks[0] if len(chunks) == 1 else torch.cat(chunks)) for key, chunks in groups.items()]


def _averaged(done) -> list[tuple[str, Tensor]]:
    """Per layer, the mean of its maps over the calls that recorded it; then grouped."""
    per_layer: dict[Layer, list[Tensor]] = {}
    for layers, maps in done:
        for layer, m in zip(layers, maps.unbind(0)):
            per_layer.setdefault(layer, []).append(m)
    groups: dict[tuple, list[Tensor]] = {}
    for layer, ms in per_layer.items():
        m = ms[0] if len(ms) == 1 else torch.stack(ms).mean(dim=0)
        groups.setdefault((layer.level, tuple(m.shape[-2:])), []).append(m)
    return [(key[0], torch.stack(ms)) for key, ms in groups.items()]
