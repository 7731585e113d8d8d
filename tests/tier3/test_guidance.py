"""Tier 3: InfSplign guidance through the real executor, SD1.x / SD2.x-v / SDXL test models,
with KSampler + InfSplign (KSampler) and SamplerCustomAdvanced + InfSplign Guider."""
import logging

import pytest
import torch

from graphs import DEFAULTS, custom_guided, ksampler_guided, txt2img

pytestmark = pytest.mark.host
TOPOLOGIES = ["sd1", "sd2v", "sdxl"]
STEPS = 8
END = 0.5  # four guided steps of eight, so the loss has a trajectory to compare


class Runs:
    """Executes graphs once per setting and keeps (run, step reports, latent)."""

    def __init__(self, host, caplog):
        self.host, self.caplog, self.cache = host, caplog, {}

    def get(self, topology, path, strength, end=END):
        key = (topology, path, strength, end)
        if key not in self.cache:
            build = ksampler_guided if path == "ksampler" else custom_guided
            graph = build(f"infsplign_test_{topology}.safetensors", steps=STEPS, strength=strength, end_percent=end)
            self.caplog.clear()
            with self.caplog.at_level(logging.INFO, logger="infsplign"):
                run = self.host.execute(graph)
            assert run.success, run.error()
            reports = [r.infsplign for r in self.caplog.records if hasattr(r, "infsplign")]
            self.cache[key] = (run, reports, self.host.saved_latents(run, "save_latent")[0])
        return self.cache[key]


@pytest.fixture(scope="module")
def runs(host, checkpoints):
    return Runs(host, None)


@pytest.fixture
def r(runs, caplog):
    runs.caplog = caplog
    return runs


