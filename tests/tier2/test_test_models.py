"""Tier 2: the test-model factory against the real `comfy` package."""
import pytest
import torch

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def built(host):
    from testkit import models
    return {t: models.load(t, seed=0) for t in models.TOPOLOGIES}


def _attention_maps(model, cond, block, x, sigma, **kw):
    """Cond-row cross-attention probabilities of one output block, (heads*B, h*w, tokens)."""
    import comfy.ldm.modules.attention as attention
    maps = []

    def capture(q, k, v, extra):
        heads = extra["n_heads"]
        b, n, d = q.shape
        qh = q.view(b, n, heads, d // heads).transpose(1, 2).float()
        kh = k.view(b, -1, heads, d // heads).transpose(1, 2).float()
        maps.append(torch.softmax(qh @ kh.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1))
        return attention.optimized_attention(q, k, v, heads)

    patched = model.clone()
    patched.set_model_attn2_replace(capture, "output", block)
    out = patched.model.apply_model(x, sigma, c_crossattn=cond,
                                    transformer_options=patched.model_options["transformer_options"], **kw)
    return maps, out


@pytest.mark.parametrize("topology, model_class, v_pred, encoders, context", [
    ("sd1", "BaseModel", False, {"l"}, 64),
    ("sd2v", "BaseModel", True, {"h"}, 1024),
    ("sdxl", "SDXL", False, {"g", "l"}, 128),
])
def test_topology(built, topology, model_class, v_pred, encoders, context):
    import comfy.model_base
    model, clip, vae = built[topology]
    assert type(model.model).__name__ == model_class
    assert (model.model.model_type == comfy.model_base.ModelType.V_PREDICTION) == v_pred
    tokens = clip.tokenize("a cat to the left of a dog")
    assert set(tokens) == encoders
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, context)
    unet = model.model.diffusion_model
    assert len(unet.output_blocks) == (9 if topology == "sdxl" else 12)
    img = vae.decode(torch.zeros(1, 4, 8, 8))
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()


def test_sd2_uses_linear_projections_and_fp32_attention(built):
    model = built["sd2v"][0]
    block = model.model.diffusion_model.output_blocks[3][1]
    assert isinstance(block.proj_in, torch.nn.Linear)
    assert model.model.model_config.unet_config["attn_precision"] == torch.float32


def test_sdxl_keeps_depth_ten_on_the_coarse_decoder_level_and_adm(built):
    model, clip, _ = built["sdxl"]
    blocks = model.model.diffusion_model.output_blocks
    assert [len(blocks[i][1].transformer_blocks) for i in (0, 1, 2)] == [10, 10, 10]
    assert [len(blocks[i][1].transformer_blocks) for i in (3, 4, 5)] == [2, 2, 2]
    _, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    adm = model.model.encode_adm(pooled_output=pooled, width=256, height=256)
    assert adm.shape == (1, model.model.model_config.unet_config["adm_in_channels"])


@pytest.mark.parametrize("topology, block", [("sd1", 3), ("sd1", 8), ("sd2v", 5), ("sdxl", 1)])
def test_models_are_alive(built, topology, block):
    """Attention maps vary over space and between tokens; cond and uncond outputs differ."""
    model, clip, _ = built[topology]
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat to the left of a dog"), return_pooled=True)
    empty, pooled_e = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1)) * 5
    sigma = torch.tensor([5.0])
    kw = {}
    if topology == "sdxl":
        kw = {"y": model.model.encode_adm(pooled_output=pooled, width=256, height=256)}
    maps, out = _attention_maps(model, cond, block, x, sigma, **kw)
    assert maps, "the attn2 replace patch was not called"
    probs = maps[0].mean(0)  # (h*w, tokens)
    cat, dog = probs[:, 2], probs[:, 7]
    assert (cat.std() / cat.mean()) > 0.05  # varies over space
    assert (cat - dog).abs().max() > 0.05 * cat.mean()  # differs between tokens
    if topology == "sdxl":
        kw = {"y": model.model.encode_adm(pooled_output=pooled_e, width=256, height=256)}
    out_uncond = model.model.apply_model(x, sigma, c_crossattn=empty, **kw)
    assert (out - out_uncond).abs().mean() > 1e-3 * out.abs().mean()


def test_factory_is_deterministic(host):
    from testkit import models
    a = models.checkpoint_state_dict("sd1", seed=3)
    b = models.checkpoint_state_dict("sd1", seed=3)
    c = models.checkpoint_state_dict("sd1", seed=4)
    key = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])


@pytest.mark.parametrize("topology", ["sd1", "sd2v", "sdxl"])
def test_checkpoint_file_loads_through_comfyui_loader(host, checkpoints, built, topology):
    """The .safetensors path: ComfyUI's detection and loader give back the same model."""
    import comfy.sd
    path = checkpoints / f"infsplign_test_{topology}.safetensors"
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    ref_model, ref_clip, _ = built[topology]
    assert type(model.model.model_config).__name__ == type(ref_model.model.model_config).__name__
    assert model.model.model_type == ref_model.model.model_type
    a = model.model.diffusion_model.state_dict()
    b = ref_model.model.diffusion_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = clip.tokenize("a red cube")
    assert torch.equal(clip.encode_from_tokens(tokens), ref_clip.encode_from_tokens(tokens))
