"""Tier 3: Spatial Relation Parse on the CLIPs of SD3, Flux.1 and Chroma, and the refusals,
through ComfyUI's real executor."""
import pytest

import mmdit_graphs
from graphs import ksampler_guided

pytestmark = pytest.mark.host


@pytest.mark.parametrize("topology, summary", [
    ("flux_dev", ['"cat" left of "dog"  (tokens cat: [6], dog: [13])', "encoder t5xxl, 256 tokens"]),
    ("chroma", ["(tokens cat: [6], dog: [13])", "encoder t5xxl, 15 tokens"]),
    ("sd3", ["(tokens cat: [5, 83], dog: [11, 90])", "encoder clip_g+clip_l+t5xxl, 154 tokens"]),
])
def test_relation_parse_on_mmdit_clips(host, mmdit_files, topology, summary):
    run = host.execute(mmdit_graphs.parse(topology))
    assert run.success, run.error()
    (text,) = run.outputs["parse"]["text"]
    for line in summary:
        assert line in text


@pytest.mark.parametrize("kind, encoder", [("qwen_image", "QwenImageTEModel_"), ("aura_flow", "AuraT5Model")])
def test_other_clip_types_are_a_clear_node_error(host, kind, encoder):
    run = host.execute({
        "clip": {"class_type": "InfSplignTestForeignCLIP", "inputs": {"kind": kind}},
        "parse": {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["clip", 0],
                                                                    "text": "a cat to the left of a dog"}},
    })
    assert not run.success
    error = run.error()
    assert "RelationError: Spatial Relation Parse cannot find words in the context of this CLIP" in error
    assert f"its text encoder is {encoder}" in error and "Supported:" in error


def test_flux_clip_on_a_unet_model_is_refused_naming_both(host, checkpoints, mmdit_files):
    """Relations parsed with Flux's CLIP (T5 positions) given to InfSplign on an SD1 model."""
    g = ksampler_guided("infsplign_test_sd1.safetensors", steps=2, size=64)
    g["flux"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": mmdit_graphs.checkpoint("flux_dev")}}
    g["parse"]["inputs"]["clip"] = ["flux", 1]
    run = host.execute(g)
    assert not run.success
    error = run.error()
    assert "parsed with a t5xxl CLIP" in error and "SD1.x" in error
