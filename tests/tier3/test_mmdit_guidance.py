"""Tier 3: InfSplign on the MMDiT family (narrow Flux.1-dev at cfg 1 with FluxGuidance,
Flux.1-schnell, Chroma and SD3.5 test models, loaded by ComfyUI's own loaders) through the
real executor on both sampler paths: strength 0 samples bitwise as plain sampling; guidance
changes the latent and keeps it finite; `low` gives `fast`'s latent; layout boxes and Refine
run; the log names each guided step."""
import logging

import pytest
import torch

import mmdit_graphs
from graphs import DEFAULTS
from mmdit_graphs import guided

pytestmark = pytest.mark.host
TOPOLOGIES = ["flux_dev", "flux_schnell", "chroma", "sd3"]
STEPS = 4
# two guided steps of four (the window's end in ComfyUI's percent convention)
GUIDED = {**DEFAULTS, "end_percent": 0.5}


def _latent(host, graph):
    run = host.execute(graph)
    assert run.success, run.error()
    (latent,) = host.saved_latents(run, "save_latent")
    return latent


def _node(path: str) -> str:
    return "apply" if path == "ksampler" else "guider"


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("path", ["ksampler", "custom"])
def test_strength_zero_is_plain_sampling(host, mmdit_files, topology, path):
    plain = _latent(host, mmdit_graphs.txt2img(topology, path=path, steps=STEPS))
    zero = _latent(host, guided(topology, _node(path), path, settings={**GUIDED, "strength": 0.0}, steps=STEPS))
    assert zero.equal(plain)


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("path", ["ksampler", "custom"])
def test_guidance_moves_the_latent_and_low_gives_fast(host, mmdit_files, topology, path, caplog):
    plain = _latent(host, mmdit_graphs.txt2img(topology, path=path, steps=STEPS))
    with caplog.at_level(logging.INFO, logger="infsplign"):
        fast = _latent(host, guided(topology, _node(path), path, settings={**GUIDED, "memory": "fast"}, steps=STEPS))
    steps = [r for r in caplog.records if r.getMessage().startswith("InfSplign guided step")]
    assert len(steps) == 2 and all("(fast, cond rows apart from uncond rows)" in r.getMessage() for r in steps), \
        [r.getMessage() for r in caplog.records]
    assert torch.isfinite(fast).all()
    change = (fast - plain).abs().max() / plain.abs().max()
    assert change > 1e-4, f"guidance left the latent as it was ({change:.2e})"
    low = _latent(host, guided(topology, _node(path), path, settings={**GUIDED, "memory": "low"}, steps=STEPS))
    assert ((low - fast).abs().max() / fast.abs().max()) <= 1e-5


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("node, path", [("layout", "ksampler"), ("layout", "custom"), ("refine", "ksampler"),
                                        ("refine", "custom"), ("capture", "ksampler")])
def test_boxes_refine_and_capture_run(host, mmdit_files, topology, node, path):
    plain = _latent(host, mmdit_graphs.txt2img(topology, path=path, steps=STEPS))
    out = _latent(host, guided(topology, node, path, steps=STEPS))
    assert torch.isfinite(out).all()
    if node == "capture":  # capture alone changes nothing
        assert out.equal(plain)
    else:
        assert not out.equal(plain)


PROMPTS = ["a cat to the left of a dog", "a red apple above a green bowl", "a horse to the right of a tree",
           "a lamp below a clock", "a bird to the left of a house", "a cup above a book"]
SEEDS = [1, 2]  # 4 seeds took 140 s of the suite; with seeds 1-3 all 18 pairs per model were lower


def _reports(host, graph, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="infsplign"):
        run = host.execute(graph)
    assert run.success, run.error()
    return [r.infsplign for r in caplog.records if hasattr(r, "infsplign")]


