"""Deterministic small MMDiT models with the real topologies of SD3.5, Flux.1 dev / schnell and Chroma.

Everything is built from ComfyUI's own classes, as tests/testkit/models.py does for the
UNets: the diffusion model comes from the supported-model configs (comfy.supported_models.SD3,
Flux, FluxSchnell, Chroma) through ComfyUI's own detection, the text encoders are ComfyUI's
(SD3ClipModel, FluxClipModel, PixArt's T5 for Chroma) at a narrow width with ComfyUI's real
tokenizers (CLIP BPE and T5 sentencepiece, shipped in ComfyUI's tree), the VAE is a TAESD
for 16-channel latents. Weights are drawn from a seed, turned into a checkpoint by ComfyUI's
own saving code and loaded back by its real loading function, so a test model goes through
the same detection and loading path as a user's checkpoint file (CheckpointLoaderSimple; the
diffusion model alone also loads through UNETLoader).

What is narrow: the hidden width (128: two heads of 64), the number of blocks, the text
encoders' widths and depths. What is kept: 16-channel latents and 2x2 patches, the token
layout of the joint attention ([text | image]), Flux's RoPE axes in the real proportions
(16 : 56 : 56 of the head width), the guidance embedding of Flux-dev, Chroma's modulation
approximator, SD3.5's RMS q/k norms, its image-only second attention (block 0, as SD3.5-M)
and its learned-size position embedding, the text contexts exactly as ComfyUI builds them
(Flux: T5 only, padded to 256; SD3: CLIP-L and CLIP-G joined on the feature axis and padded
to 4096 features, T5 rows appended; Chroma: T5 unpadded).

One constraint is ComfyUI's: SD3ClipModel pads the CLIP features to 4096 and appends T5's
rows to them, so SD3's T5 must be 4096 wide; its vocabulary (32128) is the real one, so its
embedding alone holds 132 M values. Everything else is small.

Newer text-encoder loaders (DualCLIPLoader, TripleCLIPLoader) tell encoders apart by their
layer count (CLIP-G: layer 30 exists; T5-XXL: block 23), which a narrow encoder does not
have: the narrow text encoders travel inside the checkpoint, read by the test configs'
clip_target exactly as ComfyUI's SD3 / Flux / Chroma configs read a full checkpoint's.
"""
from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass

import torch

import comfy.model_detection
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.utils
from comfy.text_encoders import flux as flux_te
from comfy.text_encoders import pixart_t5
from comfy.text_encoders import sd3_clip

CLIP_WIDTH = 64  # CLIP-L and CLIP-G (narrow)
T5_WIDTH = 64  # Flux / Chroma read T5 through their own txt_in: any width
SD3_T5_WIDTH = 4096  # fixed by SD3ClipModel (see the module note)
HIDDEN = 128  # two heads of 64 (SD3 ties the width to 64 * depth)
HEADS = 2
FLUX_AXES = [8, 28, 28]  # Flux's [16, 56, 56] scaled to a 64-wide head
SD3_DEPTH = HIDDEN // 64  # SD3's "depth" is its width / 64 (and its head count)
SD3_BLOCKS = 4
SD3_POS_EMBED_SIDE = 32  # learned position table of 32 x 32 patches (latents up to 64 x 64)
FLUX_DOUBLE, FLUX_SINGLE = 2, 2
CHROMA_APPROX_WIDTH, CHROMA_APPROX_LAYERS = 64, 2


def narrow_clip(width: int) -> dict:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
            "num_hidden_layers": 3,  # SD3's CLIP-L reads layer -2; ComfyUI asserts more than 2
            "projection_dim": width}


def narrow_t5(width: int) -> dict:
    return {"d_model": width, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16}


def _narrow(model_options: dict, t5_width: int) -> dict:
    """model_options that make ComfyUI's SDClipModel build each named encoder narrow."""
    return {**model_options, "clip_l_model_config": narrow_clip(CLIP_WIDTH),
            "clip_g_model_config": narrow_clip(CLIP_WIDTH), "t5xxl_model_config": narrow_t5(t5_width)}


class NarrowFluxClip(flux_te.FluxClipModel):
    """Flux's CLIP-L (pooled vector only) + T5 (the context)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options=_narrow(model_options, T5_WIDTH))


class NarrowChromaT5(pixart_t5.PixArtT5XXL):
    """Chroma's text encoder: PixArt's T5 (no padding, empty = all pad tokens)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options=_narrow(model_options, T5_WIDTH))


