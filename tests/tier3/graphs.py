"""API-format prompt graphs shared by the tier-3 tests."""
import logging


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


DEFAULTS = {"strength": 1000.0, "loss": "sigmoid", "alpha": 8.0, "margin": 0.0, "orthogonal": "auto",
            "presence_weight": 1.0, "balance_weight": 1.0, "start_percent": 0.0, "end_percent": 0.25}


def ksampler_guided(ckpt: str, text: str = "a cat to the left of a dog", seed: int = 7, steps: int = 8,
                    size: int = 256, guided: bool = True, **settings) -> dict:
    """txt2img with InfSplign (KSampler) between the loader and KSampler; SaveLatent at the end."""
    g = txt2img(ckpt, text=text, seed=seed, steps=steps, size=size)
    if guided:
        g["apply"] = {"class_type": "InfSplignApply", "inputs": {
            "model": ["ckpt", 0], "relations": ["parse", 0], **{**DEFAULTS, **settings}}}
        g["sample"]["inputs"]["model"] = ["apply", 0]
    g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "t"}}
    return g


def custom_guided(ckpt: str, text: str = "a cat to the left of a dog", seed: int = 7, steps: int = 8,
                  size: int = 256, **settings) -> dict:
    """SamplerCustomAdvanced with InfSplign Guider; same noise, sampler and schedule as KSampler."""
    g = txt2img(ckpt, text=text, seed=seed, steps=steps, size=size)
    del g["sample"]
    g.update({
        "guider": {"class_type": "InfSplignGuider", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "relations": ["parse", 0], "cfg": 5.0, **{**DEFAULTS, **settings}}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {
            "model": ["ckpt", 0], "scheduler": "normal", "steps": steps, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "t"}},
    })
    return g


def workflow(ckpt: str, path: str = "ksampler", text: str = "a cat to the left of a dog", seed: int = 7,
             steps: int = 3, width: int = 64, height: int = 64, batch: int = 1, cfg: float = 5.0,
             sampler: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
             guided: bool = True, **settings) -> dict:
    """A small txt2img graph on either sampler path, ending in SaveLatent ("save_latent").

    path "ksampler": [InfSplign (KSampler) "apply"] -> KSampler "sample";
    path "custom": InfSplign Guider (or CFGGuider when not guided) "guider" ->
    SamplerCustomAdvanced "sample". Guidance settings default to DEFAULTS with
    end_percent 1.0, so every step of these short runs is guided.
    """
    settings = {**DEFAULTS, "end_percent": 1.0, **settings}
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "parse": {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["ckpt", 1], "text": text}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
    }
    if path == "ksampler":
        if guided:
            g["apply"] = {"class_type": "InfSplignApply", "inputs": {
                "model": ["ckpt", 0], "relations": ["parse", 0], **settings}}
        g["sample"] = {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0] if guided else ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler, "scheduler": scheduler, "denoise": denoise}}
    elif path == "custom":
        if guided:
            g["guider"] = {"class_type": "InfSplignGuider", "inputs": {
                "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
                "relations": ["parse", 0], "cfg": cfg, **settings}}
        else:
            g["guider"] = {"class_type": "CFGGuider", "inputs": {
                "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": cfg}}
        g.update({
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
            "sigmas": {"class_type": "BasicScheduler", "inputs": {
                "model": ["ckpt", 0], "scheduler": scheduler, "steps": steps, "denoise": denoise}},
            "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
                "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        })
    else:
        raise ValueError(f"path {path!r}: 'ksampler' or 'custom'")
    g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "t"}}
    return g


def with_plain_branch(g: dict) -> dict:
    """Adds branch B to a KSampler graph: a plain KSampler "sample_b" on the source MODEL
    ("ckpt") that waits for "sample" (its latent is that output times 0), saved as "save_b"."""
    g["zero"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["sample", 0], "multiplier": 0.0}}
    g["sample_b"] = {"class_type": "KSampler", "inputs": {**g["sample"]["inputs"], "model": ["ckpt", 0],
                                                          "latent_image": ["zero", 0]}}
    g["save_b"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample_b", 0], "filename_prefix": "b"}}
    return g


def model_consumer(g: dict) -> str:
    """The node whose `model` input takes the (patched) model: the InfSplign node when the
    graph is guided, else the sampler or the plain guider."""
    for node in ("apply", "guider", "sample"):
        if node in g and "model" in g[node]["inputs"]:
            return node
    raise KeyError("no model consumer")


def insert_model_patch(g: dict, node_id: str, class_type: str, after: str | None = None, **inputs) -> dict:
    """Put a MODEL -> MODEL node in front of the model consumer (or of node `after`'s consumer,
    i.e. between `after` and the node that reads it)."""
    consumer = model_consumer(g) if after is None else next(
        n for n, node in g.items() if node["inputs"].get("model") == [after, 0])
    g[node_id] = {"class_type": class_type, "inputs": {"model": g[consumer]["inputs"]["model"], **inputs}}
    g[consumer]["inputs"]["model"] = [node_id, 0]
    return g


def cond_consumer(g: dict) -> str:
    return "guider" if "guider" in g else "sample"


def set_latent(g: dict, node_id: str, node: dict) -> dict:
    """Replace the sampler's latent input by `node` (its output 0)."""
    g[node_id] = node
    g["sample"]["inputs"]["latent_image"] = [node_id, 0]
    return g


class Collect(logging.Handler):
    """Keeps every record it sees (attach it to the "infsplign" logger around a run)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def execute_logged(session, graph):
    """(run, [StepReport], [warning records]) of one prompt, with the "infsplign" logger's
    records collected around it."""
    logger, collect = logging.getLogger("infsplign"), Collect()
    level = logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        run = session.execute(graph)
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    return (run, [r.infsplign for r in collect.records if hasattr(r, "infsplign")],
            [r for r in collect.records if r.levelno >= logging.WARNING])
