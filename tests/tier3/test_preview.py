"""Tier 3: InfSplign Attention Preview through the real executor: after a guided KSampler
run, a SamplerCustomAdvanced + InfSplign Guider run and a capture-only run (which must stay
bit-identical to plain sampling); the run is picked by its output LATENT; wrong inputs are
clear errors; an interrupted run leaves nothing the preview could trip on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graphs import execute_logged, insert_model_patch, workflow
from test_robustness import assert_nothing_left, leftovers, loaded_pack

pytestmark = pytest.mark.host
SD1 = "infsplign_test_sd1.safetensors"
STEPS = 6
END = 0.5  # steps 0-2 guided, 3-5 observed
SIZE = 64
SHAPE = {"width": 128, "height": 128, "batch": 2}


def graph(path="ksampler", guided=True, seed=7, **settings):
    return workflow(SD1, path, steps=STEPS, seed=seed, guided=guided, end_percent=END, **SHAPE, **settings)


def with_preview(g, node="preview", latent=("sample", 0), **inputs):
    g[node] = {"class_type": "InfSplignAttentionPreview",
               "inputs": {"latent": list(latent), "steps": "auto", "size": SIZE, **inputs}}
    return g


def with_capture_only(g, consumer="sample"):
    """Attention Capture Patch between the checkpoint and the (plain) sampler or guider."""
    g["capture"] = {"class_type": "InfSplignAttentionCapture", "inputs": {
        "model": ["ckpt", 0], "relations": ["parse", 0], "layers": "auto"}}
    g[consumer]["inputs"]["model"] = ["capture", 0]
    return g


def execute(session, g):
    """(run, [StepReport]) of one prompt."""
    run, reports, _ = execute_logged(session, g)
    return run, reports


def output(session, node, index=0):
    return session.output(node, index)


def trace_of(patcher):
    from comfy.patcher_extension import WrappersMP
    (wrapper,) = patcher.get_wrappers(WrappersMP.OUTER_SAMPLE, "infsplign.capture")
    return wrapper.trace


def previews(session, node="preview"):
    return output(session, node, 0), output(session, node, 1)


def cells(maps, lay, image, obj):
    """The map cells of one image's object row, one per column, as arrays."""
    arr = maps[0].numpy()
    return [arr[y0:y1, x0:x1] for x0, y0, x1, y1 in (lay.cell(image, obj, j) for j in range(lay.columns))]


@pytest.fixture(scope="module")
def guided(host, checkpoints):
    """A guided KSampler run with the preview on InfSplign (KSampler)'s MODEL."""
    session = host.Session()
    run, reports = execute(session, with_preview(graph(), model=["apply", 0]))
    assert run.success, run.error()
    return session, run, reports, previews(session)


def test_guided_run_preview_shows_every_step_and_the_loss(host, guided):
    import folder_paths
    session, run, reports, (maps, plot) = guided
    preview, choose_steps = loaded_pack("preview.maps"), loaded_pack("guidance.trace").choose_steps
    (trace_run,) = trace_of(output(session, "apply")).runs
    assert sorted(trace_run.steps) == list(range(STEPS)) and trace_run.guided and trace_run.batch == 2
    records = trace_run.ordered()
    assert [r.in_window for r in records] == [True] * 3 + [False] * 3
    assert [r.applied for r in records] == [True] * 3 + [False] * 3
    # the trace's loss is the guided step's own (summed over the batch), and finite everywhere
    assert len(reports) == 3
    for rec, rep in zip(records, reports):
        assert rec.sigma == pytest.approx(rep.sigma) and float(rec.loss.sum()) == pytest.approx(rep.loss, rel=1e-5)
        assert float(rec.spatial.sum()) == pytest.approx(rep.spatial, rel=1e-5)
    assert all(torch.isfinite(r.loss).all() and torch.isfinite(r.maps).all() for r in records)

    steps = choose_steps("auto", list(range(STEPS)))
    lay = preview.maps_layout(trace_run, steps, SIZE)
    assert lay.columns == STEPS and lay.images == 2 and lay.objects == 2
    assert maps.shape == (1, lay.height, lay.width, 3) and plot.shape[0] == 1 and plot.shape[-1] == 3
    for image in (maps, plot):
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    for b in range(2):
        for k in range(2):
            row = cells(maps, lay, b, k)
            assert all(np.unique(c.reshape(-1, 3), axis=0).shape[0] > 50 for c in row)  # a map, not a flat fill
            assert all(not np.array_equal(x, y) for x, y in zip(row, row[1:])), (b, k)  # each step its own
    # the loss plot draws one line per image, in its colour, and shades the guidance window
    pixels = (plot[0] * 255).round().to(torch.uint8).reshape(-1, 3)
    for colour in (*preview.IMAGE_COLOURS[:2], preview.WINDOW):
        assert int((pixels == torch.tensor(colour, dtype=torch.uint8)).all(dim=1).sum()) > 100, colour
    # the node shows both images, saved to the temp folder, equal to its outputs
    ui = run.outputs["preview"]["images"]
    assert [im["type"] for im in ui] == ["temp", "temp"]
    for im, tensor in zip(ui, (maps, plot)):
        png = np.asarray(Image.open(Path(folder_paths.get_temp_directory()) / im["subfolder"] / im["filename"]))
        assert np.array_equal(png, np.clip(255.0 * tensor[0].numpy(), 0, 255).astype(np.uint8))


