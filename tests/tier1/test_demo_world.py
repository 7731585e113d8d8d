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
