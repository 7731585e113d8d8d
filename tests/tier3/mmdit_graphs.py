"""API-format prompt graphs for the narrow MMDiT test models (tests/testkit/mmdit_models.py),
on both sampler paths, as ComfyUI's own templates wire these models:

- SD3.5 and Chroma: real CFG (positive and negative prompt, cfg > 1);
- Flux.1-dev: cfg 1 and FluxGuidance on the positive prompt (the guidance embedding); on
  SamplerCustomAdvanced a BasicGuider;
- Flux.1-schnell: cfg 1, no FluxGuidance.
Latents come from EmptySD3LatentImage (16 channels); the graph ends in SaveLatent ("save_latent")
and VAEDecode -> PreviewImage.
"""

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
