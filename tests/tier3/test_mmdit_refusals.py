"""Tier 3: what the guidance nodes say when the relations were parsed with the CLIP of another
model (a UNet's CLIP on Flux.1, Flux's or SD3's on SDXL), through ComfyUI's real executor on
both sampler paths: a node error naming both encoders and the fix; never an AttributeError,
never a model left patched (the same graph samples plainly afterwards)."""
import pytest

import mmdit_graphs
from graphs import ksampler_guided
from mmdit_graphs import TEXT, guided

pytestmark = pytest.mark.host


def _refused(host, graph, node: str) -> str:
    run = host.execute(graph)
    assert not run.success, f"{node} accepted relations of another model"
    error = run.error()
    assert "AttributeError" not in error and "Traceback" not in error.split("\n")[0], error
    return error


@pytest.mark.parametrize("path", ["ksampler", "custom"])
def test_unet_clip_relations_on_a_flux_model(host, checkpoints, mmdit_files, path):
    """Relations parsed with SDXL's CLIP given to InfSplign on Flux.1-dev: both are named; the
    model is left as it was (the plain graph samples bitwise as before)."""
    plain = mmdit_graphs.txt2img("flux_dev", text=TEXT)
    first = host.execute(plain)
    assert first.success, first.error()
    node = "apply" if path == "ksampler" else "guider"
    g = guided("flux_dev", node, path)
    g["sdxl"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "infsplign_test_sdxl.safetensors"}}
    g["parse"]["inputs"]["clip"] = ["sdxl", 1]
    error = _refused(host, g, node)
    assert "parsed with a clip_g+clip_l CLIP, but this model is Flux.1" in error, error
    assert "encoded by t5xxl" in error and "Connect the CLIP" in error, error
    again = host.execute(plain)
    assert again.success, again.error()
    (a,), (b,) = host.saved_latents(first, "save_latent"), host.saved_latents(again, "save_latent")
    assert a.equal(b)


@pytest.mark.parametrize("topology, encoder", [("flux_dev", "t5xxl"), ("sd3", "clip_g+clip_l+t5xxl")])
def test_mmdit_clip_relations_on_an_sdxl_model(host, checkpoints, mmdit_files, topology, encoder):
    """Relations parsed with Flux's / SD3's CLIP given to InfSplign on SDXL: both are named, and the fix."""
    g = ksampler_guided("infsplign_test_sdxl.safetensors", steps=2, size=64)
    g["mmdit"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": mmdit_graphs.checkpoint(topology)}}
    g["parse"]["inputs"]["clip"] = ["mmdit", 1]
    error = _refused(host, g, "apply")
    assert f"parsed with a {encoder} CLIP" in error and "this model is SDXL" in error, error
    assert "Connect the CLIP of the checkpoint" in error, error
