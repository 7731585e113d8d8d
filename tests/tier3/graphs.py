"""API-format prompt graphs shared by the tier-3 tests."""


def txt2img(ckpt: str, text: str = "a cat to the left of a dog", seed: int = 7, steps: int = 4,
            size: int = 256, parse: bool = True) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler -> VAEDecode -> PreviewImage,
    plus Spatial Relation Parse on the positive text."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    if parse:
        g["parse"] = {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["ckpt", 1], "text": text}}
    return g


def gradient_probe(ckpt: str, helper: bool) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a cat left of a dog"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "probe": {"class_type": "InfSplignTestGradientProbe", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "latent": ["latent", 0],
            "sigma": 5.0, "helper": helper}},
    }