def test_steps_and_size_choose_the_columns_and_the_cell_size(host, guided):
    session = guided[0]
    preview = loaded_pack("preview.maps")
    g = with_preview(graph(), model=["apply", 0])
    g["preview"]["inputs"].update(steps="0, 3, 5", size=96)
    run, reports = execute(session, g)
    assert run.success, run.error()
    assert not reports  # the sampler was cached: the preview reads the run kept on the model
    (trace_run,) = trace_of(output(session, "apply")).runs
    maps, _ = previews(session)
    lay = preview.maps_layout(trace_run, [0, 3, 5], 96)
    assert lay.columns == 3 and maps.shape == (1, lay.height, lay.width, 3)
    x0, y0, x1, y1 = lay.cell(0, 0, 1)
    assert (x1 - x0, y1 - y0) == (96, 96)
    g["preview"]["inputs"]["steps"] = "0, 9"
    run, _ = execute(session, g)
    assert not run.success and "step 9 was not recorded; this run recorded steps 0-5" in run.error()


def test_custom_sampler_with_infsplign_guider(host, checkpoints, guided):
    """Same seed and settings as the KSampler run: the same trace, so the same pictures."""
    session = host.Session()
    run, reports = execute(session, with_preview(graph("custom"), guider=["guider", 0]))
    assert run.success, run.error()
    assert len(reports) == 3
    (trace_run,) = trace_of(output(session, "guider").model_patcher).runs
    assert sorted(trace_run.steps) == list(range(STEPS))
    maps, plot = previews(session)
    k_maps, k_plot = guided[3]
    assert torch.equal(maps, k_maps) and torch.equal(plot, k_plot)


@pytest.mark.parametrize("path", ["ksampler", "custom"])
def test_the_loss_reads_maps_at_the_guidance_temperature(host, checkpoints, path):
    """temperature softens the maps the loss (and so the trace) reads. Step 0 sees the same
    latent at both temperatures, so its maps differ only by the softmax: flatter at 4."""
    spread = {}
    for temperature in (1.0, 4.0):
        session = host.Session()
        run, reports = execute(session, graph(path, temperature=temperature))
        assert run.success, run.error()
        patcher = output(session, "apply") if path == "ksampler" else output(session, "guider").model_patcher
        (trace_run,) = trace_of(patcher).runs
        maps = trace_run.steps[0].maps  # (images, objects, h, w)
        spread[temperature] = maps.amax(dim=(-2, -1)) / maps.mean(dim=(-2, -1))
        assert reports[0].applied
    assert (spread[4.0] < spread[1.0]).all(), spread


