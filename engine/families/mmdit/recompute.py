"""The MMDiT guided step's graph: where it stops, what `low` recomputes, maps made in place.

- recompute_units: the joint blocks `low` runs as activation checkpoints (Flux / Chroma:
  each double block, then each single block; SD3: each joint block), up to the last
  captured block. A block is one unit: its inputs are kept, its inside (the modulation,
  q / k / v, attention, the MLP) is computed again when the backward pass reaches it.
- stop_graph_after: ("double_block", i) / ("single_block", i) patches that run every block
  after the last captured one without autograd, as the UNet path runs the decoder blocks
  after its last captured layer: the loss does not depend on them.
- ImmediateCapture: a JointCapture that, in `low`, turns each captured call into its object
  maps at once, inside the recomputed block (in chunks of LOW_CHUNK_BYTES), and keeps only
  the maps (kilobytes) instead of q and k (Flux at 1024 px: 53 MB per block); during the
  block's recomputation it gives autograd back what the maps saved, as the UNet's capture
  does (attention_maps.replay_saved).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ....guidance.attention_maps import MapIndex, replay_saved
from ....guidance.joint_attention import chunk_rows, joint_maps
from .capture import Block, JointCapture, is_sd3

# Logits per chunk of the maps computed inside a recomputed block (`low`): a quarter of
# joint_attention.CHUNK_BYTES. The chunk's probabilities and logits are what the backward
# pass holds on top of the block inputs and one block's activations; at 256 MiB, Flux.1 at
# 1024 px needed 2.3 GiB over a plain step, at 64 MiB 2.0 (bench/memory.py --mmdit).
LOW_CHUNK_BYTES = 64 * 2**20

# ComfyUI's patches_replace["dit"] key of each block type
_PATCH_KEY = {"double": "double_block", "single": "single_block"}


def ordered_blocks(diffusion_model) -> list[tuple[Block, nn.Module]]:
    """Every joint block of the model with its identity, in the order the forward runs them."""
    if is_sd3(diffusion_model):
        return [(("double", i), b) for i, b in enumerate(diffusion_model.joint_blocks)]
    return ([(("double", i), b) for i, b in enumerate(diffusion_model.double_blocks)]
            + [(("single", i), b) for i, b in enumerate(diffusion_model.single_blocks)])


def last_block(diffusion_model, captured) -> int:
    """Position (in ordered_blocks) of the last captured block."""
    order = [block for block, _ in ordered_blocks(diffusion_model)]
    positions = [order.index(b) for b in captured if b in order]
    if not positions:
        raise ValueError(f"none of the blocks {sorted(captured)} is a joint block of this model")
    return max(positions)


def recompute_units(diffusion_model, captured) -> list[nn.Module]:
    """The blocks `low` recomputes: every joint block up to the last captured one."""
    blocks = ordered_blocks(diffusion_model)
    return [module for _, module in blocks[:last_block(diffusion_model, captured) + 1]]


def _detached_block(previous):
    """A dit replace patch running the block (or the patch that was there) without autograd."""
    def patch(args: dict, extra: dict) -> dict:
        if not torch.is_grad_enabled():
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        args = {k: v.detach() if isinstance(v, Tensor) else v for k, v in args.items()}
        with torch.no_grad():
            return previous(args, extra) if previous is not None else extra["original_block"](args)
    return patch


@contextlib.contextmanager
def stop_graph_after(transformer_options: dict, diffusion_model, captured) -> Iterator[None]:
    """While inside, the blocks after the last captured one run without autograd (another
    pack's patch on such a block runs inside it, unchanged). The shared dicts are copied,
    never changed; all is restored on the way out."""
    blocks = ordered_blocks(diffusion_model)
    later = blocks[last_block(diffusion_model, captured) + 1:]
    had, replace = "patches_replace" in transformer_options, transformer_options.get("patches_replace")
    dit = dict((replace or {}).get("dit", {}))
    for (kind, i), _ in later:
        key = (_PATCH_KEY[kind], i)
        dit[key] = _detached_block(dit.get(key))
    if later:
        transformer_options["patches_replace"] = {**(replace or {}), "dit": dit}
    try:
        yield
    finally:
        if later and had:
            transformer_options["patches_replace"] = replace
        elif later:
            transformer_options.pop("patches_replace", None)


class ImmediateCapture(JointCapture):
    """JointCapture whose calls become object maps at once when `immediate` (the `low` mode):
    `maps_by_block` holds them; nothing of q or k is kept by the capture."""

    def __init__(self, blocks, hw, index: MapIndex, text_tokens=None, immediate: bool = False):
        super().__init__(frozenset(blocks), tuple(hw), text_tokens)
        self.index, self.immediate = index, immediate
        self.maps_by_block: dict[Block, Tensor] = {}

    def record(self, block, q, k, heads, skip_reshape, scale, options=None) -> None:
        if not self.immediate:
            return super().record(block, q, k, heads, skip_reshape, scale)
        replay, self.replaying = self.replaying, False
        try:
            before = len(self.calls)
            super().record(block, q, k, heads, skip_reshape, scale)
        finally:
            self.replaying = replay
        if len(self.calls) == before:
            return
        call = self.calls.pop()
        if replay:  # the block's recomputation: save for backward what the maps saved
            replay_saved(call.q, call.k)
        else:
            rows = chunk_rows(call.q, call.k.shape[2], LOW_CHUNK_BYTES)
            self.maps_by_block[call.block] = joint_maps(call.q, call.k, call.image, self.index, self.hw,
                                                        scale=call.scale, rows=rows)

    def take(self) -> dict[Block, Tensor]:
        """The maps of this forward (computed now from the kept q, k unless immediate), by block."""
        out = dict(self.maps_by_block) if self.immediate else self.maps(self.index)
        self.maps_by_block.clear()
        self.clear()
        return out
