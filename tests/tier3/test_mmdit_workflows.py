"""Tier 3: the narrow MMDiT test models through ComfyUI's real executor (inference mode on, the
real loader nodes, both sampler paths)."""
import pytest
import torch

import mmdit_graphs

pytestmark = pytest.mark.host
TOPOLOGIES = ["sd3", "flux_dev", "flux_schnell", "chroma"]


def _latent(host, graph):
    run = host.execute(graph)
    assert run.success, run.error()
    (latent,) = host.saved_latents(run, "save_latent")
    (image,) = run.outputs["preview"]["images"]
    assert image["filename"].endswith(".png")
    return latent


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_samples_on_both_paths(host, mmdit_files, topology):
    """KSampler and SamplerCustomAdvanced (CFGGuider with real cfg for SD3.5 and Chroma;
    FluxGuidance + cfg 1 / BasicGuider for Flux-dev): finite latents of 16 channels that depend
    on the prompt, the same on both paths (same noise, sampler and schedule)."""
    k = _latent(host, mmdit_graphs.txt2img(topology))
    c = _latent(host, mmdit_graphs.txt2img(topology, path="custom"))
    other = _latent(host, mmdit_graphs.txt2img(topology, text="a red cube above a green sphere"))
    assert k.shape == (1, 16, 8, 8)
    for latent in (k, c, other):
        assert torch.isfinite(latent).all() and latent.abs().max() > 0
    assert torch.allclose(k, c, atol=1e-5), (k - c).abs().max()
    assert (k - other).abs().mean() > 1e-3 * k.abs().mean()


@pytest.mark.parametrize("topology", ["sd3", "chroma"])
def test_real_cfg_reads_the_negative(host, mmdit_files, topology):
    guided = _latent(host, mmdit_graphs.txt2img(topology))
    plain = _latent(host, mmdit_graphs.txt2img(topology, cfg=1.0))
    assert (guided - plain).abs().mean() > 1e-3 * guided.abs().mean()


def test_flux_dev_guidance_embedding(host, mmdit_files):
    """FluxGuidance's value reaches the model through the guidance embedding at cfg 1."""
    g = mmdit_graphs.txt2img("flux_dev")
    a = _latent(host, g)
    g["flux_guidance"]["inputs"]["guidance"] = 1.0
    b = _latent(host, g)
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


def test_unet_loader_gives_the_same_model(host, mmdit_files):
    """The diffusion model alone through UNETLoader samples as the checkpoint's does."""
    a = _latent(host, mmdit_graphs.txt2img("flux_dev"))
    b = _latent(host, mmdit_graphs.txt2img("flux_dev", unet_loader=True))
    assert torch.equal(a, b)
