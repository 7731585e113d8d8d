"""Model files a workflow loads next to a checkpoint, generated for the narrow test models:
a LoRA (for LoraLoader) and an SD1.x ControlNet (for ControlNetLoader).

Both are built from ComfyUI's own classes and written with its own saving function, in
the formats its loaders read: the LoRA as ComfyUI's LoRA trainer writes one
(comfy.weight_adapter's LoRAAdapter.create_train per attention weight, keys
"<module>.lora_up.weight" / "<module>.lora_down.weight"), the ControlNet as a
comfy.cldm.cldm.ControlNet state dict under "control_model." (the original .pth layout,
recognised by comfy.controlnet.load_controlnet through checkpoint detection). Weights are
drawn from a seed and "alive" (a trained LoRA's down projection and a trained
ControlNet's zero convolutions are not zero), so each file changes the image.
"""
from __future__ import annotations

import torch

import comfy.cldm.cldm
import comfy.ops
import comfy.utils
import comfy.weight_adapter.lora as weight_lora

from . import models


def lora_state_dict(topology: str, rank: int = 4, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A LoRA of rank `rank` on every attention projection (to_q/k/v/out) of the UNet."""
    topo = models.TOPOLOGIES[topology]
    cfg = topo.config(topo.unet)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if ".attn" not in name or not name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2:
            continue
        adapter = weight_lora.LoRAAdapter.create_train(torch.zeros(weight.shape), rank=rank, alpha=1.0)
        with torch.no_grad():
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g) / rank ** 0.5)
            down = torch.randn(adapter.lora_down.weight.shape, generator=g) / weight.shape[1] ** 0.5
            adapter.lora_down.weight.copy_(scale * down)
        for pname, p in adapter.named_parameters():
            out[f"{name}.{pname}"] = p.detach().clone()
    if not out:
        raise RuntimeError(f"no attention weights found in the {topology} test UNet")
    return out


def save_lora(path: str, topology: str, rank: int = 4, seed: int = 0, scale: float = 1.0) -> str:
    comfy.utils.save_torch_file(lora_state_dict(topology, rank, seed, scale), path)
    return path


def controlnet_state_dict(topology: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """A ControlNet for the narrow test UNet of `topology` (hint: 3-channel image)."""
    topo = models.TOPOLOGIES[topology]
    config = {k: v for k, v in topo.unet.items() if k not in ("out_channels", "transformer_depth_output")}
    config.update(_unet_extra(topo))
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                     dtype=torch.float32, device="cpu", **config)
    sd = models._filled(net, seed + 10)
    return {f"control_model.{k}": v for k, v in sd.items()}


def _unet_extra(topo) -> dict:
    """The supported-model config's extra UNet arguments (heads, attention precision)."""
    extra = dict(getattr(topo.config, "unet_extra_config", {}) or {})
    extra.setdefault("num_heads", 8)
    return extra


def save_controlnet(path: str, topology: str = "sd1", seed: int = 0) -> str:
    comfy.utils.save_torch_file(controlnet_state_dict(topology, seed), path)
    return path

