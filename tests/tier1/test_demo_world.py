"""Tier 1: the shapes world, its detector and the VISOR arithmetic (no ComfyUI)."""
import random
import re

import numpy as np
import pytest
import torch

from infsplign.demo_world import evaluation, scorer, world
from infsplign.guidance.relations import PHRASINGS, parse_relations


def test_captions_name_both_objects_and_never_a_place():
    rng = random.Random(0)
    place_words = {w for ps in PHRASINGS.values() for p in ps for w in p.split()} - {"to", "the", "of", "on"}
    fillers = ("banana", "quietly", "mountain")
    for _ in range(500):
        scene = world.random_scene(rng)
        text = world.caption(scene, rng, fillers)
        words = set(re.findall(r"[a-z]+", text))
        assert scene.a.name in text and scene.b.name in text
        assert not words & place_words, text
        assert scene.a.color != scene.b.color and scene.a.shape != scene.b.shape


def test_objects_are_placed_without_regard_to_relations():
    rng = random.Random(1)
    scenes = [world.random_scene(rng) for _ in range(2000)]
    left = np.mean([s.a.cx < s.b.cx for s in scenes])
    above = np.mean([s.a.cy < s.b.cy for s in scenes])
    assert abs(left - 0.5) < 0.04 and abs(above - 0.5) < 0.04
    for s in scenes:  # inside the image, boxes apart
        for t in (s.a, s.b):
            x0, y0, x1, y1 = t.box()
            assert x0 >= world.MARGIN - 1e-9 and x1 <= world.IMAGE - world.MARGIN + 1e-9
        assert world._separated(s.a, s.b)


def test_training_latents_match_the_image_latents():
    scenes = [world.random_scene(random.Random(i)) for i in range(16)]
    exact = world.latent_signal(world.render(scenes))
    cheap = world.scene_latents(scenes, samples_per_cell=4)
    assert exact.shape == (16, 4, 16, 16)
    assert (exact - cheap).abs().mean() < 0.01
    cover = world.object_coverage(scenes)
    assert cover.shape == (16, 2, 16, 16)
    # the "object" channel is the union of the two objects' coverage
    assert ((exact[:, 3] + 1) / 2 - cover.sum(dim=1).clamp(max=1)).abs().mean() < 0.01
    assert cover.amax() == 1.0 and cover.amin() == 0.0


def test_detector_finds_rendered_objects_exactly():
    rng = random.Random(2)
    scenes = [world.random_scene(rng) for _ in range(60)]
    images = world.render(scenes).permute(0, 2, 3, 1).numpy()
    for s, img in zip(scenes, images):
        for t in (s.a, s.b):
            d = scorer.find(scorer.detect(img), t.color, t.shape)
            assert d is not None, (t, scorer.detect(img))
            assert abs(d.cx - t.cx) < 1.0  # shapes are symmetric left-right
            expected_cy = t.cy + (t.size / 6 if t.shape == "triangle" else 0.0)  # triangle: centroid
            assert abs(d.cy - expected_cy) < 1.5


def test_detector_ignores_an_extra_blob_and_wrong_objects():
    scene = world.Scene(world.Thing("red", "circle", 30, 30, 36), world.Thing("blue", "square", 95, 90, 36))
    img = world.render([scene])[0].permute(1, 2, 0).numpy().copy()
    img[100:106, 10:18] = (1, 0, 0)  # a small red blob
    img[5:9, 100:104] = (0, 0, 1)  # a speck of blue, below MIN_AREA
    dets = scorer.detect(img)
    a, b = scorer.find(dets, "red", "circle"), scorer.find(dets, "blue", "square")
    assert abs(a.cx - 30) < 1 and abs(b.cy - 90) < 1
    assert scorer.find(dets, "red", "square") is None
    assert scorer.find_by_color(dets, "red") == a and scorer.find_by_color(dets, "green") is None
    assert scorer.score(img, ("red", "circle"), "left", ("blue", "square")) == scorer.Score(True, True)
    assert scorer.score(img, ("red", "circle"), "below", ("blue", "square")) == scorer.Score(True, False)
    assert scorer.score(img, ("red", "triangle"), "left", ("blue", "square")) == scorer.Score(False, False)


