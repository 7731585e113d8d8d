"""API-format prompt graphs for the narrow MMDiT test models (tests/testkit/mmdit_models.py),
on both sampler paths, as ComfyUI's own templates wire these models:

- SD3.5 and Chroma: real CFG (positive and negative prompt, cfg > 1);
- Flux.1-dev: cfg 1 and FluxGuidance on the positive prompt (the guidance embedding); on
  SamplerCustomAdvanced a BasicGuider;
- Flux.1-schnell: cfg 1, no FluxGuidance.
Latents come from EmptySD3LatentImage (16 channels); the graph ends in SaveLatent ("save_latent")
and VAEDecode -> PreviewImage.
"""

import json

from graphs import DEFAULTS

TEXT = "a cat to the left of a dog"
BOXES = json.dumps([{"object": "cat", "box": [0.05, 0.1, 0.45, 0.6]}, {"object": "dog", "box": [0.55, 0.4, 0.95, 0.9]}])
LAYOUT = {"injection": 6.0, "injection_end_percent": 0.4, "box_loss": "ilgd", "box_weight": 12.0,
          "box_end_percent": 0.5}
REFINE = {"presence": 1.0, "separation": 0.5, "spatial": 1.0, "refine_percent": 0.5, "iterations": 3,
          "learning_rate": 0.05, "continuous": False}
CFG = {"sd3": 4.0, "chroma": 4.0, "flux_dev": 1.0, "flux_schnell": 1.0}
FLUX_GUIDANCE = 3.5


def checkpoint(topology: str) -> str:
    return f"infsplign_test_{topology}.safetensors"


def txt2img(topology: str, text: str = "a cat to the left of a dog", path: str = "ksampler", seed: int = 7,
            steps: int = 3, size: int = 64, cfg: float | None = None, unet_loader: bool = False) -> dict:
    """One txt2img graph; `unet_loader` takes the diffusion model from UNETLoader (the file of
    the model alone) and CLIP and VAE from the checkpoint."""
    cfg = CFG[topology] if cfg is None else cfg
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint(topology)}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
        "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "mmdit"}},
    }
    model = ["ckpt", 0]
    if unet_loader:
        g["unet"] = {"class_type": "UNETLoader", "inputs": {
            "unet_name": f"infsplign_test_{topology}_dm.safetensors", "weight_dtype": "default"}}
        model = ["unet", 0]
    positive = ["pos", 0]
    if topology == "flux_dev":
        g["flux_guidance"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0],
                                                                         "guidance": FLUX_GUIDANCE}}
        positive = ["flux_guidance", 0]
    if path == "ksampler":
        g["sample"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": positive, "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}}
        return g
    if cfg == 1.0:
        g["guider"] = {"class_type": "BasicGuider", "inputs": {"model": model, "conditioning": positive}}
    else:
        g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": model, "positive": positive,
                                                             "negative": ["neg", 0], "cfg": cfg}}
    g.update({
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple",
                                                              "steps": steps, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
    })
    return g


def parse(topology: str, text: str = "a photo of a cat to the left of a dog") -> dict:
    """Spatial Relation Parse on the checkpoint's CLIP."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint(topology)}},
        "parse": {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["ckpt", 1], "text": text}},
    }


def guided(topology: str, node: str, path: str = "ksampler", settings: dict | None = None, **graph) -> dict:
    """mmdit_graphs.txt2img with Spatial Relation Parse on the model's own CLIP and `node`
    ("apply", "guider", "capture", "refine" or "layout") between the loader and the sampler."""
    g = txt2img(topology, text=TEXT, path=path, **graph)
    g["parse"] = {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["ckpt", 1], "text": TEXT}}
    relations = ["parse", 0]
    if node == "layout":
        g["layout"] = {"class_type": "InfSplignLayout", "inputs": {
            "clip": ["ckpt", 1], "text": TEXT, "boxes": BOXES, **LAYOUT}}
        relations, node = ["layout", 0], "apply" if path == "ksampler" else "guider"
    consumer = "sample" if path == "ksampler" else "guider"
    if node == "guider":
        positive = g["guider"]["inputs"].get("positive", g["guider"]["inputs"].get("conditioning"))
        g["guider"] = {"class_type": "InfSplignGuider", "inputs": {
            "model": ["ckpt", 0], "positive": positive, "negative": ["neg", 0], "relations": relations,
            "cfg": CFG[topology] if graph.get("cfg") is None else graph["cfg"], **(settings or DEFAULTS)}}
        return g
    inputs = {"model": ["ckpt", 0], "relations": relations}
    if node == "apply":
        g["apply"] = {"class_type": "InfSplignApply", "inputs": {**inputs, **(settings or DEFAULTS)}}
    elif node == "capture":
        g["capture"] = {"class_type": "InfSplignAttentionCapture", "inputs": {**inputs, "layers": "auto"}}
    elif node == "refine":
        g["refine"] = {"class_type": "InfSplignRefine", "inputs": {**inputs, **REFINE}}
    g[consumer]["inputs"]["model"] = [node, 0]
    return g
