"""The demo model as ComfyUI objects: an SD1-style UNet, a one-layer CLIP, a fixed VAE.

Built from ComfyUI's own classes, so the standard nodes (CLIPTextEncode, KSampler,
VAEDecode, SaveImage) and InfSplign's SD1.x path take it unchanged:
- UNet: comfy's UNetModel with SD1.x's block structure (output blocks 3-11 with one
  transformer each), narrow (32 channels), v-prediction on SD's scaled-linear schedule.
- Text: ComfyUI's CLIP text model with its real CLIP tokenizer, one causal layer of width
  64; padding outputs are zeroed (`zero_out_masked`), so only the caption's own tokens carry
  meaning. The caption reaches the UNet through cross-attention only.
- VAE: ComfyUI's TAESD class with fixed, computed weights (no file): the encoder averages
  8 x 8 pixel cells into red, green, blue and "object" channels; the decoder upsamples
  them bilinearly and sharpens each colour channel at one half, giving crisp flat shapes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils

WEIGHTS = Path(__file__).resolve().parent / "infsplign_demo_shapes.safetensors"
CLIP_WIDTH = 64
SCALE = comfy.latent_formats.SD15().scale_factor  # raw latent * SCALE = the UNet's latent
SHARPNESS = 4.0  # decoder edge steepness per pixel of the bilinear coverage field

UNET = {
    "use_checkpoint": False, "image_size": 16, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "context_dim": CLIP_WIDTH, "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_spatial_transformer": True, "legacy": False,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
CLIP = {"hidden_size": CLIP_WIDTH, "intermediate_size": 4 * CLIP_WIDTH, "num_attention_heads": 2,
        "num_hidden_layers": 1, "projection_dim": CLIP_WIDTH}


class DemoClipL(comfy.sd1_clip.SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options=model_options,
                         return_projected_pooled=False, zero_out_masked=True)


class DemoClip(comfy.sd1_clip.SD1ClipModel):
    """ComfyUI's SD1 CLIP-L wrapper, one layer deep, padding outputs zeroed."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        options = {**model_options, "clip_l_model_config": CLIP}
        super().__init__(device=device, dtype=dtype, model_options=options, clip_model=DemoClipL, **kwargs)


class DemoSD1(comfy.supported_models.SD15):
    """An SD1.x config (so InfSplign and the SD1 nodes treat it as one), v-prediction."""

    unet_config = {k: UNET[k] for k in ("context_dim", "model_channels", "use_linear_in_transformer",
                                         "adm_in_channels", "use_temporal_attention")}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 32}
    supported_inference_dtypes = [torch.float32, torch.float16, torch.bfloat16]

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.V_PREDICTION

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, DemoClip)


def config(dtype: torch.dtype = torch.float32) -> DemoSD1:
    cfg = DemoSD1(UNET)
    cfg.set_inference_dtype(dtype, None)
    return cfg


def new_unet(dtype: torch.dtype = torch.float32) -> comfy.model_base.BaseModel:
    """A freshly initialised BaseModel (UNet + v-prediction sampling) for training."""
    return config(dtype).get_model({}, device="cpu")


def new_clip(embedding_directory: str | None = None) -> comfy.sd.CLIP:
    return comfy.sd.CLIP(config().clip_target(), embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32, "initial_device": torch.device("cpu")})


# ---- the fixed VAE -------------------------------------------------------------------------

def _center(conv_w: torch.Tensor, out: int, inp: int, value: float) -> None:
    conv_w[out, inp, 1, 1] = value


