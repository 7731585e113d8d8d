"""Tier 2: the narrow MMDiT test models (SD3.5, Flux.1 dev / schnell, Chroma) against the real
`comfy` package: topology, text contexts, live joint attention, the loaders."""
import pytest
import torch

pytestmark = pytest.mark.host

TEXT = "a photo of a cat to the left of a dog"


@pytest.fixture(scope="module")
def built(host):
    from testkit import mmdit_models
    return {t: mmdit_models.load(t, seed=0) for t in mmdit_models.TOPOLOGIES}


def _conds(topology, clip, text):
    """(context, extra model inputs) for one prompt, as the conditioning nodes give them."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    extra = {}
    if topology in ("sd3", "flux_dev", "flux_schnell"):
        extra["y"] = pooled
    if topology == "flux_dev":
        extra["guidance"] = torch.tensor([3.5])  # FluxGuidance's default
    if topology == "chroma":
        extra["guidance"] = torch.tensor([0.0])  # model_base.Chroma's default
    return cond, extra


def joint_attention(model, cond, x, sigma, **extra):
    """Run the diffusion model once; for each joint attention call (text and image tokens),
    the head-averaged probabilities of the image-query rows over the text keys, (N, T), read
    through ComfyUI's optimized_attention_override (the real output is computed by `func`)."""
    text_len = cond.shape[1]
    calls = []

    def override(func, *args, **kwargs):
        q, k = args[0], args[1]
        heads = kwargs["heads"] if "heads" in kwargs else args[3]
        if kwargs.get("skip_reshape"):  # Flux: (B, H, L, D), RoPE applied
            qh, kh = q, k
        else:  # SD3: (B, L, H * D)
            b, length, width = q.shape
            qh = q.view(b, length, heads, width // heads).transpose(1, 2)
            kh = k.view(b, -1, heads, width // heads).transpose(1, 2)
        if kh.shape[2] > text_len:  # a joint call (SD3.5's image-only attention has no text keys)
            logits = (qh.float() @ kh.float().transpose(-1, -2)) / qh.shape[-1] ** 0.5
            probs = logits.softmax(-1)[0, :, text_len:, :text_len].mean(0)
            opts = kwargs.get("transformer_options", {})
            calls.append(((opts.get("block_type"), opts.get("block_index")), probs, kh.shape[2]))
        return func(*args, **kwargs)

    with torch.no_grad():
        out = model.model.apply_model(x, sigma, c_crossattn=cond,
                                      transformer_options={"optimized_attention_override": override}, **extra)
    return calls, out


@pytest.mark.parametrize("topology, model_class, model_type, encoder_class, context", [
    ("sd3", "SD3", "FLOW", "NarrowSD3Clip_111", (154, 4096)),  # CLIP 77 rows + T5 77 rows
    ("flux_dev", "Flux", "FLUX", "NarrowFluxClip", (256, 64)),  # T5 padded to 256
    ("flux_schnell", "Flux", "FLOW", "NarrowFluxClip", (256, 64)),
    ("chroma", "Chroma", "FLUX", "NarrowChromaT5", (15, 64)),  # T5, not padded: 14 pieces + end
])
def test_topology(built, topology, model_class, model_type, encoder_class, context):
    from testkit import mmdit_models
    model, clip, vae = built[topology]
    assert type(model.model).__name__ == model_class
    assert model.model.model_type.name == model_type
    assert isinstance(model.model.model_config, mmdit_models.TOPOLOGIES[topology].config)
    assert type(clip.cond_stage_model).__name__ == encoder_class
    cond, extra = _conds(topology, clip, TEXT)
    assert tuple(cond.shape[1:]) == context
    dm = model.model.diffusion_model
    if topology == "sd3":
        assert len(dm.joint_blocks) == mmdit_models.SD3_BLOCKS and dm.num_heads == 2
        assert dm.joint_blocks[0].x_block.x_block_self_attn and not dm.joint_blocks[1].x_block.x_block_self_attn
        assert dm.joint_blocks[-1].context_block.pre_only
        assert extra["y"].shape == (1, 2 * mmdit_models.CLIP_WIDTH)
    else:
        assert (len(dm.double_blocks), len(dm.single_blocks)) == (mmdit_models.FLUX_DOUBLE, mmdit_models.FLUX_SINGLE)
        assert dm.num_heads == 2 and dm.patch_size == 2
        assert dm.pe_embedder.axes_dim == mmdit_models.FLUX_AXES
        assert (getattr(dm.params, "guidance_embed", False)) == (topology == "flux_dev")
    assert model.model.latent_format.latent_channels == 16
    img = vae.decode(torch.zeros(1, 16, 8, 8))
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()


def _token(clip, text, word):
    """Position of `word`'s first T5 piece in the context (T5 token i sits at i, after the
    CLIP rows in SD3's context)."""
    t5 = getattr(clip.tokenizer, "t5xxl", None) or clip.tokenizer.clip_t5xxl  # (Chroma's: PixArt's tokenizer)
    pieces = [t5.inv_vocab[t] for t, _ in clip.tokenize(text)["t5xxl"][0]]
    offset = 77 if "g" in clip.tokenize(text) else 0
    return offset + pieces.index("\u2581" + word)


@pytest.mark.parametrize("topology", ["sd3", "flux_dev", "flux_schnell", "chroma"])
def test_joint_attention_is_alive(built, topology):
    """Image-query attention over the text keys varies over the image and between tokens, in
    every joint block (double and single); outputs depend on the prompt."""
    model, clip, _ = built[topology]
    cond, extra = _conds(topology, clip, TEXT)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8])
    calls, out = joint_attention(model, cond, x, sigma, **extra)
    dm = model.model.diffusion_model
    expected = len(dm.joint_blocks) if topology == "sd3" else len(dm.double_blocks) + len(dm.single_blocks)
    assert len(calls) == expected
    assert all(length == cond.shape[1] + 64 for _, _, length in calls)  # [text | 8 x 8 image tokens]
    words = [_token(clip, TEXT, w) for w in ("photo", "cat", "left", "dog")]
    cat, dog = words[1], words[3]
    for block, probs, _ in calls:
        a, b = probs[:, cat], probs[:, dog]
        # (seen: cat's map varies by 0.4-0.9 of its mean over the image, cat and dog differ
        # somewhere by 0.8-3.7 times it; a dead model gives ~1e-6)
        assert (a.std() / a.mean()) > 0.2, f"{block}: the cat token's map is flat"
        assert (a - b).abs().max() > 0.3 * a.mean(), f"{block}: cat and dog maps agree"
        content = probs[:, words]
        assert (content.std(dim=1) / content.mean(dim=1)).median() > 0.1, f"{block}: image rows are uniform over the words"
    other, extra_o = _conds(topology, clip, "a red cube above a green sphere")
    out_other = model.model.apply_model(x, sigma, c_crossattn=other, **extra_o)
    assert torch.isfinite(out).all()
    assert (out - out_other).abs().mean() > 1e-3 * out.abs().mean()
    if topology == "flux_dev":  # the guidance embedding is wired
        out_g = model.model.apply_model(x, sigma, c_crossattn=cond, **{**extra, "guidance": torch.tensor([1.0])})
        assert (out - out_g).abs().mean() > 1e-3 * out.abs().mean()


