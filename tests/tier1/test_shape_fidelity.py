"""Tier 1: the demo world's shape-fidelity measure and the box layout sets (no ComfyUI)."""
import random

import numpy as np
import pytest

from infsplign.demo_world import box_evaluation, shape_fidelity, world


def image_of(*things: world.Thing) -> np.ndarray:
    return world.render([world.Scene(*things)])[0].permute(1, 2, 0).numpy().copy()


def test_rendered_shapes_fit_their_named_shape_and_no_other():
    rng = random.Random(5)
    for _ in range(12):
        scene = world.random_scene(rng)
        img = image_of(*scene.things)
        result = shape_fidelity.image_shapes(img, [(t.color, t.shape) for t in scene.things])
        assert all(o.found and o.intact and o.iou > 0.93 for o in result.objects), result
        assert not result.touching  # the world keeps objects 6 px apart
        codes = shape_fidelity.colour_codes(img)
        for t in scene.things:
            blob = shape_fidelity.colour_blob(codes, t.color)
            for other in set(world.SHAPES) - {t.shape}:
                assert shape_fidelity.shape_iou(blob, other) < shape_fidelity.SHAPE_IOU_THRESHOLDS[other]


def test_a_stretched_or_bitten_shape_is_not_intact():
    ys, xs = np.mgrid[0:128, 0:128] + 0.5
    img = np.zeros((128, 128, 3), np.float32)
    img[((xs - 64) / 36) ** 2 + ((ys - 64) / 18) ** 2 <= 1] = (1, 0, 0)  # a circle stretched to 2:1
    wide = shape_fidelity.image_shapes(img, [("red", "circle")]).objects[0]
    assert wide.found and not wide.intact
    img = image_of(world.Thing("blue", "square", 64, 64, 40))
    img[44:64, 44:64] = 0  # a quarter bitten out
    bitten = shape_fidelity.image_shapes(img, [("blue", "square")]).objects[0]
    assert bitten.found and bitten.iou < 0.8 and not bitten.intact


def test_a_missing_colour_is_not_found_and_a_speck_does_not_count():
    img = image_of(world.Thing("red", "circle", 40, 40, 36))
    img[100:105, 100:105] = (0, 0, 1)  # 25 px of blue, below scorer.MIN_AREA
    r = shape_fidelity.image_shapes(img, [("red", "circle"), ("blue", "square")])
    assert r.objects[0].intact and r.objects[1] == shape_fidelity.ObjectShape("square", False, 0.0)
    assert not r.objects[1].intact and not r.touching


@pytest.mark.parametrize("bridge", [False, True])
def test_objects_that_touch_or_are_bridged_are_joined(bridge):
    a, b = world.Thing("red", "square", 40, 64, 36), world.Thing("green", "square", 90, 64, 36)
    img = image_of(a, b)  # 14 px apart
    things = [("red", "square"), ("green", "square")]
    assert not shape_fidelity.image_shapes(img, things).touching
    if bridge:
        img[60:68, 57:74] = (1, 1, 0)  # a yellow run between them (red and green mixed)
    else:
        img[46:82, 58:72] = (0, 1, 0)  # the green square grown left until it meets the red one
    assert shape_fidelity.image_shapes(img, things).touching
    # diagonal neighbours touch too (8-connected)
    img = np.zeros((128, 128, 3), np.float32)
    img[10:40, 10:40] = (1, 0, 0)
    img[40:70, 40:70] = (0, 1, 0)
    assert shape_fidelity.image_shapes(img, things).touching


def test_layout_sets_draw_their_boxes_and_share_object_pairs():
    sets = {name: box_evaluation.prompt_sets(24, 24, name) for name in box_evaluation.LAYOUTS}
    base_eval, base_tune = sets["object-sized"]
    for name, (ev, tune) in sets.items():
        assert [(p.a, p.b) for p in ev] == [(p.a, p.b) for p in base_eval]
        assert [(p.a, p.b) for p in tune] == [(p.a, p.b) for p in base_tune]
        pairs = {frozenset((p.a, p.b)) for p in ev}
        assert not pairs & {frozenset((p.a, p.b)) for p in tune}
        for p in ev + tune:
            assert box_evaluation.overlap(p.box_a, p.box_b) == (name == "overlapping")
            for box in (p.box_a, p.box_b):
                assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
                side = box[2] - box[0]
                assert side == pytest.approx(box[3] - box[1], abs=2e-4)
                if name == "object-sized":
                    assert world.SIZE_RANGE[0] / 128 - 1e-6 <= side <= world.SIZE_RANGE[1] / 128 + 1e-6
                else:
                    assert box_evaluation.WIDE_SIDE[0] - 2e-4 <= side <= box_evaluation.WIDE_SIDE[1] + 2e-4
            gap = box_evaluation.box_gap(p.box_a, p.box_b)
            if name == "near":
                assert gap <= box_evaluation.NEAR_GAP + 2e-4
            if name == "object-sized":
                assert gap >= world.GAP / 128 - 1e-6
    # the wide set is not secretly near: some of its boxes are far apart
    assert max(box_evaluation.box_gap(p.box_a, p.box_b) for p in sets["wide"][0]) > 0.2
    assert box_evaluation.box_gap((0, 0, 0.3, 0.3), (0.33, 0.34, 0.6, 0.6)) == pytest.approx(0.05)


def test_more_prompts_than_object_pairs_is_a_clear_error():
    # 6 colours x 3 shapes: 180 ordered pairs; the evaluation set's 48 take out up to 96
    evaluation, _ = box_evaluation.prompt_sets(48, 0, "overlapping")
    taken = {(p.a, p.b) for p in evaluation} | {(p.b, p.a) for p in evaluation}
    left = 180 - len(taken)
    assert len(box_evaluation.prompt_sets(48, left, "overlapping")[1]) == left
    with pytest.raises(ValueError, match=f"{left + 1} box prompts asked for, but only {left} object pairs"):
        box_evaluation.prompt_sets(48, left + 1, "overlapping")


def test_box_summary_counts_fidelity():
    O = box_evaluation.ObjectScore
    good, bent, lost = O(True, True, 0.5, True, 0.95), O(True, True, 0.5, False, 0.7), O(False, False, 0.0)
    scores = [box_evaluation.ImageScore(good, good, False), box_evaluation.ImageScore(good, bent, True),
              box_evaluation.ImageScore(lost, good, False), box_evaluation.ImageScore(bent, bent, False)]
    m = box_evaluation.summary(scores)
    assert m["inside"] == pytest.approx(100 * 7 / 8) and m["OA"] == pytest.approx(75.0)
    assert m["intact"] == pytest.approx(50.0) and m["placed_intact"] == pytest.approx(50.0)
    assert m["touching"] == pytest.approx(25.0)
