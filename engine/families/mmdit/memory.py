"""What one guided step of an MMDiT model (Flux.1, Chroma, SD3 / SD3.5) costs in memory,
counted exactly on a weightless twin, as engine/memory_estimate.py counts the UNet's.

The twin is the model ComfyUI itself builds for the checkpoint (its supported-model config
and diffusion-model class, `get_model`) on the meta device. The full-size configs come from
ComfyUI's own detection, run on the key names and shapes of the real checkpoint files
(`full_size_config`): what ComfyUI derives when it loads them.

The guided step is counted as the pack runs it on the UNet, with the MMDiT pieces:
- the cond rows' forward with autograd, under `differentiable()` (out-of-place residual
  adds, RoPE with a backward), the capture (engine/families/mmdit/capture.py) chained above the
  pack's memory-efficient attention, the graph stopped after the last captured block
  (engine/families/mmdit/recompute.py); in `fast` the capture keeps q and k of every captured call
  (autograd keeps them for the attention's backward anyway) and the maps are computed after
  the forward; in `low` every joint block up to the last captured one is an activation
  checkpoint (only its inputs kept) and its maps are computed inside it;
- the loss on the maps (mean over the captured blocks), then, with real CFG (SD3, Chroma),
  the uncond rows' forward without autograd while the graph is held (the split design of
  engine/hooks.py), then the backward pass to the latent. Flux.1-dev runs at cfg 1: its
  batch holds the cond rows only, there is no uncond forward.
A plain step is one forward of the plain step's rows (cond and uncond, or cond alone at
cfg 1) without autograd.

Attention is counted as CUDA's memory-efficient / flash kernels keep it (what the guided
step uses there: memory_modes.efficient_attention_on_cuda): q, k, v, the output and a
float32 logsumexp per query and head, never the (L, L) weights; computed by PyTorch's flash
kernel for the CPU, which also runs on meta. Weights are never counted.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import comfy.model_detection

from ....guidance.attention_maps import MapIndex
from ....guidance.losses import LossSettings, Pair, step_loss
from ....guidance.memory_count import MemoryCounter
from ....guidance.recompute import recomputing
from ...memory_estimate import StepMemory
from .autograd import differentiable
from .capture import OVERRIDE, blocks_of, install_capture, is_sd3
from .recompute import ImmediateCapture, recompute_units, stop_graph_after
from ..interface import copied_options

PATCH = 2  # Flux and SD3: 2 x 2 latent patches per image token
PROBE_PAIRS = (Pair(0, 1, "left"),)  # "a cat to the left of a dog": the count barely depends on it


# -- the full-size models, as ComfyUI's detection reads their checkpoint files ----------------

def _meta(*shape: int) -> Tensor:
    return torch.empty(shape, device="meta")


def _flux_layout(double: int = 19, single: int = 38, width: int = 3072, guidance: bool = True) -> dict:
    """The keys of a Flux.1 checkpoint that ComfyUI's detection reads (dev: guidance_in)."""
    sd = {"double_blocks.0.img_attn.norm.key_norm.scale": _meta(128), "img_in.weight": _meta(width, 64),
          "txt_in.weight": _meta(width, 4096), "vector_in.in_layer.weight": _meta(width, 768)}
    if guidance:
        sd["guidance_in.in_layer.weight"] = _meta(width, 256)
    for i in range(double):
        sd[f"double_blocks.{i}.img_attn.qkv.weight"] = _meta(3 * width, width)
    for i in range(single):
        sd[f"single_blocks.{i}.linear1.weight"] = _meta(7 * width, width)
    return sd


def _sd35_layout(depth: int, pos_embed_side: int, self_attn_blocks: int) -> dict:
    """The keys of an SD3.5 checkpoint that ComfyUI's detection reads: width 64 * depth,
    depth joint blocks, RMS q/k norms, a learned pos_embed table, MMDiT-X's image-only
    attention in the first `self_attn_blocks` blocks (SD3.5-M: 13)."""
    width = 64 * depth
    sd = {"x_embedder.proj.weight": _meta(width, 16, 2, 2), "final_layer.linear.weight": _meta(64, width),
          "y_embedder.mlp.0.weight": _meta(width, 2048), "context_embedder.weight": _meta(width, 4096),
          "pos_embed": _meta(1, pos_embed_side ** 2, width),
          "joint_blocks.0.context_block.attn.ln_q.weight": _meta(64)}
    for i in range(depth):
        sd[f"joint_blocks.{i}.context_block.attn.qkv.weight"] = _meta(3 * width, width)
    for i in range(self_attn_blocks):
        sd[f"joint_blocks.{i}.x_block.attn2.qkv.weight"] = _meta(3 * width, width)
    return sd


