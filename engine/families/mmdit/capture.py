"""Capture of the joint attention calls of MMDiT models (Flux.1, Chroma, SD3 / SD3.5).

ComfyUI sends every attention call that carries `transformer_options` through `wrap_attn`
(comfy/ldm/modules/attention.py), which hands it to
`transformer_options["optimized_attention_override"](func, *args, **kwargs)` when set. The
capture is such an override: it passes the call on unchanged (to the override that was
there before it: another pack's, or the pack's memory-efficient attention; else to `func`)
and, for the captured blocks, keeps q and k (post-RoPE) and where the text and image
tokens sit, so guidance/joint_attention.py can compute the object maps. Nothing is
computed in the call itself: the output is bitwise the one without the capture.

What a call looks like (ComfyUI 0.3.75 and 0.33; MMDIT.md "Where joint attention happens"):
- Flux / Chroma double blocks: q, k, v = cat(txt, img) along the sequence, (B, H, L, D),
  RoPE applied, `skip_reshape=True`, heads positional; single blocks the same on the
  joined stream. transformer_options carries `block_type` ("double" / "single") and
  `block_index`. Sequence: [text T | image N | reference tokens of Kontext-style inputs].
- SD3 / SD3.5 joint blocks: q, k, v = cat(context, x), (B, L, H * D), `heads=` keyword, no
  RoPE. ComfyUI gives no block index: `install_capture` puts a ("double_block", i) patch on
  each captured block that calls it with a copy of transformer_options holding
  block_type "double" and block_index i (called as the unpatched model calls it, without
  the activation checkpoint ComfyUI's own block_wrap adds; another pack's patch there is
  called with the same copy and keeps its behaviour). SD3.5-M's image-only second
  attention in some blocks has no text keys and is not captured.

Newer ComfyUI (the container API, present in 0.33 and later) may hand q, k, v as
`AttentionTensorContainer`s, single-owner wrappers that a backend consumes with `take()`.
`wrap_attn` calls `override.container_function(*containers, ...)` (no `func`) when the
override has that attribute, and otherwise takes the tensors out and calls the override with
plain tensors. The capture declares `container_function` exactly when the override it
chains to does: it then reads q and k with `peek()` (consuming nothing) and hands the
containers on; otherwise it gets plain tensors like any override.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ....guidance.attention_maps import MapIndex
from ....guidance.joint_attention import joint_maps

OVERRIDE = "optimized_attention_override"

Block = tuple[str, int]  # ("double", i) / ("single", i): block_type and block_index as ComfyUI names them


@dataclass
class JointCall:
    """One captured joint attention call: q, k as (B, H, L, D) (views of the call's own
    tensors), the (start, stop) of the text and image tokens in the sequence, the scale."""

    block: Block
    q: Tensor
    k: Tensor
    text: tuple[int, int]
    image: tuple[int, int]
    scale: float
    versions: tuple[int, int] = (0, 0)  # q, k versions when captured (a backend must not change them)


@dataclass
class JointCapture:
    """What the capture keeps during one forward.

    blocks: the blocks whose joint attention is captured; hw: the image token grid (the
    latent's h, w over the patch size); text_tokens: the number of text tokens at the start
    of the sequence, or None for "all tokens before the image" (T = L - h * w: SD3 and Flux
    without reference latents)."""

    blocks: frozenset[Block]
    hw: tuple[int, int]
    text_tokens: int | None = None
    calls: list[JointCall] = field(default_factory=list)
    replaying: bool = False  # a checkpoint's recomputation in backward: nothing is recorded again

    def spans(self, length: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """(text, image) spans in a sequence of `length` tokens, None if the call is not a
        joint one (no text keys, e.g. SD3.5-M's image-only attention)."""
        n = self.hw[0] * self.hw[1]
        t = length - n if self.text_tokens is None else self.text_tokens
        if t <= 0 or t + n > length:
            return None
        return (0, t), (t, t + n)

    def record(self, block: Block, q: Tensor, k: Tensor, heads: int, skip_reshape: bool, scale: float | None,
               options: dict | None = None) -> None:
        if self.replaying or block not in self.blocks:
            return
        if not skip_reshape:  # (B, L, H * D) -> (B, H, L, D), views
            b, length, width = q.shape
            q = q.view(b, length, heads, width // heads).transpose(1, 2)
            k = k.view(b, k.shape[1], heads, width // heads).transpose(1, 2)
        if q.shape[2] != k.shape[2]:  # not a self-attention over one joint sequence
            return
        spans = self.spans(k.shape[2])
        if spans is None:
            return
        self.calls.append(JointCall(block, q, k, *spans, q.shape[-1] ** -0.5 if scale is None else float(scale),
                                    (_version(q), _version(k))))

    def maps(self, index: MapIndex, rows: int | None = None) -> dict[Block, Tensor]:
        """Object maps (B, K, h, w) of each captured call, by block (the last call of a block
        if it ran twice)."""
        out = {}
        for call in self.calls:
            if (_version(call.q), _version(call.k)) != call.versions:
                raise RuntimeError(f"InfSplign: the attention backend changed q or k of block {call.block} in place "
                                   "after the capture read them; the maps would be wrong")
            out[call.block] = joint_maps(call.q, call.k, call.image, index, self.hw, scale=call.scale, rows=rows)
        return out

    def clear(self) -> None:
        self.calls.clear()


def _version(t: Tensor) -> int:
    """The in-place version of a tensor (inference tensors, ComfyUI's executor's, keep none)."""
    return -1 if t.is_inference() else t._version


def _heads(args: tuple, kwargs: dict) -> int:
    return int(kwargs["heads"] if "heads" in kwargs else args[3])


def _block(kwargs: dict) -> Block | None:
    opts = kwargs.get("transformer_options") or {}
    if "block_type" not in opts or "block_index" not in opts:
        return None
    return opts["block_type"], int(opts["block_index"])


class CaptureOverride:
    """optimized_attention_override that records the captured blocks' joint calls and passes
    every call on unchanged to `previous` (an override) or to ComfyUI's function."""

    def __init__(self, capture: JointCapture, previous=None):
        self.capture, self.previous = capture, previous
        if previous is not None and hasattr(previous, "container_function"):
            self.container_function = self._containers  # only then: see the module note

    def _record(self, q: Tensor, k: Tensor, args: tuple, kwargs: dict) -> None:
        block = _block(kwargs)
        if block is not None:
            self.capture.record(block, q, k, _heads(args, kwargs), bool(kwargs.get("skip_reshape", False)),
                                kwargs.get("scale"), kwargs.get("transformer_options"))

    def __call__(self, func, *args, **kwargs):
        self._record(args[0], args[1], args, kwargs)
        if self.previous is not None:
            out = self.previous(func, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        return self._adjusted(out, args[0], args[1], args[2], args, kwargs)

    def _containers(self, *args, **kwargs):
        q, k, v = args[0].peek(), args[1].peek(), args[2].peek()
        self._record(q, k, args, kwargs)
        return self._adjusted(self.previous.container_function(*args, **kwargs), q, k, v, args, kwargs)

    def _adjusted(self, out, q, k, v, args: tuple, kwargs: dict):
        """The call's output as the capture's `injected` changes it (the boxes' injection of a
        guided run), when it has one; else unchanged."""
        inject = getattr(self.capture, "injected", None)
        block = _block(kwargs)
        if inject is None or block is None:
            return out
        return inject(out, block, q, k, v, _heads(args, kwargs), bool(kwargs.get("skip_reshape", False)),
                      kwargs.get("scale"), kwargs.get("transformer_options"))


def flux_blocks(diffusion_model) -> tuple[Block, ...]:
    """Every joint attention block of a Flux / Chroma model, in order."""
    return (tuple(("double", i) for i in range(len(diffusion_model.double_blocks)))
            + tuple(("single", i) for i in range(len(diffusion_model.single_blocks))))


def sd3_blocks(diffusion_model) -> tuple[Block, ...]:
    """Every joint block of an SD3 / SD3.5 model (named after its patch key "double_block")."""
    return tuple(("double", i) for i in range(len(diffusion_model.joint_blocks)))


def _sd3_block_patch(diffusion_model, index: int, previous):
    """patches_replace["dit"][("double_block", index)] for SD3: the block sees a copy of
    transformer_options with its identity in it."""
    def patch(args: dict, extra: dict) -> dict:
        opts = {**(args.get("transformer_options") or {}), "block_type": "double", "block_index": index}
        args = {**args, "transformer_options": opts}
        if previous is not None:
            return previous(args, extra)
        txt, img = diffusion_model.joint_blocks[index](
            args["txt"], args["img"], c=args["vec"], use_checkpoint=diffusion_model.use_checkpoint,
            transformer_options=opts)
        return {"txt": txt, "img": img}
    return patch


def is_sd3(diffusion_model) -> bool:
    return hasattr(diffusion_model, "joint_blocks")


@contextlib.contextmanager
def install_capture(transformer_options: dict, capture: JointCapture, diffusion_model) -> Iterator[CaptureOverride]:
    """While inside, the capture is this run's attention override (chained with the one that
    was there) and, on SD3, the captured blocks carry their identity. The dicts ComfyUI
    shares between runs (patches_replace and its "dit") are copied, never changed; all is
    restored on the way out."""
    had_override, previous = OVERRIDE in transformer_options, transformer_options.get(OVERRIDE)
    had_replace, replace = "patches_replace" in transformer_options, transformer_options.get("patches_replace")
    override = CaptureOverride(capture, previous)
    transformer_options[OVERRIDE] = override
    if is_sd3(diffusion_model):
        dit = dict((replace or {}).get("dit", {}))
        for kind, i in capture.blocks:
            if kind == "double" and 0 <= i < len(diffusion_model.joint_blocks):
                dit[("double_block", i)] = _sd3_block_patch(diffusion_model, i, dit.get(("double_block", i)))
        transformer_options["patches_replace"] = {**(replace or {}), "dit": dit}
    try:
        yield override
    finally:
        if had_override:
            transformer_options[OVERRIDE] = previous
        else:
            transformer_options.pop(OVERRIDE, None)
        if had_replace:
            transformer_options["patches_replace"] = replace
        else:
            transformer_options.pop("patches_replace", None)


def blocks_of(diffusion_model, wanted: Iterable[Block] | None = None) -> frozenset[Block]:
    """The model's joint blocks (all, or those of `wanted` it has)."""
    every = sd3_blocks(diffusion_model) if is_sd3(diffusion_model) else flux_blocks(diffusion_model)
    return frozenset(every if wanted is None else (b for b in wanted if b in every))
