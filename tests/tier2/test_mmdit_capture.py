"""Tier 2: the joint-attention capture (engine/families/mmdit/capture.py) on the narrow Flux.1-dev and
SD3.5 models: the model's output is unchanged, the override chains with the one before it,
the maps equal the full softmax read beside the real call, SD3's blocks are told apart,
ComfyUI's attention containers (0.33 and later) are handled, and the gradient of a map loss
through the model matches finite differences."""
import contextlib

import pytest
import torch

pytestmark = pytest.mark.host

TEXT = "a photo of a cat to the left of a dog"
HW = (8, 8)  # a 16 x 16 latent in 2 x 2 patches


@pytest.fixture(scope="module")
def built(host):
    from testkit import mmdit_models
    return {t: mmdit_models.load(t, seed=0) for t in ("flux_dev", "sd3")}


def _conds(topology, clip, text=TEXT):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    extra = {"y": pooled}
    if topology == "flux_dev":
        extra["guidance"] = torch.tensor([3.5])
    return cond, extra


def _run(model, cond, extra, options):
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # as ComfyUI's executor runs a prompt
        return model.model.apply_model(x, torch.tensor([0.8, 0.6]), c_crossattn=cond.repeat(2, 1, 1),
                                       transformer_options=options, **{k: v.repeat(2, *[1] * (v.ndim - 1))
                                                                       for k, v in extra.items()})


def _word(clip, text, word):
    """Position of `word`'s first T5 piece in the context (after SD3's 77 CLIP rows)."""
    tokens = clip.tokenize(text)
    t5 = getattr(clip.tokenizer, "t5xxl", None) or clip.tokenizer.clip_t5xxl
    pieces = [t5.inv_vocab[t] for t, _ in tokens["t5xxl"][0]]
    return (77 if "g" in tokens else 0) + pieces.index("\u2581" + word)