@dataclass(frozen=True)
class FullSize:
    layout: object  # () -> the checkpoint's detection keys
    text_tokens: int  # rows of the text context for a short prompt, as ComfyUI's text encoder pads it
    real_cfg: bool  # a plain step runs cond and uncond rows (False: Flux.1-dev at cfg 1)
    note: str


FULL_SIZE = {
    "Flux.1-dev": FullSize(_flux_layout, 256, False, "12B, 19 double + 38 single blocks, T5 context padded to 256"),
    "SD3.5-M": FullSize(lambda: _sd35_layout(24, 384, 13), 154, True,
                        "2.5B, 24 joint blocks (image-only attention in 0-12), CLIP 77 + T5 77 rows"),
    "SD3.5-L": FullSize(lambda: _sd35_layout(38, 192, 0), 154, True, "8.1B, 38 joint blocks, CLIP 77 + T5 77 rows"),
}


def full_size_config(name: str):
    """ComfyUI's supported-model config of the real checkpoint `name` (its own detection)."""
    cfg = comfy.model_detection.model_config_from_unet(FULL_SIZE[name].layout(), "")
    if cfg is None:
        raise RuntimeError(f"ComfyUI's detection does not recognise the {name} layout")
    return cfg


# -- the twin -----------------------------------------------------------------------------------

@dataclass
class Twin:
    """A diffusion model built by ComfyUI from a supported-model config, without weights."""

    model: nn.Module  # the diffusion model (comfy.ldm.flux.model.Flux, OpenAISignatureMMDITWrapper, ...)
    dtype: torch.dtype
    device: str = "meta"

    @property
    def sd3(self) -> bool:
        return is_sd3(self.model)

    def inputs(self, batch: int, latent_hw: tuple[int, int], tokens: int) -> dict:
        """Inputs of one forward (latent, timestep, text context, pooled vector, Flux-dev's
        guidance value), on the twin's device."""
        like = {"device": self.device, "dtype": self.dtype}
        x = torch.zeros(batch, 16, *latent_hw, **like)
        if self.sd3:
            return {"x": x, "timesteps": torch.zeros(batch, device=self.device),
                    "context": torch.zeros(batch, tokens, self.model.context_embedder.in_features, **like),
                    "y": torch.zeros(batch, self.model.y_embedder.mlp[0].in_features, **like)}
        params = self.model.params
        out = {"x": x, "timestep": torch.zeros(batch, device=self.device),
               "context": torch.zeros(batch, tokens, params.context_in_dim, **like)}
        if getattr(params, "vec_in_dim", None):
            out["y"] = torch.zeros(batch, params.vec_in_dim, **like)
        if getattr(params, "guidance_embed", False):
            out["guidance"] = torch.full((batch,), 3.5, device=self.device)
        elif hasattr(self.model, "distilled_guidance_layer"):  # Chroma: its approximator reads a (zero) guidance
            out["guidance"] = torch.zeros(batch, device=self.device)
        return out


def meta_twin(config, dtype: torch.dtype, device: str = "meta") -> Twin:
    """The diffusion model ComfyUI builds for `config` (a supported-model config), on the
    meta device (or on `device` with uninitialised weights, for a check against real tensors)."""
    config.set_inference_dtype(dtype, None)
    with torch.inference_mode(False):  # (ComfyUI runs prompts in inference mode; the twin is counted with autograd)
        model = config.get_model({}, device=device).diffusion_model
        for p in model.parameters():
            p.requires_grad_(False)
    return Twin(model, dtype, device)


# -- attention as a memory-efficient kernel keeps it ----------------------------------------

class _EfficientAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v on (B, H, L, D) by PyTorch's flash kernel for the CPU (also on
    meta): keeps q, k, v, the output and a float32 logsumexp, as CUDA's kernels do."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, k, v, out, lse, 0.0, False)


