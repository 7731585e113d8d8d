"""Tier 3: InfSplign Refine (GSN) through the real executor.

- iterations 0 is bitwise plain sampling, on both sampler paths;
- the refinement changes only its step: the sampler's latents before it are the plain
  run's exactly, the step's own input is the refined latent, later steps follow from it;
- it leaks onto no other branch and no later prompt, and leaves nothing on the model;
- stacked with InfSplign (KSampler) on one model (both orders), memory low == fast,
  `continuous`, a prompt without relations through Spatial Relation Parse's `objects`;
- bad input gets messages that name the value.
"""
from __future__ import annotations

import pytest
import torch

from graphs import workflow, with_plain_branch
from compat_runs import Runner, differs
from test_robustness import assert_nothing_left, leftovers

pytestmark = pytest.mark.host
SD1 = "infsplign_test_sd1.safetensors"
TEXT = "a cat to the left of a dog"
STEPS = 4
REFINE = {"presence": 1.0, "separation": 0.5, "spatial": 1.0, "refine_percent": 0.5, "iterations": 3,
          "learning_rate": 0.05, "continuous": False}
PATHS = ["ksampler", "custom"]


@pytest.fixture(scope="module")
def run(host, checkpoints):
    return Runner(host)


def refined(path="ksampler", guided=False, text=TEXT, steps=STEPS, objects="", after=False, **settings) -> dict:
    """workflow() with InfSplign Refine ("refine") on the model the sampler (or guider) reads;
    with `guided`, InfSplign's guidance too (refine before it, or after it with `after`)."""
    refine = {**REFINE, **{k: settings.pop(k) for k in list(settings) if k in REFINE or k in (
        "continuous_strength", "continuous_end_percent", "temperature", "memory")}}
    g = workflow(SD1, path, text=text, steps=steps, guided=guided, **settings)
    if objects:
        g["parse"]["inputs"]["objects"] = objects
    consumer = ("apply" if path == "ksampler" else "guider") if guided else ("sample" if path == "ksampler"
                                                                            else "guider")
    node = {"class_type": "InfSplignRefine", "inputs": {"model": ["ckpt", 0], "relations": ["parse", 0], **refine}}
    if guided and after:
        g["refine"] = node
        node["inputs"]["model"] = ["apply", 0] if path == "ksampler" else ["ckpt", 0]
        if path == "ksampler":
            g["sample"]["inputs"]["model"] = ["refine", 0]
        else:  # InfSplign Guider takes the refined model
            g["guider"]["inputs"]["model"] = ["refine", 0]
            g["refine"]["inputs"]["model"] = ["ckpt", 0]
        return g
    g["refine"] = node
    g[consumer]["inputs"]["model"] = ["refine", 0]
    return g


def plain(path="ksampler", steps=STEPS) -> dict:
    return workflow(SD1, path, text=TEXT, steps=steps, guided=False)


def steps(res) -> list:
    """The guided steps' StepReports of a run (its RefineReport left out)."""
    return [r for r in res.reports if hasattr(r, "grad_norm")]


def trace_of(session, node: str):
    """The newest finished run of the capture on node `node`'s MODEL output."""
    from comfy.patcher_extension import WrappersMP
    model = session.output(node)
    (wrapper,) = model.get_wrappers(WrappersMP.OUTER_SAMPLE, "infsplign.capture")
    return wrapper.trace.runs[-1]


@pytest.mark.parametrize("path", PATHS)
def test_zero_iterations_is_plain_sampling(run, path):
    assert torch.equal(run(refined(path, iterations=0)).latent, run(plain(path)).latent)


@pytest.mark.parametrize("path", PATHS)
def test_refinement_changes_only_its_step(host, checkpoints, path):
    """Refined at 50 % of 4 steps = step 2: the maps the sampler's own forward saw at steps 0
    and 1 are the capture-only run's exactly (so were the latents), step 2 reads the refined
    latent, and the image differs."""
    session = host.Session()
    g = refined(path, iterations=5)
    first = session.execute(g)
    assert first.success, first.error()
    run = trace_of(session, "refine")
    assert run.refinement is not None and run.refinement.step == 2 and not run.refinement.skipped
    assert len(run.refinement.losses) == 5 and run.refinement.final < run.refinement.losses[0]
    observe = refined(path, iterations=0)
    observe["refine"] = {"class_type": "InfSplignAttentionCapture", "inputs": {
        "model": ["ckpt", 0], "relations": ["parse", 0], "layers": "auto"}}
    second = session.execute(observe)
    assert second.success, second.error()
    reference = trace_of(session, "refine")
    assert sorted(run.steps) == sorted(reference.steps) == list(range(STEPS))
    for i in (0, 1):
        assert torch.equal(run.steps[i].maps, reference.steps[i].maps), i
    assert differs(run.steps[2].maps, reference.steps[2].maps)
    latent = host.saved_latents(first, "save_latent")[0]
    assert differs(latent, host.saved_latents(second, "save_latent")[0]) and torch.isfinite(latent).all()


def test_refinement_leaks_onto_no_other_branch_and_no_later_prompt(host, checkpoints):
    g = refined("ksampler")
    with_plain_branch(g)
    session = host.Session()
    left = leftovers()
    first = session.execute(g)
    assert first.success, first.error()
    reference = host.saved_latents(host.execute(plain()), "save_latent")[0]
    assert torch.equal(host.saved_latents(first, "save_b")[0], reference)
    later = session.execute(plain())
    assert later.success, later.error()
    assert torch.equal(host.saved_latents(later, "save_latent")[0], reference)
    source = session.output("ckpt")
    assert not source.get_wrappers("sampler_sample", "infsplign.refine")
    options = source.model_options.get("transformer_options", {})
    assert not options.get("patches") and not options.get("patches_replace")
    assert_nothing_left(left)