class Reference:
    """A second override, chained below the capture: the full softmax of every joint call
    (image rows over all keys) beside the real call, as a test writes it out."""

    def __init__(self, text_len):
        self.text_len, self.probs, self.calls = text_len, [], 0

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        q, k = args[0], args[1]
        heads = kwargs["heads"] if "heads" in kwargs else args[3]
        if not kwargs.get("skip_reshape"):
            b, length, width = q.shape
            q = q.view(b, length, heads, width // heads).transpose(1, 2)
            k = k.view(b, -1, heads, width // heads).transpose(1, 2)
        if k.shape[2] > self.text_len:
            p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            opts = kwargs["transformer_options"]
            self.probs.append(((opts.get("block_type"), opts.get("block_index")), p[:, :, self.text_len:].mean(1)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("topology", ["flux_dev", "sd3"])
def test_output_unchanged_and_maps_equal_the_full_softmax(built, topology):
    from infsplign.guidance.joint_attention import object_index
    from infsplign.engine.families.mmdit.capture import JointCapture, blocks_of, install_capture
    model, clip, _ = built[topology]
    dm = model.model.diffusion_model
    cond, extra = _conds(topology, clip)
    plain = _run(model, cond, extra, {})
    reference = Reference(cond.shape[1])
    options = {"optimized_attention_override": reference}
    capture = JointCapture(blocks_of(dm), HW)
    with install_capture(options, capture, dm):
        captured = _run(model, cond, extra, options)
    # restored (Flux on 0.3.75 writes block_type / block_index / total_blocks into the caller's dict)
    assert options["optimized_attention_override"] is reference and "patches_replace" not in options
    assert torch.equal(plain, captured)  # bitwise
    expected_blocks = (len(dm.joint_blocks) if topology == "sd3" else len(dm.double_blocks) + len(dm.single_blocks))
    assert [c.block for c in capture.calls] == sorted(blocks_of(dm), key=lambda b: (b[0] == "single", b[1]))
    assert len(capture.calls) == expected_blocks
    # every call went on to the override below (SD3.5-M's image-only attention too)
    assert reference.calls == expected_blocks + (1 if topology == "sd3" else 0)
    assert all(c.text == (0, cond.shape[1]) and c.image == (cond.shape[1], cond.shape[1] + 64) for c in capture.calls)

    words = [[_word(clip, TEXT, "cat")], [_word(clip, TEXT, "dog")], [_word(clip, TEXT, "photo")]]
    maps = capture.maps(object_index(words, torch.device("cpu")), rows=24)  # chunks of 24 of 64 rows
    refs = dict(reference.probs)
    for block, m in maps.items():
        assert m.shape == (2, 3, *HW) and m.dtype == torch.float32 and (m >= 0).all()
        ref = refs[block][..., [w[0] for w in words]].permute(0, 2, 1).reshape(2, 3, *HW)
        assert torch.allclose(m.double(), ref, rtol=1e-4, atol=1e-7), block
        assert (m[:, 0] - m[:, 1]).abs().max() > 0.1 * m[:, 0].mean()  # cat and dog differ


def test_sd3_blocks_are_told_apart(built):
    """SD3 gives no block index: the capture's patch does, and only the asked blocks are kept;
    another pack's patch on that block still runs, with the block's identity."""
    from infsplign.engine.families.mmdit.capture import JointCapture, install_capture
    model, clip, _ = built["sd3"]
    dm = model.model.diffusion_model
    cond, extra = _conds("sd3", clip)
    seen = []

    def other_pack(args, extra_args):
        seen.append(args["transformer_options"].get("block_index"))
        return extra_args["original_block"](args)
    shared_dit = {("double_block", 2): other_pack}
    options = {"patches_replace": {"dit": shared_dit}}
    plain = _run(model, cond, extra, options)
    seen.clear()
    capture = JointCapture(frozenset({("double", 1), ("double", 2)}), HW)
    with install_capture(options, capture, dm):
        captured = _run(model, cond, extra, options)
    assert torch.equal(plain, captured)
    assert [c.block for c in capture.calls] == [("double", 1), ("double", 2)]
    assert seen == [2]
    assert shared_dit == {("double_block", 2): other_pack} and options == {"patches_replace": {"dit": shared_dit}}


def test_flux_reference_tokens_after_the_image(built):
    """With text_tokens given, tokens after the image (Kontext-style reference latents) are
    neither text nor image; a call without text keys is skipped."""
    from infsplign.engine.families.mmdit.capture import JointCapture
    capture = JointCapture(frozenset({("double", 0)}), (2, 2), text_tokens=3)
    assert capture.spans(3 + 4 + 4) == ((0, 3), (3, 7))
    assert JointCapture(frozenset(), (2, 2)).spans(4) is None  # image tokens only
    q = torch.zeros(1, 2, 11, 8)
    capture.record(("double", 0), q, q, 2, True, None)
    capture.record(("double", 1), q, q, 2, True, None)  # not a captured block
    assert [(c.block, c.text, c.image, c.scale) for c in capture.calls] == [(("double", 0), (0, 3), (3, 7), 8 ** -0.5)]


def _containers_api():
    import comfy.ldm.modules.attention as attention
    return getattr(attention, "AttentionTensorContainer", None)


def test_containers_with_comfyui_wrap_attn(host):
    """ComfyUI's own wrap_attn with its AttentionTensorContainer (0.33 and later): with an
    override below that consumes containers, the capture declares container support, reads q
    and k without consuming them and hands the containers on; with one that does not (or
    none), wrap_attn gives the capture plain tensors."""
    import comfy.ldm.modules.attention as attention
    from infsplign.engine.families.mmdit.capture import CaptureOverride, JointCapture
    container = _containers_api()
    if container is None:
        pytest.skip("this ComfyUI has no AttentionTensorContainer (see test_containers_stand_in)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7 + 4, 16, generator=g) for _ in range(3))
    expected = attention.attention_basic(q, k, v, 2, skip_reshape=True)
    consumed = []

    def below_containers(func, *args, **kwargs):  # an override of another pack, plain tensors
        return func(*args, **kwargs)

    def container_function(*args, **kwargs):
        tensors = [c.take() for c in args[:3]]
        consumed.append(True)
        kwargs.pop("transformer_options", None)
        return attention.attention_basic(*tensors, *args[3:], **kwargs)
    below_containers.container_function = container_function

    def below_plain(func, *args, **kwargs):
        assert isinstance(args[0], torch.Tensor)
        return func(*args, **kwargs)

    for previous, declares in ((below_containers, True), (below_plain, False), (None, False)):
        capture = JointCapture(frozenset({("double", 0)}), (2, 2))
        override = CaptureOverride(capture, previous)
        assert hasattr(override, "container_function") == declares
        opts = {"optimized_attention_override": override, "block_type": "double", "block_index": 0}
        boxes = [container(t) for t in (q, k, v)]
        out = attention.optimized_attention(*boxes, 2, skip_reshape=True, transformer_options=opts)
        assert torch.equal(out, expected)
        assert len(capture.calls) == 1 and capture.calls[0].q is q and capture.calls[0].k is k
        assert all(b.tensor is None for b in boxes)  # consumed once, by the backend
    assert consumed == [True]


def test_containers_stand_in(host):
    """The same protocol with a stand-in container (peek / take) for a ComfyUI without one."""
    from infsplign.engine.families.mmdit.capture import CaptureOverride, JointCapture

    class Container:
        def __init__(self, tensor):
            self.tensor = tensor

        def peek(self):
            if self.tensor is None:
                raise RuntimeError("consumed")
            return self.tensor

        def take(self):
            t, self.tensor = self.peek(), None
            return t
    q = torch.randn(1, 11, 128)
    calls = []

    def previous(func, *args, **kwargs):
        return func(*args, **kwargs)
    previous.container_function = lambda *args, **kwargs: calls.append([c.take() for c in args[:3]]) or "out"
    capture = JointCapture(frozenset({("double", 3)}), (2, 2))
    override = CaptureOverride(capture, previous)
    opts = {"block_type": "double", "block_index": 3}
    boxes = [Container(q), Container(q), Container(q)]
    assert override.container_function(*boxes, heads=2, transformer_options=opts) == "out"
    assert len(calls) == 1 and all(b.tensor is None for b in boxes)
    call = capture.calls[0]
    assert call.q.shape == (1, 2, 11, 64) and call.text == (0, 7) and call.image == (7, 11)


@pytest.mark.parametrize("topology", ["flux_dev", "sd3"])
def test_map_loss_gradient_matches_finite_differences(host, topology):
    """The guided step's chain: capture -> joint maps -> a loss -> d/d latent, through the
    model in float64 (differentiable() around forward and backward), against central
    differences along random directions (relative error <= 1e-3)."""
    from infsplign.guidance.joint_attention import object_index
    from infsplign.engine.families.mmdit.autograd import differentiable, training_paths
    from infsplign.engine.families.mmdit.capture import JointCapture, blocks_of, install_capture
    from testkit import mmdit_models
    dm = mmdit_models.build(topology, seed=0)[1].diffusion_model.double()
    if topology == "flux_dev":
        # Flux's RoPE table is float32 and q, k are rounded to it (comfy/ldm/flux/math.py): a
        # 1e-7 noise that the quotients of small map losses magnify past 1e-3. The test
        # model's table in float64 makes the whole forward float64.
        table = dm.pe_embedder.forward
        dm.pe_embedder.forward = lambda ids, _table=table: _table(ids).double()
    g = torch.Generator().manual_seed(2)
    text = 10
    if topology == "sd3":
        kwargs = {"timesteps": torch.tensor([700.0], dtype=torch.float64),
                  "context": torch.randn(1, text, 4096, generator=g, dtype=torch.float64),
                  "y": torch.randn(1, 128, generator=g, dtype=torch.float64)}
    else:
        kwargs = {"timestep": torch.tensor([0.7], dtype=torch.float64),
                  "context": torch.randn(1, text, 64, generator=g, dtype=torch.float64),
                  "y": torch.randn(1, 64, generator=g, dtype=torch.float64),
                  "guidance": torch.tensor([3.5], dtype=torch.float64)}
    x = torch.randn(1, 16, 8, 8, generator=g, dtype=torch.float64)
    index = object_index([[2], [5, 6]], torch.device("cpu"))
    blocks = blocks_of(dm)
    weights = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)

    def loss(latent):
        capture = JointCapture(blocks, (4, 4))
        options = {}
        with install_capture(options, capture, dm):
            dm(latent, transformer_options=options, **kwargs)
        maps = capture.maps(index, rows=5)
        assert len(maps) == len(blocks)
        return sum((m[0] * weights).sum() for m in maps.values())

    latent = x.clone().requires_grad_(True)
    with differentiable():
        loss(latent).backward()
    grad = latent.grad
    step, errors = 1e-3, []
    for seed in range(3):
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
        d /= d.norm()
        with torch.no_grad(), training_paths():
            fd = float((loss(x + step * d) - loss(x - step * d)) / (2 * step))
        assert abs(fd) > 1e-4
        errors.append(abs(float((grad * d).sum()) - fd) / abs(fd))
    print(f"{topology}: map-loss relative errors {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= 1e-3


def test_chains_with_the_memory_efficient_attention(built):
    """Under the pack's memory-efficient attention (engine/memory_modes.py, which on CUDA
    answers gradient-recording calls with PyTorch's SDPA; forced here on the CPU): the
    capture sits above it, every call still reaches it, outputs are unchanged."""
    from infsplign.engine.memory_modes import efficient_attention_on_cuda
    from infsplign.engine.families.mmdit.autograd import differentiable
    from infsplign.engine.families.mmdit.capture import JointCapture, blocks_of, install_capture
    model, clip, _ = built["flux_dev"]
    dm = model.model.diffusion_model
    cond, extra = _conds("flux_dev", clip)
    reached = []
    efficient = efficient_attention_on_cuda(wants=lambda q: reached.append(q.shape) or True)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(4))

    def run(options):
        with torch.enable_grad(), differentiable():
            return model.model.apply_model(x.clone().requires_grad_(True), torch.tensor([0.7]), c_crossattn=cond,
                                           transformer_options=options, **extra).detach()
    plain = run({"optimized_attention_override": efficient})
    reached.clear()
    options = {"optimized_attention_override": efficient}
    capture = JointCapture(blocks_of(dm), HW)
    with install_capture(options, capture, dm):
        captured = run(options)
    assert torch.equal(plain, captured)
    assert len(reached) == len(capture.calls) == len(dm.double_blocks) + len(dm.single_blocks)
    assert options["optimized_attention_override"] is efficient


def test_the_family_capture_finds_the_image_before_reference_latents(built):
    """Flux with Kontext-style reference latents (ref_latents: their tokens follow the image's):
    the maps the run's CaptureStore gets from the family's capture equal those of a capture
    told the text length outright; without reference latents as well."""
    from infsplign.engine.families.mmdit.capture import CaptureOverride, JointCapture, blocks_of
    from infsplign.engine.families.mmdit.family import MMDIT
    from infsplign.guidance.capture import CaptureStore
    from infsplign.guidance.joint_attention import object_index
    from infsplign.guidance.relations import BoundRelation, Relation, SpatialRelations
    model, clip, _ = built["flux_dev"]
    dm = model.model.diffusion_model
    cond, extra = _conds("flux_dev", clip)
    cat, dog = _word(clip, TEXT, "cat"), _word(clip, TEXT, "dog")
    relations = SpatialRelations((BoundRelation(Relation("cat", "left", "dog"), (cat,), (dog,)),), TEXT, "t5xxl",
                                 cond.shape[1])
    layers = MMDIT.default_layers(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 16, 16, generator=g)
    for refs in ([], [torch.randn(1, 16, 12, 8, generator=g)]):
        truth = JointCapture(blocks_of(dm, [(layer.kind, layer.block) for layer in layers]), HW,
                             text_tokens=cond.shape[1])
        store = CaptureStore(relations, layers)
        store.capturing, store.latent_hw = True, (16, 16)
        options = {"optimized_attention_override": CaptureOverride(truth), "cond_or_uncond": [0]}
        MMDIT.install_capture(options, store, dm)
        with torch.no_grad():
            dm(x, torch.tensor([0.7]), cond, ref_latents=refs or None, transformer_options=options, **extra)
        ((level, maps),) = store.take()
        expected = truth.maps(object_index([[cat], [dog]], torch.device("cpu")))
        assert level == "coarse" and maps.shape == (len(layers), 1, 2, *HW)
        for layer, m in zip(layers, maps):
            torch.testing.assert_close(m, expected[(layer.kind, layer.block)].float(), rtol=1e-5, atol=1e-7)