@pytest.mark.parametrize("path", ["ksampler", "custom"])
def test_capture_only_run_is_bit_identical_and_previews(host, checkpoints, path):
    """Attention Capture Patch alone (no guidance): the sampler's latents are bit-identical
    to plain sampling, every step is recorded (observed, none guided), and its maps and
    losses are those a strength-0 guided run (same loss settings) records."""
    session = host.Session()
    consumer = "sample" if path == "ksampler" else "guider"
    g = with_capture_only(graph(path, guided=False), consumer)
    with_preview(g, **({"model": ["capture", 0]} if path == "ksampler" else {"guider": ["guider", 0]}))
    run, reports = execute(session, g)
    assert run.success, run.error()
    assert not reports  # nothing guided, nothing logged per step
    plain = host.execute(graph(path, guided=False))
    assert torch.equal(host.saved_latents(run, "save_latent")[0], host.saved_latents(plain, "save_latent")[0])

    (observed,) = trace_of(output(session, "capture")).runs
    assert not observed.guided and sorted(observed.steps) == list(range(STEPS))
    assert not any(r.in_window or r.applied for r in observed.ordered())
    maps, plot = previews(session)
    assert maps.shape[1] > 100 and torch.isfinite(maps).all() and torch.isfinite(plot).all()

    zero = host.Session()
    run0, _ = execute(zero, graph(path, strength=0.0, orthogonal="none"))
    assert run0.success, run0.error()
    node = "apply" if path == "ksampler" else "guider"
    patcher = output(zero, node) if path == "ksampler" else output(zero, node).model_patcher
    (strength0,) = trace_of(patcher).runs
    assert observed.settings == strength0.settings
    for a, b in zip(observed.ordered(), strength0.ordered()):
        assert a.index == b.index and torch.allclose(a.maps, b.maps, atol=1e-6)
        assert torch.allclose(a.loss, b.loss, atol=1e-6) and torch.allclose(a.centroids, b.centroids, atol=1e-6)


def _panels(plot) -> int:
    """How many panels the loss plot draws: the top and bottom edges of their frames (the
    outline's grey) met going down a column just inside the frames (they start at x = 70)."""
    column = (plot[0, :, 75] * 255).round().to(torch.uint8)
    grey = (column == torch.tensor((90, 90, 90), dtype=torch.uint8)).all(dim=1).tolist()
    edges = sum(1 for y in range(1, len(grey)) if grey[y] and not grey[y - 1])
    return edges // 2 if edges % 2 == 0 else -1


@pytest.mark.parametrize("relations", [False, True], ids=["boxes_only", "relations_and_boxes"])
def test_the_loss_plot_shows_every_term_that_guided_the_run(host, checkpoints, relations):
    """Layout Boxes with no relation: each step records the box term (the guided steps' box
    loss of the log, summed over the batch; observed after its window), no relation term, and
    the plot has one panel, the box loss, titled with its settings. With relations merged in:
    both terms, their sum the guided step's loss, and panels for the sum, each term and the
    spatial term."""
    from test_layout_boxes import boxed
    preview = loaded_pack("preview.plot")
    text = "a cat to the left of a dog" if relations else "a cat and a dog"
    g = boxed("ksampler", text=text, relations=relations, strength=30.0, end_percent=0.5, injection=0.0,
              steps=STEPS, batch=2, width=128, height=128)
    with_preview(g, model=["apply", 0])
    session = host.Session()
    run, reports = execute(session, g)
    assert run.success, run.error()
    (trace_run,) = trace_of(output(session, "apply")).runs
    records = trace_run.ordered()
    terms = ["relations", "boxes"] if relations else ["boxes"]
    assert len(records) == STEPS and all(sorted(r.terms) == sorted(terms) for r in records), records[0].terms
    assert preview.plotted_terms(trace_run) == terms
    assert len(reports) == STEPS // 2 and all(r.applied for r in reports)
    for rec, rep in zip(records, reports):  # the guided steps, both windows open
        assert rec.applied and float(rec.terms["boxes"].sum()) == pytest.approx(rep.box, rel=1e-5)
        total = sum(float(t.sum()) for t in rec.terms.values())
        assert total == pytest.approx(rep.loss, rel=1e-5)
    assert all(torch.isfinite(t).all() for r in records for t in r.terms.values())
    assert all(not r.applied for r in records[len(reports):])  # observed after the windows
    assert "maalign, weight 1, steps before 0.5" in preview.term_settings(trace_run, "boxes")
    _, plot = previews(session)
    assert _panels(plot) == (4 if relations else 1), _panels(plot)