def test_visor_arithmetic():
    T, F_, X = scorer.Score(True, True), scorer.Score(True, False), scorer.Score(False, False)
    scores = [[T, T, T, F_], [T, X, X, X]]
    m = scorer.visor(scores)
    assert m["OA"] == pytest.approx(100 * 5 / 8)
    assert m["VISOR_uncond"] == pytest.approx(100 * 4 / 8)
    assert m["VISOR_cond"] == pytest.approx(100 * 4 / 5)
    assert (m["VISOR_1"], m["VISOR_2"], m["VISOR_3"], m["VISOR_4"]) == (100.0, 50.0, 50.0, 0.0)
    mean, lo, hi = scorer.paired_seed_interval([[X, X, X, X]] * 2, scores, "VISOR_uncond")
    assert mean == pytest.approx(50.0) and lo < mean < hi


def test_prompt_sets_are_disjoint_balanced_and_parse():
    ev, tune = evaluation.prompt_sets(52, 16)
    assert len(ev) == 52 and len(tune) == 16
    assert not set(ev) & set(tune)
    for group in (ev, tune):
        counts = {r: sum(p.relation == r for p in group) for r in evaluation.PHRASE}
        assert max(counts.values()) - min(counts.values()) <= 1
    for p in ev[:20]:
        (rel,) = parse_relations(p.text)
        assert (rel.object_a, rel.relation, rel.object_b) == (" ".join(p.a), p.relation, " ".join(p.b))


# ---- one to three objects ---------------------------------------------------------------------

PLACE_WORDS = {w for ps in PHRASINGS.values() for p in ps for w in p.split()} - {"to", "the", "of", "on"}


def test_scenes_of_one_to_three_objects_differ_in_colour_and_shape_and_keep_apart():
    rng = random.Random(4)
    for n in (1, 2, 3):
        for _ in range(400):
            s = world.random_scene(rng, n)
            assert len(s.things) == n
            assert len({t.color for t in s.things}) == n and len({t.shape for t in s.things}) == n
            assert world.all_separated(s.things)
            for t in s.things:
                x0, y0, x1, y1 = t.box()
                assert x0 >= world.MARGIN - 1e-9 and x1 <= world.IMAGE - world.MARGIN + 1e-9
                assert y0 >= world.MARGIN - 1e-9 and y1 <= world.IMAGE - world.MARGIN + 1e-9
            if n == 3:
                assert sorted(t.shape for t in s.things) == sorted(world.SHAPES)
    a, b, c = (world.Thing(col, sh, 20 + 40 * i, 64, 30) for i, (col, sh) in
               enumerate((("red", "circle"), ("blue", "square"), ("green", "triangle"))))
    assert world.Scene(a, b).a == a and world.Scene(a, b).b == b  # positional, as before
    assert world.Scene(a, b, c).things == (a, b, c) and world.Scene(a).a == a
    with pytest.raises(AttributeError):
        world.Scene(a).b
    with pytest.raises(ValueError):
        world.Scene()


def test_captions_of_one_to_three_objects_name_each_once_and_never_a_place():
    rng = random.Random(5)
    fillers = ("banana", "quietly", "mountain")
    comma_lists = connector_lists = 0
    for n in (1, 2, 3):
        for _ in range(400):
            scene = world.random_scene(rng, n)
            text = world.caption(scene, rng, fillers)
            for t in scene.things:
                assert text.count(t.name) == 1, text
            assert not set(re.findall(r"[a-z]+", text)) & PLACE_WORDS, text
            if n == 1:
                assert re.fullmatch(r"(a|an image of a|one) [a-z]+ [a-z]+", text), text
            if n == 3:
                comma_lists += "," in text
                connector_lists += "," not in text
    assert comma_lists > 100 and connector_lists > 100
    scene = world.random_scene(random.Random(0), 3)
    texts = {world.caption(scene, random.Random(i)) for i in range(200)}
    names = [t.name for t in scene.things]
    import itertools
    assert any(f"a {p}, a {q} and a {r}" in tx for tx in texts for p, q, r in itertools.permutations(names))


def test_object_counts_parse():
    assert world.parse_counts("2") == (2,)
    assert world.parse_counts("1-3") == (1, 2, 3)
    assert world.parse_counts("1,2,2,3") == (1, 2, 2, 3)
    assert world.parse_counts(3) == (3,)
    for bad in ("0-2", "4", "1,5", ""):
        with pytest.raises(ValueError):
            world.parse_counts(bad)