@pytest.mark.parametrize("after", [False, True])
def test_stacked_with_infsplign_guidance(run, after):
    """Refine before or after InfSplign (KSampler) on one model: both act (the guided steps
    are reported, the image differs from guidance alone and from refinement alone)."""
    both = run(refined("ksampler", guided=True, after=after, strength=50.0))
    guided_only = run(workflow(SD1, "ksampler", text=TEXT, steps=STEPS, strength=50.0))
    refine_only = run(refined("ksampler"))
    assert steps(both) and all(r.applied for r in steps(both))
    assert differs(both.latent, guided_only.latent) and differs(both.latent, refine_only.latent)


def test_low_memory_refinement_equals_fast(run):
    fast = run(refined("ksampler", memory="fast", batch=2))
    low = run(refined("ksampler", memory="low", batch=2))
    assert (fast.latent - low.latent).abs().max() <= 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_continuous_adds_a_gradient_step_in_its_window(run, path):
    cont = run(refined(path, continuous=True, continuous_end_percent=0.5, continuous_strength=50.0))
    assert len(steps(cont)) == STEPS // 2 and all(r.applied and r.grad_norm > 0 for r in steps(cont))
    assert differs(cont.latent, run(refined(path)).latent)


def test_objects_without_relation(run):
    """"a cat, a dog and a bird" has no relation: with `objects` the parse accepts it and the
    refinement acts on the three objects."""
    text = "a cat, a dog and a bird"
    g = refined("ksampler", text=text, objects="cat, dog, bird", spatial=0.0)
    res = run(g)
    plain_g = workflow(SD1, "ksampler", text=text, steps=STEPS, guided=False)
    del plain_g["parse"]
    assert differs(res.latent, run(plain_g).latent)


@pytest.mark.parametrize("change, needle", [
    ({"iterations": 201}, "iterations"),
    ({"refine_percent": 1.5}, "refine_percent"),
    ({"learning_rate": 0.0}, "learning_rate"),
])
def test_bad_settings_are_refused_naming_the_input(host, checkpoints, change, needle):
    """The widgets' limits: ComfyUI's validation refuses the prompt and names the input (the
    node's own messages for values that reach it are tier 1's test_refine)."""
    with pytest.raises(AssertionError, match=needle):
        host.Session().execute(refined("ksampler", **change))


def test_no_objects_is_a_clear_error(host, checkpoints):
    g = refined("ksampler", text="a cat and a dog")
    res = host.Session().execute(g)
    assert not res.success and "No spatial relation" in res.error()


def test_preview_shows_the_refinement_step(host, checkpoints):
    """Attention Preview on the refined MODEL: the loss plot grows a panel with the loss per
    iteration (a line in the first image colour) and marks the refined step (dashed)."""
    from testkit.pack import module
    plot_module = module("preview.plot")
    g = refined("ksampler", iterations=6)
    g["preview"] = {"class_type": "InfSplignAttentionPreview", "inputs": {
        "latent": ["sample", 0], "steps": "auto", "size": 64, "model": ["refine", 0]}}
    session = host.Session()
    res = session.execute(g)
    assert res.success, res.error()
    maps, plot = session.cached("preview").outputs[0][0], session.cached("preview").outputs[1][0]
    run = trace_of(session, "refine")
    steps_only = plot_module._render_steps(run, 64)
    assert plot.shape[1] > steps_only.height  # the refinement panel is below the step panels
    panel = (plot[0, steps_only.height:] * 255).round().to(torch.uint8).reshape(-1, 3)
    line = torch.tensor(plot_module.IMAGE_COLOURS[0], dtype=torch.uint8)
    assert int((panel == line).all(dim=1).sum()) > 50
    top = (plot[0, :steps_only.height] * 255).round().to(torch.uint8).reshape(-1, 3)
    dash = torch.tensor(plot_module.REFINE_COLOUR, dtype=torch.uint8)
    assert int((top == dash).all(dim=1).sum()) > 20
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("ckpt", ["infsplign_test_sd2v.safetensors", "infsplign_test_sdxl.safetensors"])
def test_refinement_on_sd2v_and_sdxl(run, ckpt):
    """v-prediction (SD2.x) and SDXL's conds (pooled output, size embedding) go through the
    refinement's cond forward; iterations 0 stays plain."""
    def graph(iterations):
        g = workflow(ckpt, "ksampler", text=TEXT, steps=STEPS, guided=False)
        g["refine"] = {"class_type": "InfSplignRefine", "inputs": {
            "model": ["ckpt", 0], "relations": ["parse", 0], **{**REFINE, "iterations": iterations}}}
        g["sample"]["inputs"]["model"] = ["refine", 0]
        return g
    plain_g = workflow(ckpt, "ksampler", text=TEXT, steps=STEPS, guided=False)
    refined_run = run(graph(3))
    assert differs(refined_run.latent, run(plain_g).latent) and torch.isfinite(refined_run.latent).all()
    (report,) = [r for r in refined_run.reports if hasattr(r, "losses")]
    assert report.step == 2 and len(report.losses) == 3 and not report.skipped
    assert torch.equal(run(graph(0)).latent, run(plain_g).latent)
