"""Tier 3: InfSplign Layout Boxes through the real executor.

- injection 0 with every loss at strength 0 is bitwise plain sampling; injection changes
  the steps of its window only and leaks onto no other branch and no later prompt;
- the box loss is one more term of the same guided step: its window, both sampler paths,
  memory `low` equal to `fast`;
- injection composes with another pack's attn2 patch on the captured layers, both orders;
- boxes planned from relations; bad boxes are clear errors that name the value.
"""
from __future__ import annotations

import json

import pytest
import torch

from graphs import workflow, with_plain_branch
from compat_runs import Runner, differs
from test_robustness import assert_nothing_left, leftovers

pytestmark = pytest.mark.host
SD1 = "infsplign_test_sd1.safetensors"
TEXT = "a cat and a dog"
BOXES = json.dumps([{"object": "cat", "box": [0.05, 0.1, 0.45, 0.6]}, {"object": "dog", "box": [0.55, 0.4, 0.95, 0.9]}])
STEPS = 4
# the placing burst is off here (the tests of its own below turn it on): the other tests look
# at the injection and the per-step box loss alone
LAYOUT = {"injection": 0.75, "injection_end_percent": 0.5, "box_loss": "maalign", "box_weight": 1.0,
          "box_end_percent": 0.5, "placing_iterations": 0}
PATHS = ["ksampler", "custom"]


@pytest.fixture(scope="module")
def run(host, checkpoints):
    return Runner(host)


def boxed(path="ksampler", boxes=BOXES, text=TEXT, ckpt=SD1, relations=False, steps=STEPS, **settings) -> dict:
    """workflow() whose guidance node reads InfSplign Layout Boxes ("layout") (relations
    merged in when `relations`)."""
    layout = {k: settings.pop(k) for k in list(settings) if k in LAYOUT or k in ("box_margin", "placing_percent")}
    g = workflow(ckpt, path, text=text, steps=steps, **settings)
    node = "apply" if path == "ksampler" else "guider"
    g["layout"] = {"class_type": "InfSplignLayout", "inputs": {
        "clip": ["ckpt", 1], "text": text, "boxes": boxes, **{**LAYOUT, **layout}}}
    if relations:
        g["layout"]["inputs"]["relations"] = ["parse", 0]
    else:
        del g["parse"]
    g[node]["inputs"]["relations"] = ["layout", 0]
    return g


def plain(path="ksampler", text=TEXT, steps=STEPS) -> dict:
    g = workflow(SD1, path, text=text, steps=steps, guided=False)
    del g["parse"]
    return g


@pytest.mark.parametrize("path", PATHS)
def test_no_injection_and_strength_zero_is_plain_sampling(run, path):
    off = run(boxed(path, injection=0.0, strength=0.0))
    assert torch.equal(off.latent, run(plain(path)).latent)
    # the box loss was observed on the steps of its window (maps read, nothing applied)
    assert len(off.reports) == STEPS // 2 and all(not r.applied and r.box == r.box for r in off.reports)


@pytest.mark.parametrize("path", PATHS)
def test_injection_changes_sampling_and_only_inside_its_window(run, path):
    injected = run(boxed(path, strength=0.0))
    assert differs(injected.latent, run(plain(path)).latent)
    assert torch.isfinite(injected.latent).all()
    # a window that ends before the first step: no injection at all
    closed = run(boxed(path, strength=0.0, injection_end_percent=0.0))
    assert torch.equal(closed.latent, run(plain(path)).latent)
    # a longer window changes more than a shorter one changes: the window is honoured
    longer = run(boxed(path, strength=0.0, injection_end_percent=1.0))
    assert differs(longer.latent, injected.latent)


def test_injection_leaks_onto_no_other_branch_and_no_later_prompt(host, checkpoints):
    """One prompt, two branches from the same MODEL: A with the layout's injection and box
    loss, B plain (it waits for A). B equals a plain run; so does the next prompt; nothing
    is left on the model."""
    g = boxed("ksampler")
    with_plain_branch(g)
    session = host.Session()
    left = leftovers()
    first = session.execute(g)
    assert first.success, first.error()
    b = host.saved_latents(first, "save_b")[0]
    reference = host.saved_latents(host.execute(plain()), "save_latent")[0]
    assert torch.equal(b, reference)
    later = session.execute(plain())
    assert later.success, later.error()
    assert torch.equal(host.saved_latents(later, "save_latent")[0], reference)
    source = session.output("ckpt")
    options = source.model_options.get("transformer_options", {})
    assert not options.get("patches") and not options.get("patches_replace")
    assert_nothing_left(left)