def narrow_sd3_clip(clip_l: bool = True, clip_g: bool = True, t5: bool = True) -> type:
    """SD3's text encoder with the parts a checkpoint holds (any of CLIP-L, CLIP-G, T5)."""
    base = sd3_clip.sd3_clip(clip_l=clip_l, clip_g=clip_g, t5=t5)

    class NarrowSD3Clip(base):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=_narrow(model_options, SD3_T5_WIDTH))
    NarrowSD3Clip.__qualname__ = NarrowSD3Clip.__name__ = f"NarrowSD3Clip_{int(clip_l)}{int(clip_g)}{int(t5)}"
    return NarrowSD3Clip


# Supported-model configs for the narrow diffusion models. ComfyUI matches a detected
# config against `unet_config` of each entry of comfy.supported_models.models in order;
# these are put first by register_detection() and match only the narrow width, so the real
# SD3 / Flux / Chroma classes (and real files) are untouched. `unet_extra_config` sets what
# ComfyUI's detection fixes to the full-size values (head count, RoPE axes, ...).
class TestSD3(comfy.supported_models.SD3):
    unet_config = {"in_channels": 16, "pos_embed_scaling_factor": None, "depth": SD3_DEPTH}
    unet_extra_config = {"num_blocks": SD3_BLOCKS}

    def clip_target(self, state_dict={}):
        pref = self.text_encoder_key_prefix[0]
        has = lambda key: any(k.startswith(f"{pref}{key}.") for k in state_dict)  # noqa: E731
        return comfy.supported_models_base.ClipTarget(
            sd3_clip.SD3Tokenizer, narrow_sd3_clip(has("clip_l"), has("clip_g"), has("t5xxl")))


_FLUX_EXTRA = {"num_heads": HEADS, "axes_dim": FLUX_AXES}


class TestFlux(comfy.supported_models.Flux):
    unet_config = {"image_model": "flux", "guidance_embed": True, "hidden_size": HIDDEN}
    unet_extra_config = dict(_FLUX_EXTRA)

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(flux_te.FluxTokenizer, NarrowFluxClip)


class TestFluxSchnell(comfy.supported_models.FluxSchnell):
    unet_config = {"image_model": "flux", "guidance_embed": False, "hidden_size": HIDDEN}
    unet_extra_config = dict(_FLUX_EXTRA)

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(flux_te.FluxTokenizer, NarrowFluxClip)


class TestChroma(comfy.supported_models.Chroma):
    unet_config = {"image_model": "chroma", "hidden_size": HIDDEN}
    unet_extra_config = {**_FLUX_EXTRA, "out_dim": HIDDEN, "hidden_dim": CHROMA_APPROX_WIDTH,
                         "n_layers": CHROMA_APPROX_LAYERS}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(pixart_t5.PixArtTokenizer, NarrowChromaT5)


TEST_CONFIGS = (TestSD3, TestFlux, TestFluxSchnell, TestChroma)


def register_detection() -> None:
    """Let ComfyUI's detection recognise the narrow diffusion models (idempotent)."""
    models = comfy.supported_models.models
    for cfg in reversed(TEST_CONFIGS):
        if not any(m.__name__ == cfg.__name__ and m.__module__ == cfg.__module__ for m in models):
            models.insert(0, cfg)


# -- the diffusion models' file layouts ------------------------------------------------------
# Detection reads only key names and shapes. Each layout below is the part of a real file's
# keys that ComfyUI's detection looks at, at the narrow sizes, given as meta tensors: ComfyUI's
# own model_config_from_unet turns it into the config of this ComfyUI version (fields newer
# versions add come from their own detection), and picks the test config registered above.

def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def _sd3_layout() -> dict:
    sd = {"x_embedder.proj.weight": _meta(HIDDEN, 16, 2, 2),
          "final_layer.linear.weight": _meta(2 * 2 * 16, HIDDEN),
          "y_embedder.mlp.0.weight": _meta(HIDDEN, 2 * CLIP_WIDTH),  # pooled CLIP-L + CLIP-G
          "context_embedder.weight": _meta(HIDDEN, 4096),
          "pos_embed": _meta(1, SD3_POS_EMBED_SIDE ** 2, HIDDEN),
          "joint_blocks.0.context_block.attn.ln_q.weight": _meta(64),  # SD3.5: RMS q/k norms
          "joint_blocks.0.x_block.attn2.qkv.weight": _meta(3 * HIDDEN, HIDDEN)}  # SD3.5-M: block 0
    for i in range(SD3_BLOCKS):
        sd[f"joint_blocks.{i}.context_block.attn.qkv.weight"] = _meta(3 * HIDDEN, HIDDEN)
    return sd


