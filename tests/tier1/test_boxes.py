"""Tier 1: guidance.boxes and guidance.box_geometry: reading the boxes, masks, loss terms, injection, planning,
the boxes read apart and the boxes the placing burst pulls on."""
import json

import pytest
import torch

from infsplign.guidance.box_geometry import PLACING_MAX_OVERLAP, apart_boxes, overlap_share, placed_by_burst
from infsplign.guidance.boxes import (Box, BoxError, LayoutSettings, box_layer_loss, box_masks, injection_bias,
                                      injection_delta, inside_share, parse_boxes, plan_boxes)
from infsplign.guidance.losses import (LossSettings, Objective, Pair, box_map_sizes, objective_loss, objective_terms,
                                      step_loss)


def test_boxes_are_read_as_data():
    text = json.dumps([{"object": " red  circle ", "box": [0.1, 0.2, 0.5, 0.6]}, {"object": "dog", "box": [0, 0, 1, 1]}])
    assert parse_boxes(text) == [Box("red circle", 0.1, 0.2, 0.5, 0.6), Box("dog", 0.0, 0.0, 1.0, 1.0)]
    assert parse_boxes("[]") == [] and parse_boxes("  ") == []


@pytest.mark.parametrize("text, says", [
    ("[{", "not valid JSON"),
    ('{"object": "cat"}', "must be a JSON list"),
    ('[{"object": "cat", "box": [0.1, 0.2, 1.5, 0.6]}]', "must lie in [0, 1]"),
    ('[{"object": "cat", "box": [0.5, 0.2, 0.5, 0.6]}]', "need x0 < x1 and y0 < y1"),
    ('[{"object": "cat", "box": [0.1, 0.7, 0.5, 0.6]}]', "need x0 < x1 and y0 < y1"),
    ('[{"object": "cat", "box": [0.1, 0.2, 0.5]}]', "four numbers"),
    ('[{"object": "cat", "box": [0.1, "a", 0.5, 0.6]}]', "use a number"),
    ('[{"object": "cat", "box": [0.1, true, 0.5, 0.6]}]', "use a number"),
    ('[{"object": "cat", "box": [0.1, NaN, 0.5, 0.6]}]', "use a number"),
    ('[{"box": [0.1, 0.2, 0.5, 0.6]}]', '"object": "<words of the prompt>"'),
    ('[{"object": "  ", "box": [0.1, 0.2, 0.5, 0.6]}]', "empty object"),
    ('[{"object": "cat", "box": [0, 0, 0.5, 0.5]}, {"object": "Cat", "box": [0.5, 0.5, 1, 1]}]', "two boxes"),
    (json.dumps([{"object": f"o{i}", "box": [0, 0, 1, 1]} for i in range(17)]), "at most 16"),
    ("[" * 100_000, "not valid JSON"),
])
def test_bad_boxes_name_the_value_and_the_fix(text, says):
    with pytest.raises(BoxError, match=None) as e:
        parse_boxes(text)
    assert says in str(e.value), str(e.value)


def test_settings_refuse_bad_values():
    with pytest.raises(BoxError, match="injection is -1"):
        LayoutSettings(injection=-1)
    with pytest.raises(BoxError, match='box_loss "l2"'):
        LayoutSettings(box_loss="l2")
    with pytest.raises(BoxError, match="box_end_percent is 1.5"):
        LayoutSettings(box_end_percent=1.5)
    with pytest.raises(BoxError, match=r"box_margin is 0.8; use a fraction of the image side in \[0, 0.5\]"):
        LayoutSettings(box_margin=0.8)
    for iterations in (-1, 2.5, 201, True):
        with pytest.raises(BoxError, match=f"placing_iterations is {iterations}; use a whole number from 0"):
            LayoutSettings(placing_iterations=iterations)
    with pytest.raises(BoxError, match="placing_percent is 1.5; use a fraction"):
        LayoutSettings(placing_percent=1.5)


def test_placing_needs_iterations_and_a_box_loss():
    assert LayoutSettings(box_loss="peak_centre", box_weight=1.5, placing_iterations=20).places
    assert not LayoutSettings(box_loss="peak_centre", box_weight=1.5, placing_iterations=0).places
    assert not LayoutSettings(box_loss="none", box_weight=1.5, placing_iterations=20).places
    assert not LayoutSettings(box_loss="peak", box_weight=0.0, placing_iterations=20).places


