"""Tier 1: guidance.trace, what a run keeps for InfSplign Attention Preview."""
import pytest
import torch

from infsplign.guidance.capture import CaptureStore, Layer
from infsplign.guidance.boxes import Box
from infsplign.guidance.losses import LossSettings, Objective, Pair, objective_loss, step_loss
from infsplign.guidance.relations import BoundRelation, Relation, SpatialRelations
from infsplign.guidance.trace import (MAX_IMAGES, MAX_SIDE, Trace, choose_steps, display_size, fingerprint,
                                      object_names, resample, summarise, term_losses)

RELS = SpatialRelations((BoundRelation(Relation("red cat", "left", "dog"), (2, 3), (6,)),
                         BoundRelation(Relation("red cat", "above", "car"), (2, 3), (9,))),
                        "a red cat left of a dog and above a car", "clip_l", 12)
SCHEDULE = (14.6, 6.0, 2.0, 0.5, 0.0)


def blob(b, k, h, w, centres):
    """(b, k, h, w) maps, a Gaussian blob per object at centres[k] = (x, y) in [0, 1]."""
    y = torch.linspace(0, 1, h).view(h, 1)
    x = torch.linspace(0, 1, w).view(1, w)
    maps = torch.stack([torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02) for cx, cy in centres])
    return maps.expand(b, k, h, w).clone()


def layers(b=2):
    centres = [(0.2, 0.3), (0.8, 0.6), (0.5, 0.9)]
    return [("coarse", blob(b, 3, 8, 8, centres)), ("mid", blob(b, 3, 16, 16, centres))]


def test_object_names_follow_the_map_slots():
    assert object_names(RELS) == ("red cat", "dog", "car")
    trace = Trace(RELS)
    assert trace.pairs == (Pair(0, 1, "left"), Pair(0, 2, "above"))


def test_summary_is_the_step_loss_per_image_and_the_centroids_the_loss_sees():
    s = LossSettings(orthogonal="l2")
    ls = layers()
    maps, centres, loss, spatial = summarise(ls, Trace(RELS).pairs, s)
    assert maps.shape == (2, 3, 16, 16) and centres.shape == (2, 3, 2) and loss.shape == spatial.shape == (2,)
    assert float(loss.sum()) == pytest.approx(float(step_loss(ls, Trace(RELS).pairs, s)), rel=1e-6)
    assert centres[0, 0].tolist() == pytest.approx([0.2, 0.3], abs=0.02)
    assert centres[0, 1].tolist() == pytest.approx([0.8, 0.6], abs=0.02)
    assert (spatial < loss).all()  # the loss adds the orthogonal and presence/balance terms
    assert maps.device.type == "cpu" and maps.dtype == torch.float32 and not maps.requires_grad


@pytest.mark.parametrize("which", ["relations", "boxes", "all four"])
def test_the_terms_add_up_to_the_objectives_loss(which):
    """term_losses splits objective_loss per image: each term weighted as the loss weights
    it, their sum the loss; only the terms the objective has."""
    s = LossSettings(orthogonal="l2")
    ls = layers()
    pairs = Trace(RELS).pairs
    boxes = dict(box_slots=(0, 1), boxes=(Box("red cat", 0.0, 0.0, 0.4, 0.5), Box("dog", 0.6, 0.5, 1.0, 1.0)),
                 box_loss="ilgd", box_weight=12.0)
    objective = {"relations": Objective(pairs, relation_weight=0.5),
                 "boxes": Objective((), **boxes),
                 "all four": Objective(pairs, **boxes, objects=(0, 1, 2), presence=1.0, separation=0.5)}[which]
    terms = term_losses(ls, objective, s)
    want = {"relations": ["relations"], "boxes": ["boxes"],
            "all four": ["relations", "boxes", "presence", "separation"]}[which]
    assert list(terms) == want
    assert all(t.shape == (2,) and (t > 0).all() for t in terms.values())
    total = sum(terms.values())
    assert float(total.sum()) == pytest.approx(float(objective_loss(ls, objective, s)), rel=1e-5)


def test_summary_keeps_the_first_images_and_no_graph():
    ls = [(level, m.repeat(6, 1, 1, 1).requires_grad_()) for level, m in layers()]
    maps, centres, loss, _ = summarise(ls, Trace(RELS).pairs, LossSettings())
    assert maps.shape[0] == centres.shape[0] == loss.shape[0] == MAX_IMAGES
    assert maps.grad_fn is None and loss.grad_fn is None


def test_display_size_is_the_finest_map_capped():
    assert display_size([(8, 8), (16, 16)]) == (16, 16)
    assert display_size([(64, 96), (32, 48)]) == (round(64 * MAX_SIDE / 96), MAX_SIDE)
    big = blob(1, 1, 64, 64, [(0.3, 0.7)])
    small = resample(big, (32, 32))
    assert small.shape[-2:] == (32, 32)
    assert small.sum() * 4 == pytest.approx(float(big.sum()), rel=1e-5)  # area mean
    grown = resample(blob(1, 1, 4, 4, [(0.3, 0.7)]), (16, 16))
    assert grown.shape[-2:] == (16, 16)