def _flux_layout(guidance: bool, chroma: bool = False) -> dict:
    sd = {"double_blocks.0.img_attn.norm.key_norm.scale": _meta(HIDDEN // HEADS),
          "img_in.weight": _meta(HIDDEN, 16 * 2 * 2),
          "txt_in.weight": _meta(HIDDEN, T5_WIDTH)}
    if chroma:
        sd["distilled_guidance_layer.norms.0.scale"] = _meta(CHROMA_APPROX_WIDTH)
    else:
        sd["vector_in.in_layer.weight"] = _meta(HIDDEN, CLIP_WIDTH)  # CLIP-L's pooled vector
        if guidance:
            sd["guidance_in.in_layer.weight"] = _meta(HIDDEN, 256)
    for i in range(FLUX_DOUBLE):
        sd[f"double_blocks.{i}.img_attn.qkv.weight"] = _meta(3 * HIDDEN, HIDDEN)
    for i in range(FLUX_SINGLE):
        sd[f"single_blocks.{i}.linear1.weight"] = _meta(7 * HIDDEN, HIDDEN)
    return sd


@dataclass(frozen=True)
class Topology:
    name: str
    config: type
    layout: object  # () -> the detection keys of the diffusion model
    description: str
    context: str  # the text context the model reads, as ComfyUI builds it


TOPOLOGIES = {
    "sd3": Topology("sd3", TestSD3, _sd3_layout,
                    "SD3.5-M topology (joint blocks, RMS q/k norms, image-only attention in block 0, real CFG)",
                    "CLIP-L + CLIP-G on the feature axis (77-token chunks), T5 rows appended"),
    "flux_dev": Topology("flux_dev", TestFlux, lambda: _flux_layout(True),
                         "Flux.1-dev topology (double + single blocks, RoPE, guidance embedding: cfg 1 + FluxGuidance)",
                         "T5 only (padded to 256), CLIP-L pooled vector"),
    "flux_schnell": Topology("flux_schnell", TestFluxSchnell, lambda: _flux_layout(False),
                             "Flux.1-schnell topology (no guidance embedding, FLOW sampling)",
                             "T5 only (padded to 256), CLIP-L pooled vector"),
    "chroma": Topology("chroma", TestChroma, lambda: _flux_layout(False, chroma=True),
                       "Chroma topology (Flux blocks, modulation approximator, real CFG)",
                       "T5 only (not padded)"),
}


def model_config(topology: str):
    """The supported-model config ComfyUI's detection gives the narrow model's keys."""
    register_detection()
    cfg = comfy.model_detection.model_config_from_unet(TOPOLOGIES[topology].layout(), "")
    if not isinstance(cfg, TOPOLOGIES[topology].config):
        raise RuntimeError(f"ComfyUI's detection picked {type(cfg).__name__} for the narrow {topology} layout")
    return cfg


# -- weights ---------------------------------------------------------------------------------

def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _fill(name: str, t: torch.Tensor, seed: int) -> None:
    """Deterministic, alive initialisation: fan-in scaled matrices, norm gains near 1 (LayerNorm
    `weight`, RMSNorm `scale`), small biases."""
    if t.ndim == 0 or not t.is_floating_point():
        return
    r = torch.randn(t.shape, generator=_generator(name, seed), dtype=torch.float32)
    if t.ndim >= 2:
        r = r / float(t[0].numel()) ** 0.5
    elif name.endswith(("weight", "scale")):  # norm gains
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


def _sincos_table(side: int, width: int) -> torch.Tensor:
    """A 2-D sine-cosine position table (1, side * side, width), as SD3's checkpoints hold."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    grid = torch.arange(side, dtype=torch.float64)
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angle = pos[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)[None].float()


def _for_saving(model, clip_sd: dict, vae_sd: dict) -> dict:
    """BaseModel.state_dict_for_saving by keyword (newer ComfyUI takes the diffusion model's
    state dict as a leading parameter)."""
    kwargs = {"clip_state_dict": clip_sd, "vae_state_dict": vae_sd}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        kwargs["unet_state_dict"] = model.diffusion_model.state_dict()
    return model.state_dict_for_saving(**kwargs)


def build(topology: str, seed: int = 0, text_encoders: tuple[str, ...] | None = None):
    """(model config, BaseModel with seeded weights, text encoder state dict, VAE state dict).

    `text_encoders` (SD3 only) picks the parts of SD3's text encoder the checkpoint holds:
    any of "clip_l", "clip_g", "t5xxl" (default: all three)."""
    cfg = model_config(topology)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    dm_sd = _filled(model.diffusion_model, seed)
    if "pos_embed" in dm_sd:
        dm_sd["pos_embed"].copy_(_sincos_table(SD3_POS_EMBED_SIDE, HIDDEN))
    model.diffusion_model.load_state_dict(dm_sd)

    if topology == "sd3":
        parts = text_encoders or ("clip_l", "clip_g", "t5xxl")
        clip_class = narrow_sd3_clip("clip_l" in parts, "clip_g" in parts, "t5xxl" in parts)
    elif text_encoders is not None:
        raise ValueError("text_encoders picks SD3's parts only")
    else:
        clip_class = cfg.clip_target().clip
    with torch.device("cpu"):
        clip_module = clip_class(device="cpu", dtype=torch.float32, model_options={})
    clip_sd = _filled(clip_module, seed + 1)
    vae_sd = _filled(comfy.taesd.taesd.TAESD(latent_channels=16), seed + 2)
    return cfg, model, clip_sd, vae_sd


def checkpoint_state_dict(topology: str, seed: int = 0, text_encoders: tuple[str, ...] | None = None) -> dict:
    """A complete checkpoint (diffusion model, text encoders, VAE) in ComfyUI's saving format."""
    _, model, clip_sd, vae_sd = build(topology, seed, text_encoders)
    return _for_saving(model, clip_sd, vae_sd)


def diffusion_model_state_dict(topology: str, seed: int = 0) -> dict:
    """The diffusion model alone, as a file for UNETLoader (models/diffusion_models) holds it."""
    return build(topology, seed)[1].diffusion_model.state_dict()


def load(topology: str, seed: int = 0, dtype: torch.dtype | None = None,
         embedding_directory: str | None = None, text_encoders: tuple[str, ...] | None = None):
    """(MODEL, CLIP, VAE) through ComfyUI's real checkpoint loading function."""
    register_detection()
    sd = checkpoint_state_dict(topology, seed, text_encoders)
    options = {} if dtype is None else {"dtype": dtype}
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
        sd, model_options=options, embedding_directory=embedding_directory)
    return model, clip, vae