def efficient_attention(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                        skip_output_reshape=False, **kwargs):
    """optimized_attention_override with a memory-efficient kernel's footprint, for the
    (B, H, L, D) calls of Flux and the (B, L, H * D) calls of SD3."""
    if mask is not None:
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)
    if not skip_reshape:
        b, length, width = q.shape
        q, k, v = (t.view(b, t.shape[1], heads, width // heads).transpose(1, 2) for t in (q, k, v))
    out = _EfficientAttention.apply(q, k, v)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class _KeptCounter(MemoryCounter):
    """MemoryCounter that also counts the inputs a checkpointed block keeps (by reference, not
    through autograd's saved tensors: a checkpoint's recomputation needs them)."""

    def keep(self, t: Tensor) -> None:
        self._pack(t)


@contextlib.contextmanager
def _kept_inputs(counter: _KeptCounter, units):
    def pre_hook(module, args, kwargs):
        if torch.is_grad_enabled():
            for t in (*args, *kwargs.values()):
                if isinstance(t, Tensor) and t.requires_grad:
                    counter.keep(t)
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in units]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- the count ----------------------------------------------------------------------------------

def probe_index(twin: Twin, tokens: int) -> MapIndex:
    """Two one-token objects ("cat", "dog"); on SD3 each has a CLIP row and a T5 row."""
    if twin.sd3:
        return MapIndex.of([[2, 77 + 2], [8, 77 + 8]], twin.device)
    return MapIndex.of([[2], [8]], twin.device)


def count_step(twin: Twin, mode: str, blocks=None, batch: int = 1, latent_hw: tuple[int, int] = (128, 128),
               tokens: int = 256, real_cfg: bool = True, gradient: list | None = None) -> StepMemory:
    """Count one guided step of `twin` (batch images, latent h x w, `tokens` text rows) and
    the plain step it replaces. `blocks`: the captured blocks (("double", i) / ("single", i);
    None: all joint blocks). `real_cfg`: the step has uncond rows (SD3, Chroma), else cfg 1.
    `gradient`: a list that receives the step's gradient w.r.t. the latent (for checks on
    real tensors: fast and low give the same)."""
    if mode not in ("fast", "low"):
        raise ValueError(f"mode {mode!r}: fast or low")
    dm = twin.model
    captured = blocks_of(dm, blocks)
    hw = (latent_hw[0] // PATCH, latent_hw[1] // PATCH)
    capture = ImmediateCapture(captured, hw, probe_index(twin, tokens), immediate=mode == "low")
    units = recompute_units(dm, captured) if mode == "low" else []

    def replaying(on: bool) -> None:
        capture.replaying = on

    def forward(rows: int, options: dict):
        inputs = twin.inputs(rows, latent_hw, tokens)
        x = inputs.pop("x")
        return dm(x, **inputs, transformer_options=options)

    with torch.inference_mode(False), torch.enable_grad(), _KeptCounter() as counter:
        with torch.no_grad():
            out = forward(2 * batch if real_cfg else batch, {OVERRIDE: efficient_attention})
        del out
        plain = counter.peak
        counter.mark()
        inputs = twin.inputs(batch, latent_hw, tokens)
        x = inputs.pop("x").requires_grad_(True)
        options = {OVERRIDE: efficient_attention}  # the capture chains above it
        with differentiable(*units), recomputing(units, snapshot=copied_options, replaying=replaying), \
                _kept_inputs(counter, units):
            with install_capture(options, capture, dm), stop_graph_after(options, dm, captured):
                out = dm(x, **inputs, transformer_options=options)
            maps = capture.take()
            loss = step_loss([("coarse", torch.stack(list(maps.values())))], PROBE_PAIRS, LossSettings())
            del maps
            kept = counter.saved()
            overall = counter.peak
            if real_cfg:
                counter.mark()
                with torch.no_grad():
                    uncond = forward(batch, {OVERRIDE: efficient_attention})
                del uncond
                counter.peak = max(counter.peak, overall)
            (grad,) = torch.autograd.grad(loss, x)
        if gradient is not None:
            gradient.append(grad)
        del out, grad, loss
    return StepMemory(plain, kept, counter.peak)
