"""Deterministic small models with the real topologies of SD1.x, SD2.x-v and SDXL.

Everything is built from ComfyUI's own classes: the UNet (comfy.ldm...UNetModel through
the supported-model configs), CLIP text encoders (comfy.sd1_clip / sd2_clip / sdxl_clip
at a narrow width, with ComfyUI's real tokenizers) and a TAESD VAE. Weights are drawn
from a seed, turned into a checkpoint state dict by ComfyUI's own saving code, and loaded
back by ComfyUI's real loading function (`comfy.sd.load_state_dict_guess_config`), so a
test model goes through the same detection and loading path as a user's checkpoint file.

The widths are narrow; the block structure is not: SD1/SD2 keep output blocks 3..11 with
one transformer each, SDXL keeps two text encoders, adm conditioning and transformer
depth 10 on output blocks 0..2.
"""
from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.utils
from comfy.text_encoders import sd2_clip

# Narrow CLIP text transformers: same classes and tokenizers, fewer layers. CLIP-L and
# CLIP-G are narrow too; CLIP-H keeps SD2's 1024-d context (its hidden width).
CLIP_WIDTH = 64
SD2_CONTEXT = 1024
UNET_WIDTH = 32  # model_channels; GroupNorm(32) needs a multiple of 32


def narrow_clip(width: int) -> dict:
    return {
        "hidden_size": width,
        "intermediate_size": max(2 * CLIP_WIDTH, width),
        "num_attention_heads": max(2, width // 64),
        "num_hidden_layers": 3,  # SD2/SDXL read layer -2; ComfyUI asserts more than 2
        "projection_dim": width,
    }


def _narrow(model_options: dict, **widths: int) -> dict:
    """model_options that make ComfyUI's SDClipModel build the named encoders narrow."""
    return {**model_options, **{f"{n}_model_config": narrow_clip(w) for n, w in widths.items()}}


class NarrowSD1Clip(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=_narrow(model_options, clip_l=CLIP_WIDTH), **kwargs)


class NarrowSD2Clip(sd2_clip.SD2ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=_narrow(model_options, clip_h=SD2_CONTEXT), **kwargs)


class NarrowSDXLClip(comfy.sdxl_clip.SDXLClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options=_narrow(model_options, clip_l=CLIP_WIDTH, clip_g=CLIP_WIDTH))


# Supported-model configs for the narrow UNets. ComfyUI matches a state dict against
# `unet_config` of each entry of comfy.supported_models.models in order; these are put
# first by register_detection(), the real SD15/SD20/SDXL classes stay untouched.
class TestSD1(comfy.supported_models.SD15):
    unet_config = {"context_dim": CLIP_WIDTH, "model_channels": UNET_WIDTH,
                   "use_linear_in_transformer": False, "adm_in_channels": None,
                   "use_temporal_attention": False}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, NarrowSD1Clip)


class TestSD2(comfy.supported_models.SD20):
    unet_config = {"context_dim": SD2_CONTEXT, "model_channels": UNET_WIDTH,
                   "use_linear_in_transformer": True, "adm_in_channels": None,
                   "use_temporal_attention": False}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 8, "attn_precision": torch.float32}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer, NarrowSD2Clip)


class TestSDXL(comfy.supported_models.SDXL):
    unet_config = {"model_channels": UNET_WIDTH, "use_linear_in_transformer": True,
                   "transformer_depth": [0, 0, 2, 2, 10, 10], "context_dim": 2 * CLIP_WIDTH,
                   "adm_in_channels": CLIP_WIDTH + 6 * 256, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, NarrowSDXLClip)


TEST_CONFIGS = (TestSD1, TestSD2, TestSDXL)


def register_detection() -> None:
    """Let ComfyUI's checkpoint detection recognise the narrow test UNets (idempotent)."""
    models = comfy.supported_models.models
    for cfg in reversed(TEST_CONFIGS):
        if not any(m.__name__ == cfg.__name__ and m.__module__ == cfg.__module__ for m in models):
            models.insert(0, cfg)


_SD_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "in_channels": 4,
              "use_spatial_transformer": True, "legacy": False,
              "use_temporal_attention": False, "use_temporal_resblock": False}


