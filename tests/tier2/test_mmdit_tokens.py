"""Tier 2: token positions in the T5 context of Flux.1 / Chroma and the CLIP + T5 context of
SD3, with ComfyUI's real tokenizers and the narrow text encoders of the test models.

Every position is checked against the conditioning itself: ComfyUI applies a token's weight
to that token's own row only ((z - z_empty) * w + z_empty), so writing an object as
"(object:1.5)" instead of "(object:1.0)" changes exactly the rows of its tokens. Those rows
must be the positions Spatial Relation Parse finds (and "(object:1.0)" tokenizes as the plain
prompt does, so the positions carry over to it).
"""
import pytest
import torch

pytestmark = pytest.mark.host

TEXT = "a photo of a {} to the left of a {}"


@pytest.fixture(scope="module")
def clips(host):
    from testkit import mmdit_models
    out = {t: mmdit_models.load(t, seed=0)[1] for t in ("sd3", "flux_dev", "chroma")}
    for parts in (("clip_l", "clip_g"), ("t5xxl",), ("clip_g", "t5xxl")):
        out["sd3:" + "+".join(parts)] = mmdit_models.load("sd3", seed=0, text_encoders=parts)[1]
    return out


@pytest.fixture(scope="module")
def parse(host):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["InfSplignRelationParse"]()
    return lambda clip, text, **kw: node.parse(clip, text, **kw)["result"]


def weighted_rows(clip, template: str, phrase: str, *others: str) -> tuple[int, ...]:
    """Rows of the conditioning that "(phrase:1.5)" changes against "(phrase:1.0)"."""
    def encode(weight):
        return clip.encode_from_tokens(clip.tokenize(template.format(f"({phrase}:{weight})", *others)))
    a, b = encode(1.5), encode(1.0)
    assert a.shape == b.shape
    changed = (a - b).abs().amax(-1)[0]
    return tuple(torch.nonzero(changed > 1e-5).flatten().tolist())


def _word_marks(clip, text, rows):
    """Those of `rows` that hold T5's bare word-start piece "\u2581" (id 3): ComfyUI weighs it with
    the word that follows, the positions leave it out (it stands before every such word)."""
    from infsplign.engine import text_contexts, tokens
    if "t5xxl" not in clip.tokenize(text):
        return set()
    sub = text_contexts.sub_tokenizer(clip, "t5xxl")
    offset = rows_before_t5(clip, text)
    t5 = tokens.t5_rows(clip, "t5xxl", clip.tokenize(text)["t5xxl"])
    return {r for r in rows if r >= offset and isinstance(t5[r - offset], int)
            and sub.inv_vocab.get(t5[r - offset]) == "\u2581"}


def rows_before_t5(clip, text):
    """SD3: the CLIP rows before T5's (when the encoder holds CLIP parts); 0 otherwise."""
    te = clip.cond_stage_model
    parts = [len(clip.tokenize(text)[k]) * 77 for k in ("l", "g") if getattr(te, f"clip_{k}", None) is not None]
    return min(parts) if parts and hasattr(te, "clip_g") else 0


def check_rows(clip, template, phrase, others, positions):
    """`positions` of `phrase` in template.format(phrase, *others) are the rows its weight moves
    (but T5's bare word-start pieces)."""
    text = template.format(phrase, *others)
    plain = clip.tokenize(text)
    same = clip.tokenize(template.format(f"({phrase}:1.0)", *others))
    flat = lambda tokens: [t for c in tokens for t, *_ in c]  # noqa: E731
    assert plain.keys() == same.keys()
    for key in plain:
        a, b = flat(plain[key]), flat(same[key])
        assert len(a) == len(b) and all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b))
    rows = weighted_rows(clip, template, phrase, *others)
    marks = _word_marks(clip, text, rows)
    assert tuple(r for r in rows if r not in marks) == tuple(positions)
    assert all(r + 1 in rows for r in marks)  # a mark only right before a piece of the word


