"""Tier 2: the thesis' Algorithm 1, written here in its own terms (VP latent z_t, eps-space,
two UNet passes), against the pack's ComfyUI path (sigma-space, one batched pass through
the real CFGGuider and the pack's PREDICT_NOISE hook) for the same model, latent, sigma
and loss.

Tolerance: max |D_comfy - D_ref| <= 2e-5 * max |D_ref| (measured 4e-6), and for the
guidance update alone (D_guided - D_unguided) 1e-4 relative (measured 2.2e-5 on SD1,
5e-6 on SD2-v): float32 on CPU, with different batching and summation order on the two
sides.
"""
import pytest
import torch

pytestmark = pytest.mark.host

COARSE, MID = (3, 4, 5), (6, 7, 8)  # ALGORITHM.md section 2, SD1.x / SD2.x
PROMPT = "a cat to the left of a dog"
SETTINGS = dict(strength=1000.0, loss="sigmoid", alpha=8.0, margin=0.0, orthogonal="l2",
                presence_weight=1.0, balance_weight=1.0, start_percent=0.0, end_percent=1.0)


def reference_algorithm_1(model, x, sigma, ctx_c, ctx_u, cfg, groups, pairs, loss_settings, w):
    """Thesis Eq. 6 in VP terms: eps_hat = eps_u + cfg (eps_c - eps_u) + w grad_{z_t} L.
    Returns the x0 prediction x - sigma eps_hat (what ComfyUI's sampler consumes)."""
    from infsplign.guidance.losses import step_loss
    unet = model.model.diffusion_model
    sampling = model.get_model_object("model_sampling")
    alpha_bar = 1.0 / (1.0 + sigma**2)
    t = sampling.timestep(torch.tensor([sigma]))
    v_pred = model.model.model_type.name == "V_PREDICTION"
    maps = {}

    def capture(q, k, v, extra):
        heads = extra["n_heads"]
        b, n, inner = q.shape
        d = inner // heads
        qh = q.view(b, n, heads, d).transpose(1, 2)
        kh = k.view(b, -1, heads, d).transpose(1, 2)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1).mean(1)
        h, wd = extra["activations_shape"][-2:]
        maps[extra["block"][1]] = torch.stack([probs[..., list(g)].mean(-1) for g in groups], 1).view(b, -1, h, wd)
        return torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1).matmul(
            v.view(b, -1, heads, d).transpose(1, 2)).transpose(1, 2).reshape(b, n, inner)

    def eps(z, ctx, record):
        opts = {"patches_replace": {"attn2": {("output", i): capture for i in COARSE + MID}}} if record else {}
        out = unet(z, timesteps=t, context=ctx, transformer_options=opts)
        return (alpha_bar**0.5) * out + ((1 - alpha_bar) ** 0.5) * z if v_pred else out

    with torch.enable_grad():
        z = (x * alpha_bar**0.5).detach().requires_grad_(True)
        eps_c = eps(z, ctx_c, record=True)
        layers = [("coarse" if i in COARSE else "mid", maps[i]) for i in COARSE + MID]
        loss = step_loss(layers, pairs, loss_settings)
        (grad_z,) = torch.autograd.grad(loss, z)
    with torch.no_grad():
        eps_u = eps(z.detach(), ctx_u, record=False)
        eps_hat = eps_u + cfg * (eps_c.detach() - eps_u) + w * grad_z
    return x - sigma * eps_hat, x - sigma * (eps_u + cfg * (eps_c.detach() - eps_u))


def comfy_path(model, relations, positive, negative, cfg, sigma, seed, strength):
    """One denoised prediction through the real CFGGuider with the pack's hooks."""
    import comfy.samplers
    import nodes
    patched = nodes.NODE_CLASS_MAPPINGS["InfSplignApply"]().apply(model, relations, **{**SETTINGS, "strength": strength})[0]
    seen = {}

    def one_call(m, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["x"] = x.clone()
        seen["denoised"] = m(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)
        return seen["denoised"]

    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed))
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(one_call),
                  torch.tensor([sigma, 0.0]), seed=seed)
    return seen["x"], seen["denoised"]


@pytest.mark.parametrize("topology", ["sd1", "sd2v"])
def test_comfy_path_gives_the_thesis_update(host, topology):
    import nodes
    from infsplign.guidance.capture import object_slots
    from infsplign.guidance.losses import LossSettings
    from testkit import models
    model, clip, _ = models.load(topology)
    relations = nodes.NODE_CLASS_MAPPINGS["InfSplignRelationParse"]().parse(clip, PROMPT)["result"][0]
    ctx_c, pooled_c = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
    ctx_u, pooled_u = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    positive, negative = [[ctx_c, {"pooled_output": pooled_c}]], [[ctx_u, {"pooled_output": pooled_u}]]
    sigma, cfg = 4.5, 5.0

    x, d_guided = comfy_path(model, relations, positive, negative, cfg, sigma, seed=3, strength=1000.0)
    _, d_plain = comfy_path(model, relations, positive, negative, cfg, sigma, seed=3, strength=0.0)
    groups, pairs = object_slots(relations)
    loss = LossSettings(activation="sigmoid", alpha=8.0, margin=0.0, orthogonal="l2")
    d_ref, d_ref_plain = reference_algorithm_1(model, x, sigma, ctx_c, ctx_u, cfg, groups, pairs, loss, 1000.0)

    assert (d_plain - d_ref_plain).abs().max() <= 2e-5 * d_ref_plain.abs().max()
    assert (d_guided - d_ref).abs().max() <= 2e-5 * d_ref.abs().max()
    update, ref_update = d_guided - d_plain, d_ref - d_ref_plain
    assert ref_update.abs().max() > 1e-3 * d_ref.abs().max()  # the guidance is not negligible here
    assert (update - ref_update).abs().max() <= 1e-4 * ref_update.abs().max()