@pytest.mark.parametrize("path", PATHS)
def test_box_loss_guides_the_steps_of_its_window(run, path):
    res = run(boxed(path, injection=0.0, strength=30.0))
    assert len(res.reports) == STEPS // 2
    assert all(r.applied and r.grad_norm > 0 and r.box > 0 for r in res.reports), res.reports
    assert differs(res.latent, run(plain(path)).latent)
    # no relation in the prompt: the spatial term has no pair
    assert all(r.spatial == 0 for r in res.reports)


@pytest.mark.parametrize("box_loss", ["ilgd", "maalign", "peak", "peak_centre"])
def test_box_losses_and_injection_in_low_memory_equal_fast(run, box_loss):
    fast = run(boxed("ksampler", box_loss=box_loss, strength=30.0, memory="fast", batch=2))
    low = run(boxed("ksampler", box_loss=box_loss, strength=30.0, memory="low", batch=2))
    assert {r.memory_mode for r in fast.reports} == {"fast"} and {r.memory_mode for r in low.reports} == {"low"}
    assert (fast.latent - low.latent).abs().max() <= 1e-5


def test_box_margin_reads_near_boxes_apart_and_leaves_boxes_apart_enough_as_drawn(run):
    near = json.dumps([{"object": "cat", "box": [0.05, 0.1, 0.45, 0.6]},
                       {"object": "dog", "box": [0.47, 0.4, 0.87, 0.9]}])
    drawn = run(boxed(boxes=near, box_loss="peak", injection=0.0, strength=30.0, box_margin=0.0))
    apart = run(boxed(boxes=near, box_loss="peak", injection=0.0, strength=30.0, box_margin=0.2))
    assert differs(apart.latent, drawn.latent) and apart.reports[0].box != drawn.reports[0].box
    assert all(r.applied and r.box > 0 for r in apart.reports) and torch.isfinite(apart.latent).all()
    # BOXES lie 0.1 apart: a margin of 0.1 changes nothing
    assert torch.equal(run(boxed(box_loss="peak", injection=0.0, strength=30.0, box_margin=0.1)).latent,
                       run(boxed(box_loss="peak", injection=0.0, strength=30.0, box_margin=0.0)).latent)


def placing_run(session, g: dict):
    """The newest run of the capture on the guidance node's MODEL: (its trace, the result)."""
    from comfy.patcher_extension import WrappersMP
    res = session.execute(g)
    assert res.success, res.error()
    (wrapper,) = session.output("apply").get_wrappers(WrappersMP.OUTER_SAMPLE, "infsplign.capture")
    return wrapper.trace.runs[-1], res


def test_placing_burst_descends_the_box_loss_at_its_step_only(host, checkpoints):
    """placing_iterations at placing_percent 0.5 of 4 steps = step 2: the maps of steps 0 and 1
    are the run's without placing exactly, the box loss falls over the burst, the image differs;
    strength 0 only observes, so it places nothing."""
    session = host.Session()
    placed, res = placing_run(session, boxed(box_loss="peak_centre", strength=30.0, placing_iterations=5,
                                             placing_percent=0.5))
    burst = placed.refinement
    assert burst is not None and burst.step == 2 and not burst.skipped and burst.source == "Layout Boxes placing"
    assert len(burst.losses) == 5 and burst.final < burst.losses[0], burst.losses
    latent = host.saved_latents(res, "save_latent")[0]
    unplaced, res0 = placing_run(session, boxed(box_loss="peak_centre", strength=30.0, placing_iterations=0))
    assert unplaced.refinement is None
    for i in (0, 1):
        assert torch.equal(placed.steps[i].maps, unplaced.steps[i].maps), i
    assert differs(latent, host.saved_latents(res0, "save_latent")[0]) and torch.isfinite(latent).all()
    observed, _ = placing_run(session, boxed(box_loss="peak_centre", strength=0.0, placing_iterations=5,
                                             placing_percent=0.5))
    assert observed.refinement is None