def test_three_object_scenes_render_detect_and_cover():
    rng = random.Random(6)
    scenes = [world.random_scene(rng, n) for n in (3, 1, 2, 3, 3, 1, 2, 3)]
    exact = world.latent_signal(world.render(scenes))
    cover = world.object_coverage(scenes)
    assert cover.shape == (8, 3, 16, 16)
    assert cover[1, 1:].abs().sum() == 0 and cover[2, 2].abs().sum() == 0  # slots past a scene's own
    assert ((exact[:, 3] + 1) / 2 - cover.sum(dim=1).clamp(max=1)).abs().mean() < 0.01
    assert world.object_coverage(scenes[2:3], objects=3).shape == (1, 3, 16, 16)
    assert world.masks(scenes[0]).shape == (3, 128, 128)
    images = world.render(scenes).permute(0, 2, 3, 1).numpy()
    for s, img in zip(scenes, images):
        dets = scorer.detect(img)
        assert len(dets) == len(s.things)
        for t in s.things:
            d = scorer.find(dets, t.color, t.shape)
            assert d is not None and abs(d.cx - t.cx) < 1.0


class WordTokenizer:
    """A stand-in for ComfyUI's CLIP tokenizer: one id per word or comma, start and end
    tokens, padded with the end token to 77 (the batch code only needs this interface)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def tokenize_with_weights(self, text):
        from infsplign.demo_world.text import END_TOKEN
        words = re.findall(r"[a-z]+|,", text)
        ids = [49406] + [self.vocab.setdefault(w, 1000 + len(self.vocab)) for w in words] + [END_TOKEN]
        return {"l": [[(t, 1.0) for t in ids + [END_TOKEN] * (77 - len(ids))]]}


def test_training_batch_of_one_to_three_objects():
    from infsplign.demo_world import batches
    tok = WordTokenizer()
    batch = batches.make_batch(tok, random.Random(7), 48, ("banana",), objects=(1, 2, 3))
    assert batch.x0.shape == (48, 4, 16, 16) and batch.coverage.shape == (48, 3, 16, 16)
    assert batch.weights.shape == (48, 3, 77) and batch.centres.shape == (48, 3, 2)
    named = (batch.weights.sum(dim=-1) > 0).sum(dim=-1)
    counts = {int(c) for c, e in zip(named, batch.empty) if not e}
    assert counts == {1, 2, 3}
    inverse = {v: k for k, v in tok.vocab.items()}
    for i in range(48):
        assert len(batch.groups[i]) == 3
        present = [g for g in batch.groups[i] if g]
        assert len(present) == int(named[i])
        if batch.empty[i]:
            assert not present
            continue
        covered = batch.coverage[i].flatten(1).sum(dim=-1) > 0
        assert covered.tolist() == [bool(g) for g in batch.groups[i]]  # an object for every named slot
        assert (batch.centres[i, len(present):] == 0).all()
        for g in present:
            assert torch.allclose(batch.weights[i, :, list(g)].sum(dim=-1).max(), torch.tensor(1.0))
            color, shape = (inverse[batch.ids[i][k]] for k in g)
            assert color in world.COLORS and shape in world.SHAPES
    again = batches.make_batch(WordTokenizer(), random.Random(7), 48, ("banana",), objects=(1, 2, 3))
    assert torch.equal(batch.x0, again.x0) and batch.groups == again.groups and batch.donors == again.donors
    two = batches.make_batch(tok, random.Random(7), 16, (), objects=(2,))  # the two-object batch
    assert two.weights.shape == (16, 2, 77) and two.coverage.shape == (16, 2, 16, 16)


def test_localisation_counts_the_nearest_of_several_objects():
    from infsplign.demo_world import attention
    centres = torch.tensor([[[0.2, 0.2], [0.8, 0.2], [0.5, 0.8]]])
    centroids = torch.tensor([[[0.25, 0.25], [0.45, 0.7], [0.0, 0.0]]])  # b's words sit on c
    present = torch.tensor([[True, True, False]])
    assert attention.nearer_own(centroids, centres, present).tolist() == [[True, False, False]]
    assert attention.nearer_own(centroids[:, :2], centres[:, :2]).tolist() == [[True, False]]
    # with c absent, b's words at c's place are still nearer b than a
    centroids = torch.tensor([[[0.25, 0.25], [0.6, 0.6], [0.0, 0.0]]])
    assert attention.nearer_own(centroids, centres, present)[0, :2].tolist() == [True, True]