def t5_pieces(clip, text, positions):
    """The T5 pieces at context rows `positions` (rows as the encoder makes them)."""
    from infsplign.engine import text_contexts, tokens
    sub = text_contexts.sub_tokenizer(clip, "t5xxl")
    rows = tokens.t5_rows(clip, "t5xxl", clip.tokenize(text)["t5xxl"])
    offset = rows_before_t5(clip, text)
    return [sub.inv_vocab[rows[p - offset]] for p in positions]


@pytest.mark.parametrize("name, encoder, length, cat, dog", [
    ("flux_dev", "t5xxl", 256, (6,), (13,)),  # T5 pieces: _ a _photo _of _ a _cat _to _the _left _of _ a _dog
    ("chroma", "t5xxl", 15, (6,), (13,)),  # Chroma's T5 is not padded: 14 pieces + end
    ("sd3", "clip_g+clip_l+t5xxl", 154, (5, 77 + 6), (11, 77 + 13)),  # CLIP rows, then T5 rows
    ("sd3:clip_l+clip_g", "clip_g+clip_l", 77, (5,), (11,)),  # SD3 without T5: CLIP rows only
    ("sd3:t5xxl", "t5xxl", 77, (6,), (13,)),  # SD3 with T5 only: T5 rows from 0 (padded to 77)
    ("sd3:clip_g+t5xxl", "clip_g+t5xxl", 154, (5, 77 + 6), (11, 77 + 13)),
])
def test_positions_index_the_words_rows(clips, parse, name, encoder, length, cat, dog):
    clip = clips[name]
    text = TEXT.format("cat", "dog")
    rels, summary = parse(clip, text)
    (b,) = rels.items
    assert (b.tokens_a, b.tokens_b) == (cat, dog)
    assert (rels.encoder, rels.sequence_length) == (encoder, length)
    assert clip.encode_from_tokens(clip.tokenize(text)).shape[1] == length
    check_rows(clip, TEXT, "cat", ("dog",), cat)
    check_rows(clip, "a photo of a cat to the left of a {}", "dog", (), dog)
    assert f"encoder {encoder}, {length} tokens" in summary


def test_sd3_parts_apart(clips):
    from infsplign.engine import tokens
    parts = tokens.locate_parts(clips["sd3"], TEXT.format("cat", "dog"), "dog")
    assert parts == {"clip": (11,), "t5": (77 + 13,)}
    assert tokens.locate(clips["sd3"], TEXT.format("cat", "dog"), "dog") == (11, 90)


@pytest.mark.parametrize("name", ["flux_dev", "sd3"])
def test_multi_token_objects(clips, parse, name):
    """T5's sentencepiece splits "giraffe" into three pieces (CLIP's BPE: one token) and "potted
    plant" into three (CLIP: two); the lone word-start piece before "giraffe" is not the word."""
    clip = clips[name]
    text = "a giraffe to the left of a potted plant"
    (b,) = parse(clip, text)[0].items
    offset = 77 if name == "sd3" else 0
    t5_a = tuple(p for p in b.tokens_a if p >= offset)
    t5_b = tuple(p for p in b.tokens_b if p >= offset)
    assert t5_pieces(clip, text, t5_a) == ["gir", "a", "ffe"]
    assert t5_pieces(clip, text, t5_b) == ["\u2581pot", "ted", "\u2581plant"]
    if name == "sd3":
        assert b.tokens_a == (2, *t5_a) and b.tokens_b == (8, 9, *t5_b)
    check_rows(clip, "a {} to the left of a potted plant", "giraffe", (), b.tokens_a)
    check_rows(clip, "a giraffe to the left of a {}", "potted plant", (), b.tokens_b)


@pytest.mark.parametrize("name", ["flux_dev", "sd3", "chroma"])
def test_weighted_syntax(clips, parse, name):
    """ComfyUI tokenizes each weighted segment alone; T5 then spells "[" and "]" (literal text
    in ComfyUI, no weight) as pieces of their own."""
    clip = clips[name]
    text = "a (red car:1.3) to the left of [a dog]"
    (b,) = parse(clip, text)[0].items
    assert b.relation.object_a == "red car"
    rows = weighted_rows(clip, "a {} to the left of [a dog]", "red car")  # 1.5 against 1.0
    assert tuple(r for r in rows if r not in _word_marks(clip, text, rows)) == b.tokens_a
    t5_dog = [p for p in b.tokens_b if p >= rows_before_t5(clip, text)]
    assert t5_pieces(clip, text, t5_dog) == ["\u2581dog"]
    if name == "sd3":
        assert b.tokens_a[:2] == (2, 3) and b.tokens_b[0] == 10  # CLIP: <start> a red car to the left of [ a dog