def test_placing_burst_leaves_out_boxes_that_overlap_much(host, checkpoints):
    """Two boxes overlapping by 0.3 of their 0.4 width: no burst (the summary says why); a third
    box apart from them: the burst pulls on it alone; overlapping by 0.1: the burst as usual."""
    session = host.Session()
    settings = {"box_loss": "peak_centre", "strength": 30.0, "placing_iterations": 3, "placing_percent": 0.5}
    much = json.dumps([{"object": "cat", "box": [0.1, 0.3, 0.5, 0.7]}, {"object": "dog", "box": [0.2, 0.3, 0.6, 0.7]}])
    trace, res = placing_run(session, boxed(boxes=much, **settings))
    assert trace.refinement is None and torch.isfinite(host.saved_latents(res, "save_latent")[0]).all()
    assert 'leaving out "cat", "dog" (boxes overlapping much)' in session.output("layout", 1)
    text = "a cat and a dog and a bird"
    three = json.dumps([*json.loads(much), {"object": "bird", "box": [0.7, 0.05, 0.95, 0.3]}])
    trace, _ = placing_run(session, boxed(boxes=three, text=text, **settings))
    assert trace.refinement is not None and len(trace.refinement.losses) == 3
    # the burst's objective holds the bird's box alone
    from infsplign.engine.step_terms import refine_objective
    from infsplign.guidance.capture import CaptureStore
    from infsplign.guidance.refine import RefineSettings
    relations = session.output("layout")
    objective = refine_objective(CaptureStore(relations=relations, layers=()), RefineSettings(presence=0.0, boxes=1.0))
    (bird,) = [b for b in relations.boxes if b.box.object == "bird"]
    assert [b.object for b in objective.boxes] == ["bird"] and len(objective.box_slots) == 1
    # read as the box loss reads it with all three (0.1 from the dog's box: moved 0.05 back)
    assert objective.boxes[0].corners == pytest.approx((0.75, 0.05, 0.95, 0.3)) and bird.box.x0 == 0.7
    little = json.dumps([{"object": "cat", "box": [0.1, 0.3, 0.5, 0.7]}, {"object": "dog", "box": [0.4, 0.3, 0.8, 0.7]}])
    trace, _ = placing_run(session, boxed(boxes=little, **settings))
    assert trace.refinement is not None and len(trace.refinement.losses) == 3


def test_infsplign_refine_on_the_model_takes_the_place_of_the_placing_burst(host, checkpoints):
    """One burst per run: with InfSplign Refine before the guidance node, its step (0.75 of 4
    steps = 3) and its settings are the run's, not the placing burst's (step 1)."""
    g = boxed(box_loss="peak_centre", strength=30.0, placing_iterations=5, placing_percent=0.25)
    g["refine"] = {"class_type": "InfSplignRefine", "inputs": {
        "model": ["ckpt", 0], "relations": ["layout", 0], "presence": 1.0, "separation": 0.0, "spatial": 0.0,
        "refine_percent": 0.75, "iterations": 2, "learning_rate": 0.05, "continuous": False}}
    g["apply"]["inputs"]["model"] = ["refine", 0]
    trace, _ = placing_run(host.Session(), g)
    assert trace.refinement.step == 3 and len(trace.refinement.losses) == 2
    assert trace.refinement.source == "InfSplign Refine"


def test_boxes_and_relations_together(run):
    """Relations merged in: the step's loss has the spatial term and the box term."""
    text = "a cat to the left of a dog"
    res = run(boxed("ksampler", text=text, relations=True, strength=30.0, end_percent=0.5, injection=0.0))
    assert len(res.reports) == STEPS // 2
    assert all(r.applied and r.spatial == r.spatial and r.box > 0 for r in res.reports), res.reports


@pytest.mark.parametrize("path", PATHS)
def test_boxes_planned_from_relations(run, path):
    text = "a cat to the left of a dog"
    res = run(boxed(path, boxes="[]", text=text, relations=True, strength=30.0, injection=0.0))
    assert len(res.reports) == STEPS // 2 and all(r.applied and r.box > 0 for r in res.reports)