def test_near_boxes_are_read_apart_by_the_margin_and_others_as_drawn():
    left, right = Box("a", 0.1, 0.3, 0.4, 0.6), Box("b", 0.42, 0.3, 0.7, 0.6)
    a, b = apart_boxes((left, right), 0.1)
    # the facing sides move back half the shortfall each (0.08 / 2); the far sides stay
    assert (a.x0, a.x1, b.x0, b.x1) == pytest.approx((0.1, 0.36, 0.46, 0.7))
    assert (a.y0, a.y1, b.y0, b.y1) == (0.3, 0.6, 0.3, 0.6) and b.x0 - a.x1 == pytest.approx(0.1)
    top, below = apart_boxes((Box("a", 0.1, 0.1, 0.4, 0.4), Box("b", 0.1, 0.43, 0.4, 0.7)), 0.1)
    assert (top.y1, below.y0) == pytest.approx((0.365, 0.465)) and (top.x0, top.x1) == (0.1, 0.4)
    # a side moves back at most 90 % of its box (so the box read is a strip of the box as
    # drawn, along its far side); apart enough, margin 0: as drawn
    a, b = apart_boxes((Box("a", 0.5, 0.3, 0.8, 0.6), Box("b", 0.1, 0.3, 0.49, 0.6)), 0.2)
    assert a.x0 == pytest.approx(0.5 + 0.095) and b.x1 == pytest.approx(0.49 - 0.095)
    a, b = apart_boxes((Box("a", 0.5, 0.3, 0.52, 0.6), Box("b", 0.1, 0.3, 0.49, 0.6)), 0.5)
    assert a.x0 == pytest.approx(0.5 + 0.02 * 0.9) and b.x1 == pytest.approx(0.49 - 0.245)
    far = (Box("a", 0.0, 0.0, 0.3, 0.3), Box("b", 0.5, 0.5, 0.9, 0.9))
    assert apart_boxes(far, 0.1) == far
    assert apart_boxes((left, right), 0.0) == (left, right)


def test_overlapping_boxes_are_read_apart_along_the_axis_they_overlap_least():
    # b overlaps a by 0.1 across and 0.3 down: read side by side, each box giving up half of
    # the shared 0.1 plus half the margin of 0.2, a on the left
    a, b = apart_boxes((Box("a", 0.1, 0.1, 0.4, 0.5), Box("b", 0.3, 0.2, 0.7, 0.6)), 0.2)
    assert (a.x0, a.x1, b.x0, b.x1) == pytest.approx((0.1, 0.25, 0.45, 0.7))
    assert (a.y0, a.y1, b.y0, b.y1) == (0.1, 0.5, 0.2, 0.6)
    # the order of the boxes does not matter; one above the other is read on the vertical axis
    b2, a2 = apart_boxes((Box("b", 0.3, 0.2, 0.7, 0.6), Box("a", 0.1, 0.1, 0.4, 0.5)), 0.2)
    assert (a2, b2) == (a, b)
    # overlapping by more: each side moves back by the overlap plus a quarter of the margin,
    # so the centres read lie as far apart as the two boxes' side by side, 0.05 apart
    # (0.3 + 0.05), not 0.3 as with half the overlap plus half the margin
    a, b = apart_boxes((Box("a", 0.1, 0.3, 0.4, 0.6), Box("b", 0.2, 0.3, 0.5, 0.6)), 0.2)
    assert (a.x0, a.x1, b.x0, b.x1) == pytest.approx((0.1, 0.15, 0.45, 0.5))
    assert b.centre[0] - a.centre[0] == pytest.approx(0.35)
    top, low = apart_boxes((Box("t", 0.2, 0.1, 0.6, 0.4), Box("l", 0.25, 0.3, 0.55, 0.7)), 0.1)
    assert (top.y1, low.y0) == pytest.approx((0.275, 0.425)) and (top.x0, low.x1) == (0.2, 0.55)
    # boxes that share most of their width: each side moves back by 90 % of its box at most,
    # leaving a strip along its far side
    a, b = apart_boxes((Box("a", 0.2, 0.2, 0.5, 0.5), Box("b", 0.25, 0.25, 0.55, 0.55)), 0.2)
    assert (a.x0, a.x1, b.x0, b.x1) == pytest.approx((0.2, 0.23, 0.52, 0.55))
    # a small box inside a big one: read side by side too, each side moved back by at most
    # 90 % of its box, so the boxes read may still share a strip
    big, small = apart_boxes((Box("big", 0.0, 0.0, 1.0, 1.0), Box("small", 0.6, 0.1, 0.7, 0.9)), 0.2)
    assert (big.x0, big.x1, small.x0, small.x1) == pytest.approx((0.0, 0.55, 0.69, 0.7))
    assert (big.y0, big.y1, small.y0, small.y1) == (0.0, 1.0, 0.1, 0.9)