@pytest.mark.parametrize("name", ["flux_dev", "sd3"])
def test_prompt_past_one_chunk(clips, parse, name):
    """SD3: CLIP takes two chunks of 77 and T5 starts after them; Flux: T5 runs past its 256
    padding (no chunks)."""
    clip = clips[name]
    filler = ", ".join(["highly detailed"] * 90)
    template = filler + ", a {} to the left of a dog"
    text = template.format("cat")
    rels, _ = parse(clip, text)
    (b,) = rels.items
    length = clip.encode_from_tokens(clip.tokenize(text)).shape[1]
    assert rels.sequence_length == length
    if name == "flux_dev":
        assert length > 256 and min(b.tokens_a) > 256
    else:
        t5_len = len(clip.tokenize(text)["t5xxl"][0])
        clip_rows = len(clip.tokenize(text)["l"]) * 77
        assert clip_rows == 77 * 4 and length == clip_rows + t5_len  # 90 x "highly detailed," is 270 CLIP tokens
        assert 77 < b.tokens_a[0] < clip_rows <= b.tokens_a[1]
    check_rows(clip, template, "cat", (), b.tokens_a)
    assert t5_pieces(clip, text, [p for p in b.tokens_a if p >= rows_before_t5(clip, text)]) == ["\u2581cat"]


def test_repeated_words_and_case(clips, parse):
    """The n-th mention in T5 is the n-th mention of the relation parser; T5 is cased, the
    match is not ("Cat"), and a word glued to a comma ("cat,dog": T5 piece "dog") is found."""
    clip = clips["flux_dev"]
    first, second = parse(clip, "a dog near a Cat, a cat below a dog")[0].items
    assert t5_pieces(clip, "a dog near a Cat, a cat below a dog", first.tokens_b) == ["\u2581Cat"]
    assert first.tokens_a < second.tokens_b and first.tokens_b < second.tokens_a
    rels, _ = parse(clip, "a cat,dog", object_a="cat", relation="left", object_b="dog")
    assert t5_pieces(clip, "a cat,dog", rels.items[0].tokens_b) == ["dog"]


def _embedding_dir(tmp_path, **vectors):
    import safetensors.torch
    safetensors.torch.save_file(vectors, str(tmp_path / "mycat.safetensors"))
    return str(tmp_path)


def test_embedding_on_sd3_has_its_clip_rows(host, parse, tmp_path):
    """A CLIP embedding (clip_l / clip_g vectors) is in SD3's CLIP rows. T5's tokenizer picks up
    the file too, but its vectors are not T5's width: the encoder drops them and T5's later rows
    move up, so T5's rows are those of the prompt without the embedding, where the dog is."""
    from infsplign.engine import tokens
    from testkit import mmdit_models
    w = mmdit_models.CLIP_WIDTH
    folder = _embedding_dir(tmp_path, clip_l=torch.randn(2, w), clip_g=torch.randn(2, w))
    clip = mmdit_models.load("sd3", embedding_directory=folder)[1]
    text = "a photo of embedding:mycat to the left of a dog"
    (b,) = parse(clip, text)[0].items
    assert b.tokens_a == (4, 5)  # two vectors after <start> a photo of; none in T5's rows
    clip_dog = tuple(p for p in b.tokens_b if p < 77)
    t5_dog = tuple(p for p in b.tokens_b if p >= 77)
    assert clip_dog == (11,) and t5_pieces(clip, text, t5_dog) == ["\u2581dog"]
    # the CLIP rows, by weight (the CLIP part of the changed rows)
    changed = weighted_rows(clip, "a photo of {} to the left of a dog", "embedding:mycat")
    assert tuple(r for r in changed if r < 77) == b.tokens_a
    changed = weighted_rows(clip, "a photo of embedding:mycat to the left of a {}", "dog")
    assert tuple(r for r in changed if r < 77) == clip_dog
    # the T5 rows: as without the embedding (ComfyUI's weights stay with the token list's index,
    # so they land on other rows after a dropped vector: weighting cannot show T5's rows here)
    bare = "a photo of to the left of a dog"
    encode = lambda t: clip.encode_from_tokens(clip.tokenize(t))  # noqa: E731
    assert torch.equal(encode(text)[:, 77:], encode(bare)[:, 77:])
    assert tokens.locate_parts(clip, bare, "dog")["t5"] == t5_dog
    check_rows(clip, "a photo of to the left of a {}", "dog", (), tokens.locate(clip, bare, "dog"))


