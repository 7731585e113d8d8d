"""Tier 2: Spatial Relation Parse with ComfyUI's real tokenizers (SD1 CLIP-L, SD2
OpenCLIP-H, SDXL CLIP-L + CLIP-G)."""
import pytest

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def clips(host):
    from testkit import models
    return {t: models.load(t, seed=0)[1] for t in models.TOPOLOGIES}


@pytest.fixture(scope="module")
def parse(host):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["InfSplignRelationParse"]()
    return lambda clip, text, **kw: node.parse(clip, text, **kw)["result"]


def _words_at(clip, text, positions):
    """Decode the tokens at `positions` of the encoded text back to words."""
    name, chunks = next(iter(sorted(clip.tokenize(text).items())))
    flat = [t for chunk in chunks for t, *_ in chunk]
    sub = getattr(clip.tokenizer, f"clip_{name}")
    return sub.untokenize([(flat[p], 1.0) for p in positions])


@pytest.mark.parametrize("topology", ["sd1", "sd2v", "sdxl"])
def test_token_positions_point_at_the_object_words(clips, parse, topology):
    clip = clips[topology]
    text = "a photo of a potted plant to the right of a clock"
    rels, summary = parse(clip, text)
    (b,) = rels.items
    assert (b.relation.object_a, b.relation.relation, b.relation.object_b) == ("potted plant", "right", "clock")
    assert b.tokens_a == (5, 6) and b.tokens_b == (12,)
    words = [w for _, w in _words_at(clip, text, b.tokens_a + b.tokens_b)]
    assert words == ["potted</w>", "plant</w>", "clock</w>"]
    assert '"potted plant" right of "clock"' in summary
    assert rels.encoder == {"sd1": "clip_l", "sd2v": "clip_h", "sdxl": "clip_g+clip_l"}[topology]


def test_weight_syntax_keeps_positions(clips, parse):
    rels, _ = parse(clips["sd1"], "a (red car:1.3) to the left of [a dog]")
    (b,) = rels.items
    assert b.relation.object_a == "red car" and b.tokens_a == (2, 3) and b.tokens_b == (10,)


def test_repeated_words_pick_the_right_mention(clips, parse):
    rels, _ = parse(clips["sd1"], "a dog near a cat, a cat below a dog")
    first, second = rels.items
    assert first.tokens_a == (2,) and first.tokens_b == (5,)
    assert second.tokens_a == (8,) and second.tokens_b == (11,)


def test_prompt_longer_than_one_chunk(clips, parse):
    filler = ", ".join(["highly detailed"] * 30)
    text = f"{filler}, a cat to the left of a dog"
    rels, _ = parse(clips["sd1"], text)
    (b,) = rels.items
    assert rels.sequence_length == 154  # two chunks of 77
    assert min(b.tokens_a) > 77 and b.tokens_b[0] > b.tokens_a[0]
    assert [w for _, w in _words_at(clips["sd1"], text, b.tokens_a + b.tokens_b)] == ["cat</w>", "dog</w>"]


def test_overrides(clips, parse):
    rels, _ = parse(clips["sd1"], "a red car to the left of a dog", object_a="car", relation="above")
    (b,) = rels.items
    assert (b.relation.object_a, b.relation.relation, b.tokens_a) == ("car", "above", (3,))
    rels, _ = parse(clips["sd1"], "a cat and a dog", object_a="dog", relation="right", object_b="cat")
    assert rels.items[0].tokens_a == (5,) and rels.items[0].tokens_b == (2,)


def test_errors_name_the_value_and_the_fix(clips, parse):
    with pytest.raises(ValueError, match=r'object_a "horse" does not appear in the prompt'):
        parse(clips["sd1"], "a cat to the left of a dog", object_a="horse")
    with pytest.raises(ValueError, match="set all three of object_a, relation and object_b"):
        parse(clips["sd1"], "a cat and a dog", object_a="cat")
    with pytest.raises(ValueError, match="depth relation"):
        parse(clips["sdxl"], "a cat behind a dog")


def test_embedding_syntax(host, parse, tmp_path):
    """An "embedding:name" object: its vectors are the tokens, found by value."""
    import safetensors.torch
    import torch
    from testkit import models
    safetensors.torch.save_file({"emb_params": torch.randn(2, models.CLIP_WIDTH)}, str(tmp_path / "mycat.safetensors"))
    clip = models.load("sd1", embedding_directory=str(tmp_path))[1]
    rels, summary = parse(clip, "a photo of embedding:mycat to the left of a dog")
    (b,) = rels.items
    assert b.relation.object_a == "embedding:mycat"
    assert b.tokens_a == (4, 5) and b.tokens_b == (11,)  # two embedding vectors, then "to the left of a"
    cond = clip.encode_from_tokens(clip.tokenize("a photo of embedding:mycat to the left of a dog"))
    assert cond.shape == (1, 77, models.CLIP_WIDTH)


def test_missing_embedding_is_an_object_error(host, parse, tmp_path):
    from testkit import models
    clip = models.load("sd1", embedding_directory=str(tmp_path))[1]
    with pytest.raises(ValueError, match=r"object_a \"embedding:nothere\": no such embedding"):
        parse(clip, "embedding:nothere to the left of a dog")