@pytest.mark.parametrize("order", ["before", "after"])
def test_injection_composes_with_another_packs_attention_patch(run, order):
    """The other pack's attn2 patch on the captured layers runs on every step and its effect
    is kept; the injection still acts next to it."""
    import nodes
    calls = nodes.NODE_CLASS_MAPPINGS["InfSplignTestAttentionPatch"].calls

    def graph(scale, injection):
        tag = f"boxes-{order}-{scale}-{injection}"
        g = boxed("ksampler", strength=0.0, injection=injection, injection_end_percent=1.0)
        g["other"] = {"class_type": "InfSplignTestAttentionPatch", "inputs": {
            "model": ["ckpt", 0], "blocks": "3,4,5,6,7,8", "tag": tag, "scale": scale}}
        if order == "before":
            g["apply"]["inputs"]["model"] = ["other", 0]
        else:
            g["other"]["inputs"]["model"] = ["apply", 0]
            g["sample"]["inputs"]["model"] = ["other", 0]
        return g, tag
    latents = {}
    for scale, injection in ((1.0, 0.75), (0.5, 0.75), (1.0, 0.0)):
        g, tag = graph(scale, injection)
        latents[scale, injection] = run(g).latent
        assert calls[tag] >= 6 * STEPS
    assert differs(latents[1.0, 0.75], latents[0.5, 0.75])  # the other patch still acts
    assert differs(latents[1.0, 0.75], latents[1.0, 0.0])  # and so does the injection


@pytest.mark.parametrize("boxes, message", [
    ("[{'object': 'cat'}]", "not valid JSON"),
    (json.dumps([{"object": "cat", "box": [0.5, 0.1, 0.4, 0.6]}]), "x0 < x1"),
    (json.dumps([{"object": "cat", "box": [0.1, 0.1, 1.4, 0.6]}]), "[0, 1]"),
    (json.dumps([{"object": "horse", "box": [0.1, 0.1, 0.4, 0.6]}]), "horse"),
    (json.dumps([{"object": "cat", "box": [0.1, 0.1, 0.4, 0.6]}, {"object": "cat", "box": [0.5, 0.1, 0.9, 0.6]}]),
     "two boxes"),
    (json.dumps([{"object": "cat", "box": [0, 0, 0.1, 0.1]}] * 17), "16"),
    ("[]", "No boxes"),
])
def test_bad_boxes_are_clear_errors(host, checkpoints, boxes, message):
    res = host.execute(boxed("ksampler", boxes=boxes))
    assert not res.success
    assert message in res.error(), res.error()


def test_attention_preview_draws_each_box_on_its_objects_maps(host, checkpoints):
    """The preview's map cells of a boxed run carry each object's box outline (white inside
    black) on that object's row, at the box's place in the cell."""
    from test_robustness import loaded_pack
    preview, choose_steps = loaded_pack("preview.maps"), loaded_pack("guidance.trace").choose_steps
    size = 64
    g = boxed("ksampler", strength=30.0, injection=0.0)
    g["preview"] = {"class_type": "InfSplignAttentionPreview", "inputs": {
        "latent": ["sample", 0], "model": ["apply", 0], "steps": "auto", "size": size}}
    session = host.Session()
    res = session.execute(g)
    assert res.success, res.error()
    from comfy.patcher_extension import WrappersMP
    (wrapper,) = session.output("apply").get_wrappers(WrappersMP.OUTER_SAMPLE, "infsplign.capture")
    (run,) = wrapper.trace.runs
    assert [slot for slot, _ in run.boxes] == [0, 1] and "in a box" in preview.relation_text(run)
    maps = session.output("preview", 0)[0].numpy()
    lay = preview.maps_layout(run, choose_steps("auto", sorted(run.steps)), size)
    boxes = json.loads(BOXES)
    for k, box in enumerate(b["box"] for b in boxes):
        x0, y0, x1, y1 = lay.cell(0, k, 0)
        cell = maps[y0:y1, x0:x1]
        cw, ch = cell.shape[1], cell.shape[0]
        top = int(round(box[1] * (ch - 1)))
        left, right = int(round(box[0] * (cw - 1))) + 3, int(round(box[2] * (cw - 1))) - 3
        edge = cell[top, left:right]
        assert (edge > 0.99).all(axis=-1).mean() > 0.9, (k, edge)  # the white line of the box's top edge