def test_a_run_records_steps_by_schedule_position():
    trace = Trace(RELS)
    run = trace.start(LossSettings(), guided=True)
    assert run.record(14.6, SCHEDULE, layers(), True, True) == 0
    assert run.record(2.0000001, SCHEDULE, layers(), False, False) == 2
    assert run.record(3.3, SCHEDULE, layers(), False, False) is None  # a sampler's sub-step
    assert run.record(2.0, SCHEDULE, layers(1), False, False) == 2  # a later prediction at the same sigma
    assert sorted(run.steps) == [0, 2] and run.total_steps == 4
    assert run.steps[2].maps.shape[0] == 1 and run.steps[0].maps.shape[0] == 2  # the later one replaced it
    assert run.steps[0].in_window and run.steps[0].applied and not run.steps[2].in_window
    assert [r.index for r in run.ordered()] == [0, 2]
    deltas = run.deltas(run.steps[0])
    assert deltas.shape == (2, 2)
    assert float(deltas[0, 0]) == pytest.approx(0.6, abs=0.03)  # dog x - cat x: the cat is left of it
    assert float(deltas[0, 1]) == pytest.approx(0.6, abs=0.03)  # car y - cat y: the cat is above it


def test_only_finished_runs_are_kept_at_most_max_runs_and_found_by_their_output():
    trace = Trace(RELS, max_runs=3)
    unfinished = trace.start(LossSettings(), guided=False)
    unfinished.record(14.6, SCHEDULE, layers(), False, False)
    assert not trace.runs  # an interrupted run never finishes: nothing half-written is seen
    outputs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    runs = []
    for out in outputs:
        run = trace.start(LossSettings(), guided=True)
        trace.finish(run, out)
        runs.append(run)
    assert list(trace.runs) == runs[-3:]
    assert trace.find(outputs[4].clone()) is runs[4] and trace.find(outputs[2]) is runs[2]
    assert trace.find(outputs[1]) is None  # dropped: older than the last three
    nudged = outputs[4].clone()
    nudged[0, 0, 0, 0] += 1e-6
    assert trace.find(nudged) is None
    same = trace.start(LossSettings(), guided=True)
    trace.finish(same, outputs[4])
    assert trace.find(outputs[4]) is same  # the newest of two equal outputs


def test_fingerprint_is_exact():
    x = torch.randn(1, 4, 8, 8)
    assert fingerprint(x) == fingerprint(x.clone())
    assert fingerprint(x) != fingerprint(x.double())
    assert fingerprint(x) != fingerprint(x.view(1, 4, 64))
    assert fingerprint(x.to(torch.bfloat16)) == fingerprint(x.to(torch.bfloat16).clone())


def test_choose_steps():
    assert choose_steps("auto", range(20)) == [0, 4, 8, 11, 15, 19]
    assert choose_steps(" AUTO ", [0, 1, 2]) == [0, 1, 2]
    assert choose_steps("0, 2,4", range(8)) == [0, 2, 4]
    assert choose_steps("4, 0, 4", range(8)) == [4, 0]
    with pytest.raises(ValueError, match=r'step 9 was not recorded; this run recorded steps 0-7'):
        choose_steps("1, 9", range(8))
    with pytest.raises(ValueError, match='write "auto" or step numbers'):
        choose_steps("first", range(8))
    with pytest.raises(ValueError, match="steps 0-2, 5"):
        choose_steps("3", [0, 1, 2, 5])
    with pytest.raises(ValueError, match="no step number given"):
        choose_steps(" , ", range(8))


def test_steps_recorded_as_groups_of_layers_summarise_like_single_layers():
    """The capture hands the trace groups of layers (L, B, K, h, w); the summary is the one
    of the same layers given one by one, and a step costs nothing until the run finishes."""
    s = LossSettings(orthogonal="l2")
    single = [("coarse", blob(2, 3, 8, 8, [(0.2, 0.3), (0.8, 0.6), (0.5, 0.9)])),
              ("coarse", blob(2, 3, 8, 8, [(0.3, 0.3), (0.7, 0.5), (0.5, 0.8)])),
              ("mid", blob(2, 3, 16, 16, [(0.2, 0.4), (0.8, 0.6), (0.4, 0.9)]))]
    grouped = [("coarse", torch.stack([single[0][1], single[1][1]])), ("mid", single[2][1].unsqueeze(0))]
    for a, b in zip(summarise(single, Trace(RELS).pairs, s), summarise(grouped, Trace(RELS).pairs, s)):
        assert torch.allclose(a, b, atol=1e-6)
    run = Trace(RELS).start(s, guided=True)
    run.record(14.6, SCHEDULE, grouped, True, True)
    run.record(6.0, SCHEDULE, grouped, False, False)
    assert run._recorded and not run._steps  # kept as given until summarised
    want = summarise(grouped, Trace(RELS).pairs, s)
    assert torch.allclose(run.steps[1].loss, want[2], atol=1e-6) and not run._recorded


def test_the_store_keeps_a_detached_copy_of_the_last_maps():
    store = CaptureStore(RELS, (Layer(3, 0, "coarse"),))
    store.capturing = True
    q = torch.randn(2, 16, 8, requires_grad=True)
    store.record(Layer(3, 0, "coarse"), q, torch.randn(2, 12, 8), 2, [0, 1], (4, 4))
    taken = store.take()
    assert taken[0][1].grad_fn is not None and store.last[0][1].grad_fn is None
    assert torch.equal(taken[0][1], store.last[0][1])
    assert store.take() == [] and len(store.last) == 1  # an empty take keeps the last maps