def test_masks_are_the_covered_share_of_each_cell():
    m = box_masks([Box("a", 0.0, 0.0, 0.5, 0.5), Box("b", 0.125, 0.0, 0.375, 1.0)], 4, 4, torch.zeros(1))
    assert torch.equal(m[0], torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert torch.allclose(m[1][:, :2], torch.full((4, 2), 0.5)) and m[1][:, 2:].abs().sum() == 0


def maps_with(cells):
    maps = torch.zeros(1, 1, 4, 4)
    for y, x in cells:
        maps[0, 0, y, x] = 1.0
    return maps


def test_box_losses_vanish_when_the_attention_is_in_the_box():
    box = [Box("a", 0.0, 0.0, 0.5, 0.5)]
    inside, outside = maps_with([(0, 0), (1, 1)]), maps_with([(3, 3)])
    assert box_layer_loss(inside, [0], box, "ilgd").item() == 0.0
    assert box_layer_loss(outside, [0], box, "ilgd").item() == 1.0
    assert box_layer_loss(inside, [0], box, "maalign").item() == 0.0  # (1 - 1) + 0
    assert box_layer_loss(outside, [0], box, "maalign").item() == 2.0  # (1 - 0) + 1
    assert box_layer_loss(inside, [0], box, "peak").item() == 0.0
    assert box_layer_loss(outside, [0], box, "peak").item() == 1.0
    assert torch.equal(inside_share(inside, [0], box), torch.tensor([[1.0]]))


def test_the_box_loss_gradient_moves_attention_into_the_box():
    box = [Box("a", 0.0, 0.0, 0.5, 0.5)]
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    for kind in ("ilgd", "maalign"):
        maps = torch.softmax(logits.flatten(), 0).view(1, 1, 4, 4)
        (g,) = torch.autograd.grad(box_layer_loss(maps, [0], box, kind).sum(), logits)
        assert (g[0, 0, :2, :2] < 0).all() and (g[0, 0, 2:, 2:] >= 0).all(), kind  # descent raises the inside


def test_objective_adds_weighted_box_terms_to_the_relation_terms():
    maps = torch.rand(2, 2, 4, 4)
    layers = [("coarse", maps), ("mid", maps)]
    pairs = (Pair(0, 1, "left"),)
    s = LossSettings()
    plain = objective_loss(layers, Objective(pairs), s)
    assert torch.equal(plain, step_loss(layers, pairs, s))
    boxes = (Box("a", 0, 0, 0.5, 1), Box("b", 0.5, 0, 1, 1))
    with_boxes = objective_loss(layers, Objective(pairs, (0, 1), boxes, "ilgd", 2.0), s)
    want = plain + 2.0 * box_layer_loss(maps, (0, 1), boxes, "ilgd").sum()
    assert torch.allclose(with_boxes, want)
    assert Objective().empty and not Objective(pairs).empty and Objective((), (0,), boxes[:1], "ilgd", 1.0).has_boxes
    assert Objective((), (0,), boxes[:1], "none", 1.0).empty


def test_overlap_share_is_the_overlap_along_the_axis_that_overlaps_least():
    a = Box("a", 0.1, 0.1, 0.5, 0.5)
    assert overlap_share(a, Box("b", 0.6, 0.1, 0.9, 0.5)) == 0.0  # apart
    assert overlap_share(a, Box("b", 0.5, 0.1, 0.9, 0.5)) == 0.0  # touching
    # 0.1 of overlap along x (0.4 along y): a share of the smaller width, 0.3
    assert overlap_share(a, Box("b", 0.4, 0.1, 0.7, 0.5)) == pytest.approx(0.1 / 0.3)
    assert overlap_share(Box("b", 0.4, 0.1, 0.7, 0.5), a) == pytest.approx(0.1 / 0.3)  # symmetric
    assert overlap_share(a, Box("b", 0.1, 0.3, 0.5, 0.7)) == pytest.approx(0.5)  # along y: 0.2 of 0.4
    assert overlap_share(a, Box("b", 0.2, 0.2, 0.3, 0.3)) == 1.0  # contained


def test_placing_burst_leaves_out_boxes_that_overlap_another_much():
    a, far = Box("a", 0.05, 0.1, 0.45, 0.5), Box("far", 0.6, 0.6, 0.9, 0.9)
    step = 0.4 * (1 - PLACING_MAX_OVERLAP)  # b overlaps a by just over PLACING_MAX_OVERLAP of the width
    much = Box("much", a.x0 + step - 0.01, 0.1, a.x1 + step - 0.01, 0.5)
    little = Box("little", a.x0 + step + 0.01, 0.1, a.x1 + step + 0.01, 0.5)
    assert overlap_share(a, much) > PLACING_MAX_OVERLAP > overlap_share(a, little) > 0
    assert placed_by_burst((a, little, far)) == (0, 1, 2)
    assert placed_by_burst((a, much, far)) == (2,)
    assert placed_by_burst((a, much)) == ()
    assert placed_by_burst((a,)) == (0,) and placed_by_burst(()) == ()


def test_box_terms_skip_the_coarsest_maps_when_finer_ones_are_captured():
    """Coarse 4 x 4 and mid 8 x 8 maps (a UNet's two default levels): the box terms read the
    8 x 8 maps only; one size alone (an MMDiT's token grid, one level) is always read."""
    assert box_map_sizes([(4, 4), (8, 8), (8, 8)]) == {(8, 8)}
    assert box_map_sizes([(4, 4)]) == {(4, 4)}
    assert box_map_sizes([(8, 8), (16, 16), (4, 4)]) == {(8, 8), (16, 16)}
    torch.manual_seed(0)
    coarse, mid = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 8, 8)
    boxes = (Box("a", 0, 0, 0.3, 0.3), Box("b", 0.7, 0.7, 1, 1))
    objective = Objective((), (0, 1), boxes, "peak", 1.0)
    s = LossSettings()
    both = objective_terms([("coarse", coarse), ("mid", mid)], objective, s)
    mid_term = box_layer_loss(mid, (0, 1), boxes, "peak")
    # the loss is the mean over the two layers, the coarse one contributing nothing
    assert torch.allclose(both.loss, mid_term.sum() / 2)
    assert torch.allclose(both.per_image["boxes"], mid_term / 2)  # as the loss weighs it
    assert torch.allclose(objective_terms([("coarse", coarse)], objective, s).loss,
                          box_layer_loss(coarse, (0, 1), boxes, "peak").sum())