def save_checkpoint(path: str, topology: str, seed: int = 0, text_encoders: tuple[str, ...] | None = None) -> str:
    """Write the test checkpoint as a .safetensors file for CheckpointLoaderSimple."""
    comfy.utils.save_torch_file(checkpoint_state_dict(topology, seed, text_encoders), path)
    return path


def save_diffusion_model(path: str, topology: str, seed: int = 0) -> str:
    """Write the diffusion model alone as a .safetensors file for UNETLoader."""
    comfy.utils.save_torch_file(diffusion_model_state_dict(topology, seed), path)
    return path


# -- text encoders of families the pack does not read ----------------------------------------

def foreign_clip(kind: str):
    """A real ComfyUI CLIP object of another family ("qwen_image": Qwen2.5-VL, "aura_flow":
    Pile-T5), with ComfyUI's real tokenizer; its encoder is built on the meta device (no
    memory, no weights): for the refusals, which read the tokenizer and the encoder's type."""
    import comfy.text_encoders.aura_t5
    import comfy.text_encoders.qwen_image
    targets = {
        "qwen_image": (comfy.text_encoders.qwen_image.QwenImageTokenizer, comfy.text_encoders.qwen_image.te()),
        "aura_flow": (comfy.text_encoders.aura_t5.AuraT5Tokenizer, comfy.text_encoders.aura_t5.AuraT5Model),
    }
    tokenizer, encoder = targets[kind]
    return comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, encoder),
                         model_options={"initial_device": torch.device("meta")})
