"""Test kit as a ComfyUI custom node: test models and probes for the development host.

Loading it also lets ComfyUI's checkpoint detection recognise the narrow test UNets and
MMDiT models (SD3, Flux, Chroma), so the real CheckpointLoaderSimple and UNETLoader load
test model files, in-process and in a server.
"""
from __future__ import annotations

import math

import torch

import comfy.model_management

from . import mmdit_models, models
from .pack import module as pack_module

models.register_detection()
mmdit_models.register_detection()


WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TestModel:
    """MODEL, CLIP, VAE of a deterministic test topology (no file needed)."""

    CATEGORY = "InfSplign testkit"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "topology": (list(models.TOPOLOGIES) + list(mmdit_models.TOPOLOGIES), {"default": "sd1"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }, "optional": {
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default"}),
        }}

    def load(self, topology, seed, weight_dtype="default"):
        factory = mmdit_models if topology in mmdit_models.TOPOLOGIES else models
        return factory.load(topology, seed, dtype=WEIGHT_DTYPES[weight_dtype])


class ForeignCLIP:
    """A CLIP of a family InfSplign does not read (Qwen-Image's Qwen2.5-VL, AuraFlow's Pile-T5):
    ComfyUI's real tokenizer, the encoder on the meta device (no weights)."""

    CATEGORY = "InfSplign testkit"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["qwen_image", "aura_flow"], {"default": "qwen_image"})}}

    def load(self, kind):
        return (mmdit_models.foreign_clip(kind),)


class GradientProbe:
    """d mean(denoised^2) / d latent for one UNet call, inside the executor.

    `helper` = false runs the naive way (leave inference mode, nothing else), to show the
    pitfall the pack's guidance.autograd helper exists for.
    """

    CATEGORY = "InfSplign testkit"
    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("grad_norm",)
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "positive": ("CONDITIONING",), "latent": ("LATENT",),
            "sigma": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0}),
            "helper": ("BOOLEAN", {"default": True}),
        }}

    def probe(self, model, positive, latent, sigma, helper):
        autograd = pack_module("guidance.autograd")
        comfy.model_management.load_models_gpu([model])
        unet = model.model
        device = comfy.model_management.get_torch_device()
        samples = latent["samples"]
        noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(0))
        context = positive[0][0]
        with autograd.grad_enabled():
            if helper:
                autograd.make_autograd_safe(unet)
            x = autograd.grad_leaf((samples + sigma * noise).to(device))
            s = torch.full((x.shape[0],), sigma, device=device)
            denoised = unet.apply_model(x, s, c_crossattn=context.to(device))
            (grad,) = torch.autograd.grad(denoised.float().pow(2).mean(), x)
        norm = float(grad.norm())
        if not math.isfinite(norm):
            raise ValueError(f"gradient is not finite: {norm}")
        return {"ui": {"grad_norm": [norm], "inference_tensor": [bool(samples.is_inference())]},
                "result": (norm,)}