def test_injection_biases_only_the_object_columns_inside_the_box():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 5)  # (B, H, N, T)
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # the object (token 3) goes to the first two positions
    assert torch.equal(injection_bias(logits, [3], masks, 0.0), torch.zeros_like(logits))
    bias = injection_bias(logits, [3], masks, 0.5)
    spread = logits[..., 3].amax(-1) - logits[..., 3].amin(-1)
    assert torch.allclose(bias[..., :2, 3], 0.5 * spread[..., None].expand(1, 2, 2))
    assert bias[..., 2:, 3].abs().sum() == 0 and bias[..., [0, 1, 2, 4]].abs().sum() == 0


def test_injection_delta_is_zero_at_strength_zero_and_raises_the_object_inside():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.eye(5, 8)[None]
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(injection_delta(q, k, v, 2, [3], masks, 0.0), torch.zeros(1, 4, 8))
    d = injection_delta(q, k, v, 1, [3], masks, 1.0)  # one head: v's row 3 is the object's own value
    assert (d[0, :2, 3] > 0).all() and d[0, 2:].abs().max() < 1e-6


def test_planned_boxes_follow_the_relation():
    (a, b) = plan_boxes([("cat", "left", "dog")])
    assert a.object == "cat" and a.x1 < 0.5 < b.x0 and a.centre[1] == b.centre[1]
    (a, b) = plan_boxes([("cat", "above", "dog")])
    assert a.y1 < 0.5 < b.y0
    boxes = {x.object: x for x in plan_boxes([("cat", "left", "dog"), ("bird", "above", "dog")])}
    assert boxes["bird"].y0 < boxes["dog"].y0 and 0 <= boxes["bird"].y0 and boxes["bird"].y1 <= 1
    boxes = {x.object: x for x in plan_boxes([("cat", "left", "dog"), ("cat", "above", "car")])}
    assert boxes["car"].y0 > boxes["cat"].y0  # car below the already placed cat