def test_sd3_keeps_an_image_only_attention_call(built):
    """SD3.5-M's second attention in block 0: image tokens only (a capture filters it by length)."""
    model, clip, _ = built["sd3"]
    cond, extra = _conds("sd3", clip, TEXT)
    lengths = []

    def override(func, *args, **kwargs):
        lengths.append(args[1].shape[1])
        return func(*args, **kwargs)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    model.model.apply_model(x, torch.tensor([0.5]), c_crossattn=cond,
                            transformer_options={"optimized_attention_override": override}, **extra)
    assert sorted(lengths) == [64] + [cond.shape[1] + 64] * len(model.model.diffusion_model.joint_blocks)


def test_factory_is_deterministic(host):
    from testkit import mmdit_models
    a = mmdit_models.diffusion_model_state_dict("flux_dev", seed=3)
    b = mmdit_models.diffusion_model_state_dict("flux_dev", seed=3)
    c = mmdit_models.diffusion_model_state_dict("flux_dev", seed=4)
    key = "double_blocks.0.img_attn.qkv.weight"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])


@pytest.mark.parametrize("topology", ["sd3", "flux_dev", "flux_schnell", "chroma"])
def test_files_load_through_comfyui_loaders(host, mmdit_files, built, topology):
    """The checkpoint file through CheckpointLoaderSimple's function, the diffusion model
    alone through UNETLoader's: ComfyUI's detection gives back the same model."""
    import comfy.sd
    ref_model, ref_clip, _ = built[topology]
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(mmdit_files["checkpoints"] / f"infsplign_test_{topology}.safetensors"))
    alone = comfy.sd.load_diffusion_model(str(mmdit_files["diffusion_models"] / f"infsplign_test_{topology}_dm.safetensors"))
    ref = ref_model.model.diffusion_model.state_dict()
    for loaded in (model, alone):
        assert type(loaded.model.model_config) is type(ref_model.model.model_config)
        assert loaded.model.model_type == ref_model.model.model_type
        sd = loaded.model.diffusion_model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    tokens = clip.tokenize("a red cube")
    assert torch.equal(clip.encode_from_tokens(tokens), ref_clip.encode_from_tokens(tokens))


@pytest.mark.parametrize("parts, rows", [
    (("clip_l", "clip_g"), 77), (("clip_g", "t5xxl"), 154), (("t5xxl",), 77), (("clip_l", "t5xxl"), 154),
])
def test_sd3_checkpoint_with_some_text_encoders(host, parts, rows):
    """An SD3 checkpoint holds any of CLIP-L, CLIP-G and T5: ComfyUI builds the parts it finds."""
    from testkit import mmdit_models
    _, clip, _ = mmdit_models.load("sd3", text_encoders=parts)
    te = clip.cond_stage_model
    assert [getattr(te, p) is not None for p in ("clip_l", "clip_g", "t5xxl")] == [p in parts for p in ("clip_l", "clip_g", "t5xxl")]
    assert clip.encode_from_tokens(clip.tokenize(TEXT)).shape[1:] == (rows, 4096)
