"""Tier 3: what the guidance nodes say when connected to a model they cannot guide yet (Flux.1-dev,
Flux.1-schnell, Chroma, SD3.5: the narrow test models), or to relations parsed with the CLIP of
another model, through ComfyUI's real executor on both sampler paths. Each is a node error with
a message naming the value (the model type, the CLIP's encoder) and the fix; never an
AttributeError, never a model left patched (the same graph samples plainly afterwards)."""
import json

import pytest

import mmdit_graphs
from graphs import DEFAULTS, ksampler_guided

pytestmark = pytest.mark.host
TEXT = "a cat to the left of a dog"
BOXES = json.dumps([{"object": "cat", "box": [0.05, 0.1, 0.45, 0.6]}, {"object": "dog", "box": [0.55, 0.4, 0.95, 0.9]}])
LAYOUT = {"injection": 6.0, "injection_end_percent": 0.4, "box_loss": "ilgd", "box_weight": 12.0,
          "box_end_percent": 0.5}
REFINE = {"presence": 1.0, "separation": 0.5, "spatial": 1.0, "refine_percent": 0.5, "iterations": 3,
          "learning_rate": 0.05, "continuous": False}
# the type name ComfyUI gives each narrow model's config (the test configs subclass ComfyUI's own)
KIND = {"flux_dev": "TestFlux", "flux_schnell": "TestFluxSchnell", "chroma": "TestChroma", "sd3": "TestSD3"}


def guided(topology: str, node: str, path: str = "ksampler") -> dict:
    """mmdit_graphs.txt2img with Spatial Relation Parse on the model's own CLIP and `node`
    ("apply", "guider", "capture", "refine" or "layout") between the loader and the sampler."""
    g = mmdit_graphs.txt2img(topology, text=TEXT, path=path)
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
            "cfg": mmdit_graphs.CFG[topology], **DEFAULTS}}
        return g
    inputs = {"model": ["ckpt", 0], "relations": relations}
    if node == "apply":
        g["apply"] = {"class_type": "InfSplignApply", "inputs": {**inputs, **DEFAULTS}}
    elif node == "capture":
        g["capture"] = {"class_type": "InfSplignAttentionCapture", "inputs": {**inputs, "layers": "auto"}}
    elif node == "refine":
        g["refine"] = {"class_type": "InfSplignRefine", "inputs": {**inputs, **REFINE}}
    g[consumer]["inputs"]["model"] = [node, 0]
    return g


def _refused(host, graph, node: str) -> str:
    run = host.execute(graph)
    assert not run.success, f"{node} accepted a model it cannot guide"
    error = run.error()
    assert "AttributeError" not in error and "Traceback" not in error.split("\n")[0], error
    return error


@pytest.mark.parametrize("topology", ["flux_dev", "flux_schnell", "chroma", "sd3"])
@pytest.mark.parametrize("node, path", [("apply", "ksampler"), ("guider", "custom"), ("capture", "ksampler"),
                                        ("refine", "custom"), ("layout", "ksampler"), ("layout", "custom")])
def test_mmdit_models_are_refused_clearly(host, mmdit_files, topology, node, path):
    error = _refused(host, guided(topology, node, path), node)
    assert f"This model is {KIND[topology]}, a " in error, error
    assert "not wired yet" in error, error
    assert "Load an SD1.x, SD2.x or SDXL checkpoint" in error, error


def test_refused_model_is_left_unpatched(host, mmdit_files):
    """After the refusal the same model samples plainly, bitwise as before it."""
    plain = mmdit_graphs.txt2img("flux_dev", text=TEXT)
    first = host.execute(plain)
    assert first.success, first.error()
    _refused(host, guided("flux_dev", "apply"), "apply")
    again = host.execute(plain)
    assert again.success, again.error()
    (a,), (b,) = host.saved_latents(first, "save_latent"), host.saved_latents(again, "save_latent")
    assert a.equal(b)


@pytest.mark.parametrize("path", ["ksampler", "custom"])
def test_unet_clip_relations_on_a_flux_model(host, checkpoints, mmdit_files, path):
    """Relations parsed with SDXL's CLIP given to InfSplign on Flux.1-dev: the model is named."""
    node = "apply" if path == "ksampler" else "guider"
    g = guided("flux_dev", node, path)
    g["sdxl"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "infsplign_test_sdxl.safetensors"}}
    g["parse"]["inputs"]["clip"] = ["sdxl", 1]
    error = _refused(host, g, node)
    assert f"This model is {KIND['flux_dev']}" in error and "not wired yet" in error, error


@pytest.mark.parametrize("topology, encoder", [("flux_dev", "t5xxl"), ("sd3", "clip_g+clip_l+t5xxl")])
def test_mmdit_clip_relations_on_an_sdxl_model(host, checkpoints, mmdit_files, topology, encoder):
    """Relations parsed with Flux's / SD3's CLIP given to InfSplign on SDXL: both are named, and the fix."""
    g = ksampler_guided("infsplign_test_sdxl.safetensors", steps=2, size=64)
    g["mmdit"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": mmdit_graphs.checkpoint(topology)}}
    g["parse"]["inputs"]["clip"] = ["mmdit", 1]
    error = _refused(host, g, "apply")
    assert f"parsed with a {encoder} CLIP" in error and "this model is SDXL" in error, error
    assert "Connect the CLIP of the checkpoint" in error, error