class AttentionPatch:
    """Another pack's attn2 replace patch (the way IPAdapter installs itself) on output
    blocks, counting its calls in `calls` so tests can see it ran."""

    CATEGORY = "InfSplign testkit"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    calls: dict[str, int] = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "blocks": ("STRING", {"default": "3,4,5,6,7,8"}),
                             "tag": ("STRING", {"default": "other"}),
                             "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0})}}

    def patch(self, model, blocks, tag, scale):
        import comfy.ldm.modules.attention as attention
        calls = AttentionPatch.calls

        def attn2(q, k, v, extra):
            calls[tag] = calls.get(tag, 0) + 1
            return attention.optimized_attention(q, k, v * scale, extra["n_heads"],
                                                 attn_precision=extra.get("attn_precision"))
        m = model.clone()
        for b in blocks.split(","):
            m.set_model_attn2_replace(attn2, "output", int(b))
        return (m,)


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class Fault:
    """A misbehaving partner for robustness tests: an attn2 replace patch on output blocks
    that computes the usual attention, plus one fault.

    - "nan_gradient": its backward pass gives NaN (the forward is untouched), so a guided
      step's gradient is not finite.
    - "interrupt": on its first call inside a guided step (autograd on), it requests
      ComfyUI's interrupt, as a user pressing Cancel at that moment: the next ComfyUI
      operation raises InterruptProcessingException in the middle of the guided forward.
    - "oom_once": the first time it runs with autograd on (a guided step's forward), it
      raises torch.OutOfMemoryError, as a device that ran out of memory in that forward;
      later calls are normal.
    - "oom_grad": it raises torch.OutOfMemoryError whenever autograd is on (every guided
      forward, whatever the memory mode); without autograd it is normal.
    - "inference_weight": it scales its output by a weight made under inference mode (as
      weights ComfyUI loads or streams are), which autograd refuses to save unless the
      guided step hands the operation a normal copy.
    `calls[tag]` counts its calls.
    """

    CATEGORY = "InfSplign testkit"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    calls: dict[str, int] = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "fault": (["nan_gradient", "interrupt", "oom_once", "oom_grad", "inference_weight"],),
                             "blocks": ("STRING", {"default": "3"}),
                             "tag": ("STRING", {"default": "fault"})}}

    def patch(self, model, fault, blocks, tag):
        import comfy.ldm.modules.attention as attention
        calls = Fault.calls
        fired = []
        weight = torch.ones(())  # made in the executor's inference mode: an inference tensor

        def attn2(q, k, v, extra):
            calls[tag] = calls.get(tag, 0) + 1
            out = attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))
            if fault == "nan_gradient":
                return _NanGradient.apply(out)
            if fault in ("oom_once", "oom_grad") and torch.is_grad_enabled() and not (fault == "oom_once" and fired):
                fired.append(True)
                raise torch.OutOfMemoryError(f"simulated: out of memory in a guided forward ({tag})")
            if fault == "inference_weight":
                return out * weight
            if fault != "interrupt":
                return out
            if torch.is_grad_enabled() and not fired:
                fired.append(True)
                comfy.model_management.interrupt_current_processing(True)
            return out
        m = model.clone()
        for b in blocks.split(","):
            m.set_model_attn2_replace(attn2, "output", int(b))
        return (m,)


class SkipMerge:
    """Another pack's output_block_patch that joins the skip connection itself and hands the
    UNet `hsp = None` (allowed since ComfyUI 0.33, which then skips its own concatenation):
    h becomes cat(h, scale * hsp) on the listed output blocks. `calls[tag]` counts calls."""

    CATEGORY = "InfSplign testkit"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    calls: dict[str, int] = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "blocks": ("STRING", {"default": "3,4,5,6,7,8"}),
                             "scale": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 2.0}),
                             "tag": ("STRING", {"default": "merge"})}}

    def patch(self, model, blocks, scale, tag):
        wanted = {int(b) for b in blocks.split(",")}
        calls = SkipMerge.calls

        def output_block_patch(h, hsp, transformer_options):
            if hsp is None or transformer_options["block"][1] not in wanted:
                return h, hsp
            calls[tag] = calls.get(tag, 0) + 1
            return torch.cat([h, hsp * scale], dim=1), None
        m = model.clone()
        m.set_model_output_block_patch(output_block_patch)
        return (m,)


NODE_CLASS_MAPPINGS = {
    "InfSplignTestModel": TestModel,
    "InfSplignTestForeignCLIP": ForeignCLIP,
    "InfSplignTestGradientProbe": GradientProbe,
    "InfSplignTestAttentionPatch": AttentionPatch,
    "InfSplignTestFault": Fault,
    "InfSplignTestSkipMerge": SkipMerge,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "InfSplignTestModel": "Test model (InfSplign testkit)",
    "InfSplignTestForeignCLIP": "CLIP of another family (InfSplign testkit)",
    "InfSplignTestGradientProbe": "Gradient probe (InfSplign testkit)",
    "InfSplignTestAttentionPatch": "Attention patch of another pack (InfSplign testkit)",
    "InfSplignTestFault": "Misbehaving attention patch (InfSplign testkit)",
    "InfSplignTestSkipMerge": "Output-block patch that merges the skip (InfSplign testkit)",
}