def vae_state_dict() -> dict[str, torch.Tensor]:
    """TAESD weights that encode by 8 x 8 cell averages and decode by bilinear upsampling
    plus a per-channel threshold. Computed, so they need no file and cannot drift."""
    from comfy.taesd.taesd import TAESD

    taesd = TAESD(latent_channels=4)
    sd = {k: torch.zeros_like(v) for k, v in taesd.state_dict().items()}
    sd["vae_scale"] = torch.tensor(SCALE)
    sd["vae_shift"] = torch.tensor(0.0)

    # Encoder (input RGB in [0, 1]). 0: conv(3, 64): channels 0-2 colour, 3 = r + g + b.
    w = sd["taesd_encoder.0.weight"]
    for c in range(3):
        _center(w, c, c, 1.0)
        _center(w, 3, c, 1.0)
    # 1: Block: channel 3 becomes min(r + g + b, 1) = x - relu(x - 1).
    sd["taesd_encoder.1.conv.0.weight"][3, 3, 1, 1] = 1.0
    sd["taesd_encoder.1.conv.0.bias"][3] = -1.0
    sd["taesd_encoder.1.conv.2.weight"][3, 3, 1, 1] = 1.0
    sd["taesd_encoder.1.conv.4.weight"][3, 3, 1, 1] = -1.0
    # Three stride-2 convolutions averaging 2 x 2 pixels each (taps at 2i and 2i + 1).
    for idx in (2, 6, 10):
        w = sd[f"taesd_encoder.{idx}.weight"]
        for c in range(4):
            w[c, c, 1:, 1:] = 0.25
    # Last conv: cell means in [0, 1] -> [-1, 1]; encode() then divides by vae_scale.
    w, b = sd["taesd_encoder.14.weight"], sd["taesd_encoder.14.bias"]
    for c in range(4):
        _center(w, c, c, 2.0)
        b[c] = -1.0

    # Decoder (input latent * vae_scale in about [-1, 1], after tanh(x/3)*3).
    # 1: conv(4, 64) + ReLU: v = s + 1 > 0 for the three colour channels.
    w, b = sd["taesd_decoder.1.weight"], sd["taesd_decoder.1.bias"]
    for c in range(3):
        _center(w, c, c, 1.0)
        b[c] = 1.0
    # Blocks with zero convolutions pass non-negative input through. Each Upsample (nearest)
    # is followed by a [1, 2, 1] / 4 blur per axis: together, bilinear upsampling.
    blur = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])) / 16
    for idx in (7, 12, 17):
        w = sd[f"taesd_decoder.{idx}.weight"]
        for c in range(3):
            w[c, c] = blur
    # 18: Block: channel 4 + c = clamp(k (v - 1), -1, 1) + 1 = relu(k(v-1) + 1) - relu(k(v-1) - 1).
    for c in range(3):
        p, q = 8 + 2 * c, 9 + 2 * c
        sd["taesd_decoder.18.conv.0.weight"][p, c, 1, 1] = SHARPNESS
        sd["taesd_decoder.18.conv.0.bias"][p] = 1.0 - SHARPNESS
        sd["taesd_decoder.18.conv.0.weight"][q, c, 1, 1] = SHARPNESS
        sd["taesd_decoder.18.conv.0.bias"][q] = -1.0 - SHARPNESS
        sd["taesd_decoder.18.conv.2.weight"][p, p, 1, 1] = 1.0
        sd["taesd_decoder.18.conv.2.weight"][q, q, 1, 1] = 1.0
        sd["taesd_decoder.18.conv.4.weight"][4 + c, p, 1, 1] = 1.0
        sd["taesd_decoder.18.conv.4.weight"][4 + c, q, 1, 1] = -1.0
    # 19: conv(64, 3): colour = (clamped + 1) / 2 in [0, 1].
    w = sd["taesd_decoder.19.weight"]
    for c in range(3):
        _center(w, c, 4 + c, 0.5)
    return sd


def new_vae() -> comfy.sd.VAE:
    return comfy.sd.VAE(sd=vae_state_dict())


# ---- weights file ----------------------------------------------------------------------------

def save(path: Path, unet: torch.nn.Module, clip: comfy.sd.CLIP, meta: dict) -> None:
    sd = {f"unet.{k}": v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    sd.update({f"clip.{k}": v.detach().to(torch.float16).contiguous()
               for k, v in clip.cond_stage_model.state_dict().items() if "position_ids" not in k})
    comfy.utils.save_torch_file(sd, str(path), metadata={"infsplign_demo": json.dumps(meta)})


def load(path: Path | None = None, dtype: torch.dtype | None = None,
         embedding_directory: str | None = None):
    """(MODEL, CLIP, VAE) from the demo weights (`path`, default WEIGHTS as it is at the
    call, so an evaluation can point the loader node at other weights), as ComfyUI objects."""
    path = Path(path) if path is not None else WEIGHTS
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"InfSplign demo weights not found at {path}. Reinstall the pack, or train them "
            "with: python demo/train.py (see its --help).")
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    unet_sd = {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}
    clip_sd = {k[5:]: v.float() for k, v in sd.items() if k.startswith("clip.")}

    load_device = comfy.model_management.get_torch_device()
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(model_params=comfy.utils.calculate_parameters(unet_sd),
                                                  supported_dtypes=DemoSD1.supported_inference_dtypes)
    cfg = config(dtype)
    base = cfg.get_model({}, device="cpu")
    base.load_model_weights(unet_sd, "")
    model = comfy.model_patcher.ModelPatcher(base, load_device=load_device,
                                             offload_device=comfy.model_management.unet_offload_device())
    clip = comfy.sd.CLIP(cfg.clip_target(), embedding_directory=embedding_directory)
    missing, unexpected = clip.load_sd(clip_sd, full_model=True)
    missing = [k for k in missing if "position_ids" not in k and "logit_scale" not in k
               and "text_projection" not in k]
    if missing or unexpected:
        raise ValueError(f"{path} is not an InfSplign demo weights file (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}).")
    return model, clip, new_vae()