# Flux.1-schnell is Flux.1-dev without the guidance embedding: the same blocks, capture and
# guided step, checked in every test above; the loss-reduction measure runs on the other three.
@pytest.mark.parametrize("topology", ["flux_dev", "chroma", "sd3"])
def test_guidance_lowers_the_spatial_loss_on_most_prompts(host, mmdit_files, topology, caplog):
    """The thesis' loss-reduction measure on 12 prompt x seed pairs: the spatial loss of the
    window's last step is lower guided than unguided (strength 0: the same maps, observed)
    on at least 90 % of them."""
    lower, rows = 0, []
    for text in PROMPTS:
        for seed in SEEDS:
            graphs = []
            for strength in (1000.0, 0.0):
                g = guided(topology, "apply", "ksampler", settings={**GUIDED, "strength": strength}, steps=8, seed=seed)
                g["pos"]["inputs"]["text"] = g["parse"]["inputs"]["text"] = text
                graphs.append(_reports(host, g, caplog))
            on, off = graphs
            assert len(on) == len(off) == 4 and all(r.applied for r in on) and not any(r.applied for r in off)
            # the first step sees the same latent: its maps, read in the guided step's forward of the
            # cond rows alone and in the unguided forward of cond and uncond rows together, agree
            assert on[0].spatial == pytest.approx(off[0].spatial, rel=1e-4), (text, seed)
            lower += on[-1].spatial < off[-1].spatial
            rows.append((text, seed, off[-1].spatial, on[-1].spatial))
    print(f"{topology}: lower on {lower} of {len(rows)}")
    assert lower >= 0.9 * len(rows), rows


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_box_injection_acts_on_the_joint_attention_and_low_gives_fast(host, mmdit_files, topology):
    """Layout Boxes' injection alone (strength 0) changes the image, without it (injection 0)
    nothing changes; boxes with their loss and injection give the same latent in low as in fast."""
    plain = _latent(host, mmdit_graphs.txt2img(topology, steps=STEPS))
    zero = {**GUIDED, "strength": 0.0}
    g = guided(topology, "layout", "ksampler", settings=zero, steps=STEPS)
    injected = _latent(host, g)
    assert torch.isfinite(injected).all() and (injected - plain).abs().max() / plain.abs().max() > 1e-4
    g["layout"]["inputs"]["injection"] = 0.0
    assert _latent(host, g).equal(plain)
    fast = _latent(host, guided(topology, "layout", "ksampler", settings={**GUIDED, "memory": "fast"}, steps=STEPS))
    low = _latent(host, guided(topology, "layout", "ksampler", settings={**GUIDED, "memory": "low"}, steps=STEPS))
    assert torch.isfinite(fast).all() and not fast.equal(injected)
    assert ((low - fast).abs().max() / fast.abs().max()) <= 1e-5


@pytest.mark.parametrize("topology", ["flux_dev", "chroma", "sd3"])
def test_a_batch_of_two_is_guided_per_image_and_previewed(host, mmdit_files, topology, caplog):
    """Two images in one latent batch: both guided (a loss per image), `low` gives `fast`'s
    latents, and InfSplign Attention Preview draws the run's maps and losses."""
    def graph(memory):
        g = guided(topology, "apply", "ksampler", settings={**GUIDED, "memory": memory}, steps=STEPS)
        g["latent"]["inputs"]["batch_size"] = 2
        g["preview"] = {"class_type": "InfSplignAttentionPreview",
                        "inputs": {"latent": ["sample", 0], "model": ["apply", 0], "steps": "auto", "size": 64}}
        return g
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="infsplign"):
        run = host.execute(graph("fast"))
    assert run.success, run.error()
    (fast,) = host.saved_latents(run, "save_latent")
    reports = [r.infsplign for r in caplog.records if hasattr(r, "infsplign")]
    assert fast.shape[0] == 2 and torch.isfinite(fast).all() and not torch.equal(fast[0], fast[1])
    assert len(reports) == 2 and all(r.applied and r.grad_norm > 0 for r in reports)
    assert [im["type"] for im in run.outputs["preview"]["images"]] == ["temp", "temp"]
    (low,) = host.saved_latents(host.execute(graph("low")), "save_latent")
    assert ((low - fast).abs().max() / fast.abs().max()) <= 1e-5