def expected_sigmas(topology, steps, end):
    import comfy.samplers
    from testkit import models
    model = models.load(topology)[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    return [float(s) for s in sigmas[: int(steps * end)]]


@pytest.mark.parametrize("path", ["ksampler", "custom"])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_guidance_runs_in_the_window_and_lowers_the_spatial_loss(r, topology, path):
    run, guided, latent = r.get(topology, path, 1000.0)
    _, observed, plain_latent = r.get(topology, path, 0.0)
    want = expected_sigmas(topology, STEPS, END)
    assert [g.sigma for g in guided] == pytest.approx(want, rel=1e-5)  # exactly the window's steps
    assert all(g.applied and g.grad_norm > 0 for g in guided)
    assert [o.sigma for o in observed] == pytest.approx(want, rel=1e-5)
    assert not any(o.applied for o in observed)
    assert torch.isfinite(latent).all() and not torch.equal(latent, plain_latent)
    # same seed: the first step sees the same latent; after it, guidance has lowered the loss
    assert guided[0].spatial == pytest.approx(observed[0].spatial, rel=1e-4)
    for g, o in zip(guided[1:], observed[1:]):
        assert g.spatial < o.spatial, (topology, path, [x.spatial for x in guided], [x.spatial for x in observed])


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_default_window_is_the_first_quarter(r, topology):
    _, guided, _ = r.get(topology, "ksampler", 1000.0, end=0.25)
    assert [g.sigma for g in guided] == pytest.approx(expected_sigmas(topology, STEPS, 0.25), rel=1e-5)
    assert len(guided) == STEPS // 4


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_ksampler_and_custom_sampler_give_the_same_latents(r, topology):
    _, a, latent_k = r.get(topology, "ksampler", 1000.0)
    _, b, latent_c = r.get(topology, "custom", 1000.0)
    assert torch.equal(latent_k, latent_c)
    assert [x.loss for x in a] == [x.loss for x in b]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_strength_zero_is_plain_sampling(host, r, topology):
    _, _, observed = r.get(topology, "ksampler", 0.0)
    plain = host.execute(ksampler_guided(f"infsplign_test_{topology}.safetensors", steps=STEPS, guided=False))
    assert torch.equal(observed, host.saved_latents(plain, "save_latent")[0])


def test_source_model_is_unchanged_after_guided_sampling(host, checkpoints):
    """A server keeps the loaded MODEL between prompts: a plain sampler using it after a
    guided run gives what a never-patched model gives."""
    ckpt = "infsplign_test_sd1.safetensors"
    session = host.Session()
    assert session.execute(ksampler_guided(ckpt, steps=STEPS)).success
    after = session.execute(ksampler_guided(ckpt, steps=STEPS, guided=False))
    fresh = host.execute(ksampler_guided(ckpt, steps=STEPS, guided=False))
    assert torch.equal(host.saved_latents(after, "save_latent")[0], host.saved_latents(fresh, "save_latent")[0])


def test_capture_node_sets_the_layers(host, checkpoints, caplog):
    """Attention Capture Patch before InfSplign (KSampler): its layer choice is used."""
    g = ksampler_guided("infsplign_test_sd1.safetensors", steps=STEPS, end_percent=END)
    g["capture"] = {"class_type": "InfSplignAttentionCapture", "inputs": {
        "model": ["ckpt", 0], "relations": ["parse", 0], "layers": "custom", "custom_layers": "8"}}
    g["apply"]["inputs"]["model"] = ["capture", 0]
    with caplog.at_level(logging.INFO, logger="infsplign"):
        run = host.execute(g)
    assert run.success, run.error()
    reports = [rec.infsplign for rec in caplog.records if hasattr(rec, "infsplign")]
    assert len(reports) == 4 and all(x.applied for x in reports)


def test_unsupported_custom_layer_is_a_clear_error(host, checkpoints):
    g = ksampler_guided("infsplign_test_sd1.safetensors", steps=2)
    g["capture"] = {"class_type": "InfSplignAttentionCapture", "inputs": {
        "model": ["ckpt", 0], "relations": ["parse", 0], "layers": "custom", "custom_layers": "1"}}
    g["apply"]["inputs"]["model"] = ["capture", 0]
    run = host.execute(g)
    assert not run.success
    assert 'Custom layer "1" has no cross-attention' in run.error() and "3, 4, 5, 6, 7, 8, 9, 10, 11" in run.error()


def test_relations_from_another_text_are_refused(host, checkpoints):
    g = txt2img("infsplign_test_sd1.safetensors", steps=2)
    g["parse2"] = {"class_type": "InfSplignRelationParse", "inputs": {
        "clip": ["ckpt", 1], "text": ", ".join(["highly detailed"] * 30) + ", a cat left of a dog"}}
    g["apply"] = {"class_type": "InfSplignApply", "inputs": {"model": ["ckpt", 0], "relations": ["parse2", 0],
                                                             **DEFAULTS}}
    g["sample"]["inputs"]["model"] = ["apply", 0]
    run = host.execute(g)
    assert not run.success
    assert "beyond the conditioning's 77 tokens" in run.error()


@pytest.mark.parametrize("order", ["before", "after"])
def test_another_packs_attention_patch_keeps_working(host, checkpoints, caplog, order):
    """An attn2 replace patch on the captured layers, applied before or after InfSplign:
    both run; the other patch's effect is kept (its scale changes the result)."""
    import nodes
    calls = nodes.NODE_CLASS_MAPPINGS["InfSplignTestAttentionPatch"].calls
    latents = {}
    for scale in (1.0, 0.5):
        tag = f"{order}-{scale}"
        g = ksampler_guided("infsplign_test_sd1.safetensors", steps=STEPS)
        g["other"] = {"class_type": "InfSplignTestAttentionPatch", "inputs": {
            "model": ["ckpt", 0], "blocks": "3,4,5,6,7,8", "tag": tag, "scale": scale}}
        if order == "before":
            g["apply"]["inputs"]["model"] = ["other", 0]
        else:
            g["other"]["inputs"]["model"] = ["apply", 0]
            g["sample"]["inputs"]["model"] = ["other", 0]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="infsplign"):
            run = host.execute(g)
        assert run.success, run.error()
        reports = [rec.infsplign for rec in caplog.records if hasattr(rec, "infsplign")]
        assert len(reports) == 2 and all(x.applied for x in reports)
        # 6 layers x 8 steps; on the 2 guided steps cond and uncond rows run as two calls
        assert calls[tag] == 6 * (STEPS + 2)
        latents[scale] = host.saved_latents(run, "save_latent")[0]
    assert not torch.equal(latents[1.0], latents[0.5])
