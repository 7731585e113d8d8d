"""The graphs bench/op_count.py counts, per test topology, and the network call of its floor row.

UNet topologies (sd1, sd2v, sdxl; tests/testkit/models.py) run tests/tier3/graphs.py's
txt2img at cfg 5 (a cond and an uncond row); MMDiT topologies (flux_dev at cfg 1 with
FluxGuidance: the cond row only; sd3 at cfg 4: both rows; tests/testkit/mmdit_models.py) run
tests/tier3/mmdit_graphs.py's, as ComfyUI's own templates wire those models.
"""
from __future__ import annotations

import json

import torch

REFINE_ITERATIONS = 2
MMDIT = ("flux_dev", "flux_schnell", "chroma", "sd3")
TEXT = "a cat to the left of a dog"
BOXES = [{"object": "cat", "box": [0.05, 0.1, 0.45, 0.6]}, {"object": "dog", "box": [0.55, 0.4, 0.95, 0.9]}]
LAYOUT = {"injection": 6.0, "injection_end_percent": 1.0, "box_loss": "ilgd", "box_weight": 12.0,
          "box_end_percent": 1.0, "placing_iterations": 0}
# Layout Boxes' placing burst, counted per iteration as InfSplign Refine's (at the same step)
PLACING = {"placing_iterations": REFINE_ITERATIONS, "placing_percent": 0.5, "box_loss": "peak_centre",
           "box_weight": 1.5}
REFINE = {"presence": 1.0, "separation": 0.5, "spatial": 1.0, "refine_percent": 0.5, "iterations": REFINE_ITERATIONS,
          "learning_rate": 0.05, "continuous": False, "memory": "fast"}


def _unet_builders(topology: str, steps: int):
    from graphs import insert_model_patch, workflow
    ckpt = f"infsplign_test_{topology}.safetensors"

    def build(kind, seed, text=TEXT, **settings):
        common = dict(steps=steps, seed=seed, text=text)
        if kind == "plain":
            return workflow(ckpt, "ksampler", guided=False, **common)
        if kind == "capture":
            g = workflow(ckpt, "ksampler", guided=False, **common)
            return insert_model_patch(g, "capture", "InfSplignAttentionCapture", relations=["parse", 0],
                                      layers="auto", custom_layers="")
        return workflow(ckpt, "ksampler", **common, **settings)

    def boxes(seed):
        g = build("guided", seed, memory="fast", end_percent=1.0, text="a cat and a dog")
        g["layout"] = {"class_type": "InfSplignLayout", "inputs": {
            "clip": ["ckpt", 1], "text": "a cat and a dog", "boxes": json.dumps(BOXES), **LAYOUT}}
        g["apply"]["inputs"]["relations"] = ["layout", 0]
        del g["parse"]
        return g

    def refine(seed):
        g = build("plain", seed)
        g["refine"] = {"class_type": "InfSplignRefine", "inputs": {"model": ["ckpt", 0], "relations": ["parse", 0],
                                                                     **REFINE}}
        g["sample"]["inputs"]["model"] = ["refine", 0]
        return g
    return build, boxes, refine


def _mmdit_builders(topology: str, steps: int):
    import mmdit_graphs
    from graphs import DEFAULTS

    def build(kind, seed, **settings):
        if kind == "plain":
            return mmdit_graphs.txt2img(topology, steps=steps, seed=seed)
        if kind == "capture":
            return mmdit_graphs.guided(topology, "capture", steps=steps, seed=seed)
        return mmdit_graphs.guided(topology, "apply", settings={**DEFAULTS, **settings}, steps=steps, seed=seed)

    def boxes(seed):
        g = mmdit_graphs.guided(topology, "layout", settings={**DEFAULTS, "memory": "fast", "end_percent": 1.0},
                                steps=steps, seed=seed)
        g["layout"]["inputs"].update(LAYOUT)
        return g

    def refine(seed):
        g = mmdit_graphs.guided(topology, "refine", steps=steps, seed=seed)
        g["refine"]["inputs"].update(REFINE)
        return g
    return build, boxes, refine


def graphs(topology: str, steps: int) -> dict:
    """name -> (graph for a seed, which steps the row reads, the fast step's design)."""
    build, boxes, refine = (_mmdit_builders if topology in MMDIT else _unet_builders)(topology, steps)
    every = range(steps)
    window = round(steps * 0.25)
    return {
        "plain": (lambda s: build("plain", s), every, None),
        "capture only": (lambda s: build("capture", s), every, None),
        "strength 0": (lambda s: build("guided", s, strength=0.0, end_percent=1.0), every, None),
        "guided fast, one forward": (lambda s: build("guided", s, memory="fast", end_percent=1.0), every, "batched"),
        "guided fast, split": (lambda s: build("guided", s, memory="fast", end_percent=1.0), every, "split"),
        "guided low": (lambda s: build("guided", s, memory="low", end_percent=1.0), every, None),
        "unguided steps of a guided run": (lambda s: build("guided", s, memory="fast", end_percent=0.25),
                                           range(window, steps), None),
        "layout boxes step": (boxes, every, "split"),
        "refine iteration": (refine, "refine", "split"),
        "layout placing iteration": (lambda s: _placing(boxes(s)), "refine", "split"),
    }


def _placing(g: dict) -> dict:
    g["layout"]["inputs"].update(PLACING)
    return g


def save_models(folder, topologies) -> None:
    """The topologies' test checkpoints as infsplign_test_<topology>.safetensors in `folder`."""
    from testkit import mmdit_models, models
    for topology in topologies:
        kind = mmdit_models if topology in MMDIT else models
        kind.save_checkpoint(str(folder / f"infsplign_test_{topology}.safetensors"), topology)


def floor_call(model, pack):
    """(network, inputs of one forward with the latent as "x", what makes its backward exact):
    the floor row's call, as the sampler's own forward of a step runs it (a cond and an uncond
    row; Flux.1-dev at cfg 1 the cond row only)."""
    network = model.model.diffusion_model
    if model.model.model_config.__class__.__name__.endswith(("Flux", "FluxSchnell")):
        rows, tokens = 1, 256
    else:
        rows, tokens = 2, 154 if hasattr(network, "joint_blocks") else 77
    families = pack("engine.families")
    family = families.family_of(model)
    if family.name == "UNet":
        config = model.model.model_config.unet_config
        context = config["context_dim"][0] if isinstance(config["context_dim"], (list, tuple)) else config["context_dim"]
        inputs = {"x": torch.randn(rows, config["in_channels"], 8, 8), "timesteps": torch.full((rows,), 500.0),
                  "context": torch.randn(rows, tokens, context)}
        if config.get("adm_in_channels"):
            inputs["y"] = torch.randn(rows, config["adm_in_channels"])
    else:
        memory = pack("engine.families.mmdit.memory")
        inputs = memory.Twin(network, torch.float32, "cpu").inputs(rows, (8, 8), tokens)
        inputs = {k: torch.randn_like(v) if v.is_floating_point() and k in ("x", "context", "y") else v
                  for k, v in inputs.items()}
    return network, inputs, family.autograd_context(network)