def test_a_model_used_by_two_samplers_previews_each_run(host, checkpoints, guided):
    """Two KSamplers on one InfSplign (KSampler) MODEL: each preview shows the run that
    produced its LATENT, not the newest run of the model."""
    session = guided[0]  # "sample" (seed 7) is cached there: its run is the fixture's
    g = graph()
    g["sample_b"] = {"class_type": "KSampler", "inputs": {**g["sample"]["inputs"], "seed": 8}}
    with_preview(g, "preview_b", latent=("sample_b", 0), model=["apply", 0])
    run, reports = execute(session, g)
    assert run.success, run.error()
    assert len(reports) == 3  # only sample_b sampled
    maps_b, plot_b = previews(session, "preview_b")
    with_preview(g, model=["apply", 0])  # now the newest run is sample_b's
    run, reports = execute(session, g)
    assert run.success, run.error()
    assert not reports and len(trace_of(output(session, "apply")).runs) == 2
    maps_a, plot_a = previews(session)
    assert torch.equal(maps_a, guided[3][0]) and torch.equal(plot_a, guided[3][1])
    assert not torch.equal(maps_b, maps_a) and not torch.equal(plot_b, plot_a)


def test_a_latent_no_run_produced_is_a_clear_error(host, guided):
    g = graph()
    g["changed"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["sample", 0], "multiplier": 0.5}}
    run = guided[0].execute(with_preview(g, latent=("changed", 0), model=["apply", 0]))
    assert not run.success
    assert "produced the connected LATENT" in run.error()
    assert "Connect the LATENT that this model's sampler produced" in run.error()


@pytest.mark.parametrize("inputs, message", [
    ({}, "connect `model` or `guider`"),
    ({"model": ["ckpt", 0]}, "carries no InfSplign attention capture"),
])
def test_missing_or_uncaptured_model_is_a_clear_error(host, guided, inputs, message):
    run = guided[0].execute(with_preview(graph(), **inputs))
    assert not run.success and message in run.error(), run.error()


def test_an_interrupted_run_is_not_kept_and_the_next_one_previews(host, checkpoints):
    """ComfyUI's interrupt inside the first guided step: the model's trace keeps no run.
    The same prompt again (the fault fires once) samples to the end; its preview shows all
    steps of that run only, and nothing of a run's state stays alive."""
    import comfy.model_management
    session = host.Session()
    before = leftovers()
    g = insert_model_patch(with_preview(graph(), model=["apply", 0]), "fault", "InfSplignTestFault",
                           fault="interrupt", blocks="3,4,5,6,7,8", tag="interrupt-preview")
    run, _ = execute(session, g)
    assert not run.success and [e for e, _ in run.messages if e == "execution_interrupted"]
    assert not comfy.model_management.processing_interrupted()
    trace = trace_of(output(session, "apply"))
    assert not trace.runs
    run, reports = execute(session, g)
    assert run.success, run.error()
    assert len(reports) == 3 and trace_of(output(session, "apply")) is trace
    (kept,) = trace.runs
    assert sorted(kept.steps) == list(range(STEPS))
    assert_nothing_left(before)


def test_drawing_copes_with_any_recorded_values(host):
    """Maps that are NaN, all zero or flat, several relations with "near", a non-square
    latent and a margin beyond the image: both pictures are drawn, of the planned size."""
    trace_mod, drawing, plotting = loaded_pack("guidance.trace"), loaded_pack("preview.maps"), loaded_pack("preview.plot")
    rel, losses = loaded_pack("guidance.relations"), loaded_pack("guidance.losses")
    relations = rel.SpatialRelations((
        rel.BoundRelation(rel.Relation("cat", "left", "dog"), (2,), (5,)),
        rel.BoundRelation(rel.Relation("cat", "near", "old car"), (2,), (8, 9))), "", "clip_l", 12)
    run = trace_mod.Trace(relations).start(losses.LossSettings(margin=0.7), guided=True)
    schedule = (10.0, 5.0, 2.0, 1.0, 0.0)
    maps = torch.rand(3, 3, 6, 9, generator=torch.Generator().manual_seed(0))
    for sigma, m in zip(schedule, (maps, torch.full_like(maps, float("nan")), torch.zeros_like(maps),
                                   torch.ones_like(maps))):
        finer = m.repeat_interleave(2, -1).repeat_interleave(2, -2)
        assert run.record(sigma, schedule, [("coarse", m), ("mid", finer)], sigma > 3, sigma > 6) is not None
    steps = [0, 1, 2, 3]
    maps_img, plot_img = drawing.render_maps(run, steps, 72), plotting.render_loss(run, 72)
    lay = drawing.maps_layout(run, steps, 72)
    assert maps_img.size == (lay.width, lay.height) and lay.objects == 3 and lay.images == 3
    assert lay.cell_h == 48  # 6 x 9 maps in 72 px wide cells
    assert plot_img.size[0] >= 520 and plot_img.size[1] > 400
