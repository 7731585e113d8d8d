"""Tier 2: the memory count of an MMDiT guided step (engine/families/mmdit/memory.py) on the narrow Flux.1-dev
and SD3.5 test models: it runs, `low` keeps and adds less than `fast`, the meta count equals the
count on real CPU tensors, and the counted step's gradient is the same in both modes; the
full-size configs are ComfyUI's own detection of the real checkpoints' keys."""
import pytest
import torch

pytestmark = pytest.mark.host

# (topology, real CFG, text rows): Flux-dev at cfg 1 with T5's 256 rows; SD3 with CLIP 77 + T5 77
CASES = [("flux_dev", False, 256), ("sd3", True, 154)]
HW = (32, 32)


@pytest.fixture(scope="module")
def narrow(host):
    from testkit import mmdit_models
    out = {}
    for topology, _, _ in CASES:
        model = mmdit_models.build(topology, seed=0)[1].diffusion_model
        model.requires_grad_(False)
        out[topology] = model
    return out


@pytest.mark.parametrize("topology, real_cfg, tokens", CASES)
def test_low_counts_less_than_fast_and_meta_equals_real(narrow, topology, real_cfg, tokens):
    from infsplign.engine.families.mmdit import memory as mmdit_memory
    from testkit import mmdit_models
    meta = mmdit_memory.meta_twin(mmdit_models.model_config(topology), torch.float32)
    real = mmdit_memory.Twin(narrow[topology], torch.float32, "cpu")
    counts, grads = {}, {}
    for mode in ("fast", "low"):
        grads[mode] = []
        counts[mode] = mmdit_memory.count_step(meta, mode, None, 1, HW, tokens, real_cfg)
        on_cpu = mmdit_memory.count_step(real, mode, None, 1, HW, tokens, real_cfg, gradient=grads[mode])
        for quantity in ("plain_peak", "kept", "guided_peak"):
            a, b = getattr(on_cpu, quantity), getattr(counts[mode], quantity)
            assert b > 0 and abs(a / b - 1) <= 0.05, (mode, quantity, a, b)
    fast, low = counts["fast"], counts["low"]
    print(topology, {m: (c.plain_peak, c.kept, c.extra) for m, c in counts.items()})
    assert fast.plain_peak == low.plain_peak
    assert 0 < low.kept < fast.kept / 4
    assert low.guided_peak < fast.guided_peak and low.extra < fast.extra
    assert fast.extra > 0  # (low's may be 0 at this size: narrow SD3's plain step of two rows is larger)
    # the counted step is a real guided step: a live gradient, the same in both modes
    (g_fast,), (g_low,) = grads["fast"], grads["low"]
    assert torch.isfinite(g_fast).all() and g_fast.abs().max() > 0
    assert torch.allclose(g_fast, g_low, rtol=1e-4, atol=1e-6 * g_fast.abs().max())


def test_graph_stops_after_the_last_captured_block(narrow):
    """Capturing only the double blocks: the single blocks run without autograd, so the step
    keeps less, and the gradient still reaches the latent."""
    from infsplign.engine.families.mmdit import memory as mmdit_memory
    from infsplign.engine.families.mmdit.capture import flux_blocks
    real = mmdit_memory.Twin(narrow["flux_dev"], torch.float32, "cpu")
    doubles = [b for b in flux_blocks(real.model) if b[0] == "double"]
    grads = []
    every = mmdit_memory.count_step(real, "fast", None, 1, HW, 256, False)
    early = mmdit_memory.count_step(real, "fast", doubles, 1, HW, 256, False, gradient=grads)
    assert early.kept < every.kept
    assert grads[0].abs().max() > 0
    assert "patches_replace" not in real.model.__dict__  # nothing left on the model


@pytest.mark.parametrize("name, kind, blocks, width", [
    ("Flux.1-dev", "Flux", (19, 38), 3072), ("SD3.5-M", "SD3", (24,), 1536), ("SD3.5-L", "SD3", (38,), 2432)])
def test_full_size_configs_are_comfyuis_detection(host, name, kind, blocks, width):
    from infsplign.engine.families.mmdit import memory as mmdit_memory
    from infsplign.engine.families.mmdit.recompute import ordered_blocks
    cfg = mmdit_memory.full_size_config(name)
    assert type(cfg).__name__ == kind
    twin = mmdit_memory.meta_twin(cfg, torch.bfloat16)
    assert next(twin.model.parameters()).device.type == "meta"
    found = ordered_blocks(twin.model)
    if kind == "Flux":
        assert (len(twin.model.double_blocks), len(twin.model.single_blocks)) == blocks
        assert twin.model.params.guidance_embed and twin.model.hidden_size == width
    else:
        assert (len(found),) == blocks and twin.model.x_embedder.proj.out_channels == width
    if name == "SD3.5-M":
        assert cfg.unet_config["x_block_self_attn_layers"] == list(range(13))


@pytest.mark.parametrize("mode", ["fast", "low"])
def test_the_run_plan_counts_an_mmdit_step_as_the_table_does(host, mode):
    """The count a guided run plans with (engine/memory_estimate.estimate, through the family)
    is the one bench/memory.py --mmdit prints, for the blocks the run captures; a batch of two
    is twice one image's."""
    from infsplign.engine import memory_estimate
    from infsplign.engine.families.mmdit import memory as mmdit_memory
    from infsplign.engine.families.mmdit.family import MMDIT
    from testkit import mmdit_models
    model = mmdit_models.load("flux_dev")[0]
    layers = MMDIT.default_layers(model)
    planned = memory_estimate.estimate(model, 1, HW, mode, "efficient", layers, memory_estimate.PROBE_RELATIONS, 256)
    twin = mmdit_memory.meta_twin(mmdit_models.model_config("flux_dev"), torch.float32)
    counted = mmdit_memory.count_step(twin, mode, [(layer.kind, layer.block) for layer in layers], 1, HW, 256, True)
    assert planned.plain_peak == counted.plain_peak and planned.guided_peak == counted.guided_peak
    assert abs(planned.kept - counted.kept) <= 1024 and planned.kept > 0  # (a cached index: bytes)
    two = memory_estimate.estimate(model, 2, HW, mode, "efficient", layers, memory_estimate.PROBE_RELATIONS, 256)
    assert two.kept == 2 * planned.kept and two.extra == 2 * planned.extra