def test_the_peak_loss_stops_pulling_an_object_in_its_box_that_ilgd_still_grows():
    """A softened map: a flat floor everywhere and the object's bump in its box. "ilgd" reads
    the floor outside as attention outside and still asks for more inside; "peak" reads only
    the attention above the map's mean, which is all in the box."""
    box = [Box("a", 0.0, 0.0, 0.5, 0.5)]
    bump = torch.zeros(4, 4)
    bump[:2, :2] = 1.0
    logits = (bump * 0.5).requires_grad_(True)  # soft: inside cells hold e^0.5 times the floor
    maps = torch.softmax(logits.flatten(), 0).view(1, 1, 4, 4)
    ilgd, peak = box_layer_loss(maps, [0], box, "ilgd"), box_layer_loss(maps, [0], box, "peak")
    assert ilgd.item() > 0.2 and peak.item() == 0.0
    g_ilgd, g_peak = torch.autograd.grad(ilgd.sum() + 0 * peak.sum(), logits, retain_graph=True)[0], \
        torch.autograd.grad(peak.sum(), logits)[0]
    assert (g_ilgd[:2, :2] < 0).all()  # ilgd: raise the inside further (grow the object to fill and past its box)
    assert g_peak.abs().max() == 0.0  # peak: nothing left to pull
    # an object half out of its box: peak pulls it in (raises its inside, lowers its outside)
    shifted = torch.roll(bump, 1, dims=1).requires_grad_(False)
    logits = (shifted * 0.5).requires_grad_(True)
    maps = torch.softmax(logits.flatten(), 0).view(1, 1, 4, 4)
    peak = box_layer_loss(maps, [0], box, "peak")
    assert peak.item() == pytest.approx(0.25)
    (g,) = torch.autograd.grad(peak.sum(), logits)
    assert g[0, 1] < 0 and g[0, 2] > 0  # the cell in the box up, the one beside it down


def test_peak_centre_pulls_an_object_formed_far_from_its_box_and_stops_in_its_middle():
    """An object whose whole peak lies outside its box: "peak" has no gradient at all (the
    box's cells are below the map's mean, so the peak is 0 there), "peak_centre" moves
    attention toward the box; centred in its box, both terms are 0."""
    box = [Box("a", 0.0, 0.0, 0.5, 0.5)]
    bump = torch.zeros(8, 8)
    bump[5:7, 5:7] = 1.0  # far corner
    logits = (bump * 2.0).requires_grad_(True)
    maps = torch.softmax(logits.flatten(), 0).view(1, 1, 8, 8)
    (g_peak,) = torch.autograd.grad(box_layer_loss(maps, [0], box, "peak").sum(), logits, retain_graph=True)
    assert g_peak.abs().max() == 0.0
    term = box_layer_loss(maps, [0], box, "peak_centre")
    # peak term 1, plus the centroid (0.75, 0.75) to the middle half [0.125, 0.375]^2: 0.375 * sqrt(2)
    assert term.item() == pytest.approx(1.0 + 0.375 * 2 ** 0.5, abs=1e-3)
    (g,) = torch.autograd.grad(term.sum(), logits)
    assert g[5, 5] < 0 < g[6, 6]  # descent: the bump's cell nearer the box up, the farther one down
    centred = torch.zeros(8, 8)
    centred[1:3, 1:3] = 1.0
    maps = torch.softmax((centred * 2.0).flatten(), 0).view(1, 1, 8, 8)
    assert box_layer_loss(maps, [0], box, "peak_centre").item() == pytest.approx(0.0, abs=1e-6)
    # several boxes at once equal each box alone
    two = torch.stack([maps[0, 0], torch.softmax((bump * 2.0).flatten(), 0).view(8, 8)])[None]
    boxes = [Box("a", 0.0, 0.0, 0.5, 0.5), Box("b", 0.5, 0.5, 1.0, 1.0)]
    assert box_layer_loss(two, (1, 0), boxes[::-1], "peak_centre").item() == pytest.approx(
        box_layer_loss(two[:, :1], [0], boxes[:1], "peak_centre").item()
        + box_layer_loss(two[:, 1:], [0], boxes[1:], "peak_centre").item(), abs=1e-6)