def test_embedding_on_flux_is_refused(host, parse, tmp_path):
    from testkit import mmdit_models
    folder = _embedding_dir(tmp_path, clip_l=torch.randn(2, 768))  # as real CLIP-L embeddings are
    clip = mmdit_models.load("flux_dev", embedding_directory=folder)[1]
    with pytest.raises(ValueError, match=r'object_a "embedding:mycat": this model reads the prompt through T5'):
        parse(clip, "embedding:mycat to the left of a dog")


@pytest.mark.parametrize("kind, encoder, keys", [
    ("qwen_image", "QwenImageTEModel_", "qwen25_7b"), ("aura_flow", "AuraT5Model", "pile_t5xl")])
def test_other_text_encoders_are_refused(host, parse, kind, encoder, keys):
    from testkit import mmdit_models
    clip = mmdit_models.foreign_clip(kind)
    with pytest.raises(ValueError) as err:
        parse(clip, "a cat to the left of a dog")
    message = str(err.value)
    assert f"its text encoder is {encoder}" in message and keys in message
    assert "Supported: the CLIP of SD1.x" in message and "Flux.1 (clip_l + t5xxl" in message
    assert type(err.value).__name__ == "RelationError"  # (the pack's class, as ComfyUI loaded it)


def test_layout_boxes_on_flux(clips):
    """InfSplign Layout Boxes binds its boxes through the same positions."""
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["InfSplignLayout"]()
    text = "a photo of a cat to the left of a dog"
    boxes = '[{"object": "cat", "box": [0, 0, 0.5, 1]}, {"object": "dog", "box": [0.5, 0, 1, 1]}]'
    result, summary = node.layout(clips["flux_dev"], text, boxes, 6.0, 0.4, "ilgd", 12.0, 0.5)["result"]
    assert [b.tokens for b in result.boxes] == [(6,), (13,)] and result.encoder == "t5xxl"
    # touching boxes: the summary says how the box loss reads them at the default margin (0.2)
    assert result.layout.box_margin == 0.2 and "margin 0.2" in summary
    assert 'reads "cat" as [0.0, 0.0, 0.4, 1.0]' in summary and 'reads "dog" as [0.6, 0.0, 1.0, 1.0]' in summary
    # overlapping boxes are read apart further (each gives up the shared 0.2 and a quarter of the margin)
    crossing = '[{"object": "cat", "box": [0, 0, 0.6, 1]}, {"object": "dog", "box": [0.4, 0, 1, 1]}]'
    over = node.layout(clips["flux_dev"], text, crossing, 6.0, 0.4, "ilgd", 12.0, 0.5)["result"][1]
    assert 'reads "cat" as [0.0, 0.0, 0.35, 1.0] (near or over another box)' in over
    assert 'reads "dog" as [0.65, 0.0, 1.0, 1.0]' in over
    # and the default placing burst; with it off, no such line
    assert (result.layout.placing_iterations, result.layout.placing_percent) == (20, 0.05)
    assert "placing: 20 Adam steps on the box loss at 0.05 of the schedule" in summary
    off = node.layout(clips["flux_dev"], text, boxes, 6.0, 0.4, "ilgd", 12.0, 0.5, placing_iterations=0)["result"][1]
    assert "placing" not in off