@dataclass(frozen=True)
class Topology:
    name: str
    config: type
    unet: dict
    description: str
    v_prediction: bool = False


TOPOLOGIES = {
    "sd1": Topology("sd1", TestSD1, {
        **_SD_COMMON, "adm_in_channels": None, "model_channels": UNET_WIDTH,
        "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": False, "context_dim": CLIP_WIDTH},
        "SD1.x topology (eps, conv projections, CLIP-L tokenizer)"),
    "sd2v": Topology("sd2v", TestSD2, {
        **_SD_COMMON, "adm_in_channels": None, "model_channels": UNET_WIDTH,
        "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": True, "context_dim": SD2_CONTEXT},
        "SD2.x topology (v-prediction, linear projections, OpenCLIP-H tokenizer, fp32 attention)",
        v_prediction=True),
    "sdxl": Topology("sdxl", TestSDXL, {
        **_SD_COMMON, "num_classes": "sequential", "adm_in_channels": CLIP_WIDTH + 6 * 256,
        "model_channels": UNET_WIDTH, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_linear_in_transformer": True, "context_dim": 2 * CLIP_WIDTH},
        "SDXL topology (CLIP-L + CLIP-G, adm conditioning, depth 10 on output blocks 0..2)"),
}


def _fill(name: str, t: torch.Tensor, seed: int) -> None:
    """Deterministic, alive initialisation: fan-in scaled matrices, norm gains near 1."""
    if t.ndim == 0 or not t.is_floating_point():
        return
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    r = torch.randn(t.shape, generator=g, dtype=torch.float32)
    if t.ndim >= 2:
        r = r / float(t[0].numel()) ** 0.5
    elif name.endswith("weight"):  # GroupNorm / LayerNorm gains
        r = 1.0 + 0.1 * r
    else:  # biases
        r = 0.02 * r
    t.copy_(r.to(t.dtype))


def _filled(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    sd = module.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            _fill(k, v, seed)
    return sd


def checkpoint_state_dict(topology: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete checkpoint (UNet, text encoders, VAE) in ComfyUI's saving format."""
    topo = TOPOLOGIES[topology]
    cfg = topo.config(topo.unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    unet_sd = _filled(model.diffusion_model, seed)
    if topo.v_prediction:
        # ComfyUI tells an SD2 v-prediction checkpoint by the spread of this bias
        # (supported_models.SD20.model_type); give it the spread real 768-v weights have.
        unet_sd["output_blocks.11.1.transformer_blocks.0.norm1.bias"].mul_(10.0)
    model.diffusion_model.load_state_dict(unet_sd)

    target = cfg.clip_target()
    clip_module = target.clip(device="cpu", dtype=torch.float32, model_options={})
    clip_sd = _filled(clip_module, seed + 1)

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    vae_sd = _filled(taesd, seed + 2)
    return _for_saving(model, clip_sd, vae_sd)


def _for_saving(model, clip_sd: dict, vae_sd: dict) -> dict:
    """BaseModel.state_dict_for_saving by keyword. Newer ComfyUI (0.33) takes the UNet's state
    dict as a leading parameter (`unet_state_dict`); older ones read it off the model."""
    kwargs = {"clip_state_dict": clip_sd, "vae_state_dict": vae_sd}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        kwargs["unet_state_dict"] = model.diffusion_model.state_dict()
    return model.state_dict_for_saving(**kwargs)


def load(topology: str, seed: int = 0, dtype: torch.dtype | None = None,
         embedding_directory: str | None = None):
    """(MODEL, CLIP, VAE) through ComfyUI's real checkpoint loading function."""
    register_detection()
    sd = checkpoint_state_dict(topology, seed)
    options = {} if dtype is None else {"dtype": dtype}
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
        sd, model_options=options, embedding_directory=embedding_directory)
    return model, clip, vae


def save_checkpoint(path: str, topology: str, seed: int = 0) -> str:
    """Write the test checkpoint as a .safetensors file for ComfyUI's loader nodes."""
    comfy.utils.save_torch_file(checkpoint_state_dict(topology, seed), path)
    return path
