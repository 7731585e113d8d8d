"""Tier 3: InfSplign when things go wrong, through ComfyUI's real executor: a gradient that
is not finite, an interrupt in the middle of a guided step, many prompts in a row, graphs
whose other branches share the source MODEL, and inputs that cannot work (another model
family, relations from another CLIP or text, settings out of range), which must fail with
a message that names the value and the fix.
"""
from __future__ import annotations

import gc

import psutil
import pytest
import torch

from graphs import execute_logged as execute, with_plain_branch
from graphs import insert_model_patch, workflow

pytestmark = pytest.mark.host
SD1 = "infsplign_test_sd1.safetensors"
SD2 = "infsplign_test_sd2v.safetensors"
SDXL = "infsplign_test_sdxl.safetensors"
SD3 = "infsplign_test_sd3_dm.safetensors"  # the narrow SD3 of the mmdit_files fixture
PATHS = ["ksampler", "custom"]
STEPS = 3


def latent(host, run, node="save_latent"):
    assert run.success, run.error()
    return host.saved_latents(run, node)[0]


def loaded_pack(sub: str):
    """A module of the pack as ComfyUI loaded it (custom_nodes/infsplign, under its own
    module name: not the `infsplign` package tier 1 imports)."""
    import sys

    import nodes
    prefix = nodes.NODE_CLASS_MAPPINGS["InfSplignApply"].__module__.rsplit(".nodes.", 1)[0]
    return sys.modules[f"{prefix}.{sub}"]


def leftovers() -> dict:
    """What a finished prompt must not leave alive: capture stores, tensors still holding
    an autograd graph, and model patchers carrying a capture patch or a run's store."""
    import comfy.model_patcher
    CaptureStore = loaded_pack("guidance.capture").CaptureStore
    hooks = loaded_pack("engine.hooks")
    gc.collect()
    found = {"stores": 0, "graph_tensors": 0, "patched_models": 0}
    for obj in gc.get_objects():
        kind = type(obj)  # (not isinstance: some module objects warn when asked their class)
        try:
            if kind is CaptureStore:
                found["stores"] += 1
            elif issubclass(kind, torch.Tensor) and obj.grad_fn is not None:
                found["graph_tensors"] += 1
            elif issubclass(kind, comfy.model_patcher.ModelPatcher):
                options = obj.model_options.get("transformer_options", {})
                attn2 = options.get("patches_replace", {}).get("attn2", {})
                if hooks.RUN_KEY in options or any(
                        getattr(f, "__qualname__", "").startswith("capture_patch.") for f in attn2.values()):
                    found["patched_models"] += 1
        except ReferenceError:
            pass
    return found


def assert_nothing_left(before: dict) -> None:
    """Nothing more alive than before the test's prompts (other tests of the session may
    hold tensors with a graph of their own; capture stores and patched models: none)."""
    now = leftovers()
    assert now["stores"] == 0 and now["patched_models"] == 0, now
    assert now["graph_tensors"] <= before["graph_tensors"], (before, now)


# -- a gradient that is not finite -----------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_non_finite_gradient_is_skipped_and_the_image_stays_finite(host, checkpoints, path):
    """A partner patch whose backward gives NaN (forward untouched): every guided step's
    gradient is NaN. Each is skipped with a warning, the prediction stays the sampler's
    own, and the image is finite and equal to unguided sampling with the same patch."""
    session = host.Session()
    g = insert_model_patch(workflow(SD1, path, steps=STEPS), "fault", "InfSplignTestFault",
                           fault="nan_gradient", blocks="3", tag=f"nan-{path}")
    run, reports, warnings = execute(session, g)
    out = latent(host, run)
    plain = insert_model_patch(workflow(SD1, path, steps=STEPS, guided=False), "fault", "InfSplignTestFault",
                               fault="nan_gradient", blocks="3", tag=f"nan-{path}")
    reference = latent(host, execute(session, plain)[0])
    assert torch.isfinite(out).all()
    assert len(reports) == STEPS and all(r.skipped == "gradient is not finite" and not r.applied for r in reports)
    assert len([w for w in warnings if "gradient is not finite" in w.getMessage()]) == STEPS
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


# -- interrupt ------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_interrupt_in_a_guided_step_leaves_nothing_behind(host, checkpoints, path):
    """ComfyUI's interrupt, requested in the middle of a guided step's forward (autograd
    on, maps half captured): the prompt stops as interrupted; afterwards no capture store,
    no autograd graph and no capture patch is alive, grad mode is as before, and the next
    prompts in the same session (guided, then plain) give what a fresh server gives."""
    import comfy.model_management
    import nodes
    fault = nodes.NODE_CLASS_MAPPINGS["InfSplignTestFault"]
    session = host.Session()
    before = leftovers()
    grad_mode = torch.is_grad_enabled()
    g = insert_model_patch(workflow(SD1, path, steps=STEPS), "fault", "InfSplignTestFault",
                           fault="interrupt", blocks="3,4,5,6,7,8", tag=f"interrupt-{path}")
    run, reports, _ = execute(session, g)
    assert not run.success
    assert [e for e, _ in run.messages if e == "execution_interrupted"], run.messages
    assert fault.calls[f"interrupt-{path}"] >= 1 and not reports  # stopped inside the first guided step
    assert not comfy.model_management.processing_interrupted()
    assert torch.is_grad_enabled() == grad_mode and not torch.is_inference_mode_enabled()
    assert_nothing_left(before)

    guided, plain = workflow(SD1, path, steps=STEPS, seed=11), workflow(SD1, path, steps=STEPS, seed=11, guided=False)
    run, reports, _ = execute(session, guided)
    assert len(reports) == STEPS and all(r.applied for r in reports)
    assert torch.equal(latent(host, run), latent(host, host.execute(guided)))
    assert torch.equal(latent(host, session.execute(plain)), latent(host, host.execute(plain)))
    assert_nothing_left(before)


# -- many prompts ---------------------------------------------------------------------

def test_twenty_guided_prompts_do_not_grow_resident_memory(host, checkpoints):
    """20 guided prompts in a row in one session (as a server runs them), each re-sampled
    (new seed), with FreeU_V2 on the model (a patch that writes into its inputs, which
    under autograd leaves reference cycles unless guarded): resident memory after the 20th
    is within 40 MB of after the 3rd warm-up prompt (measured here: +0.0 MB), and no run
    leaves a capture store or a tensor with an autograd graph alive."""
    session = host.Session()
    proc = psutil.Process()
    left = leftovers()

    def prompt(seed):
        g = workflow(SD1, "ksampler", steps=STEPS, seed=seed, width=128, height=128)
        insert_model_patch(g, "freeu", "FreeU_V2", b1=1.3, b2=1.4, s1=0.9, s2=0.2)
        run, reports, _ = execute(session, g)
        assert run.success and len(reports) == STEPS, run.error()

    for seed in range(3):
        prompt(seed)
    gc.collect()
    before = proc.memory_info().rss
    for seed in range(100, 120):
        prompt(seed)
    gc.collect()
    grown = proc.memory_info().rss - before
    print(f"resident memory after 20 guided prompts: {grown / 2**20:+.1f} MB")
    assert grown < 40 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MB over 20 guided prompts"
    assert_nothing_left(left)


# -- no leak onto the source MODEL or other branches ------------------------------------

def test_patches_stay_off_the_source_model_and_other_branches(host, checkpoints):
    """One prompt, one loaded checkpoint, two branches: A samples with InfSplign, then B
    (which waits for A: its latent is A's output times 0) samples plain from the same
    source MODEL. B equals a plain run on a fresh server, A equals a guided run on a fresh
    server, only A's steps are guided, and the source MODEL carries no InfSplign wrapper,
    patch or run state afterwards."""
    from comfy.patcher_extension import WrappersMP
    g = workflow(SD1, "ksampler", steps=STEPS)
    with_plain_branch(g)
    session = host.Session()
    left = leftovers()
    run, reports, _ = execute(session, g)
    a, b = latent(host, run), latent(host, run, "save_b")
    assert len(reports) == STEPS
    assert torch.equal(a, latent(host, host.execute(workflow(SD1, "ksampler", steps=STEPS))))
    assert torch.equal(b, latent(host, host.execute(workflow(SD1, "ksampler", steps=STEPS, guided=False))))

    source = session.output("ckpt")
    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE, WrappersMP.CALC_COND_BATCH):
        assert not source.get_wrappers(kind, "infsplign.capture") + source.get_wrappers(kind, "infsplign.guidance") \
            + source.get_wrappers(kind, "infsplign.split")
    options = source.model_options.get("transformer_options", {})
    assert not options.get("patches") and not options.get("patches_replace")
    assert_nothing_left(left)


# -- clear errors ---------------------------------------------------------------------

def guided_with(ckpt_model: list, relations: list, path: str, **settings) -> dict:
    """A guided SD1 graph whose InfSplign node takes another model and/or relations."""
    g = workflow(SD1, path, steps=2, **settings)
    node = "apply" if path == "ksampler" else "guider"
    g[node]["inputs"]["model"] = ckpt_model
    g[node]["inputs"]["relations"] = relations
    return g


@pytest.mark.parametrize("path", PATHS)
def test_an_sd3_model_given_relations_of_an_sd1_clip_is_refused(host, checkpoints, mmdit_files, path):
    """An SD3 model from UNETLoader with relations parsed on SD1's CLIP: the two encoders are named."""
    g = guided_with(["unet", 0], ["parse", 0], path)
    g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": SD3, "weight_dtype": "default"}}
    run = host.execute(g)
    assert not run.success
    assert "parsed with a clip_l CLIP, but this model is SD3 / SD3.5" in run.error(), run.error()
    assert "Connect the CLIP that encodes the positive prompt" in run.error()


@pytest.mark.parametrize("path, other, family, encoder", [
    ("ksampler", SD2, "SD2.x", "clip_h"), ("custom", SDXL, "SDXL", "clip_g+clip_l")])
def test_relations_parsed_with_another_clip_family_are_refused(host, checkpoints, path, other, family, encoder):
    g = guided_with(["ckpt", 0], ["parse_other", 0], path)
    g["other"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": other}}
    g["parse_other"] = {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["other", 1],
                                                                           "text": "a cat to the left of a dog"}}
    run = host.execute(g)
    assert not run.success
    assert (f"The relations were parsed with a {encoder} CLIP ({family}), but this model is SD1.x, "
            "whose prompts are encoded by clip_l.") in run.error()
    assert "Connect the CLIP of the checkpoint that encodes the positive prompt to Spatial Relation Parse" in run.error()


def test_attention_capture_node_refuses_another_clip_family(host, checkpoints):
    g = workflow(SD1, "ksampler", steps=2)
    g["other"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD2}}
    g["parse_other"] = {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["other", 1],
                                                                           "text": "a cat to the left of a dog"}}
    g["capture"] = {"class_type": "InfSplignAttentionCapture", "inputs": {
        "model": ["ckpt", 0], "relations": ["parse_other", 0], "layers": "auto"}}
    g["apply"]["inputs"]["model"] = ["capture", 0]
    run = host.execute(g)
    assert not run.success and "parsed with a clip_h CLIP (SD2.x)" in run.error()


@pytest.mark.parametrize("path", PATHS)
def test_token_positions_beyond_the_conditioning_are_refused(host, checkpoints, path):
    """Relations parsed from a longer text than the positive prompt: the objects' token
    positions lie beyond the conditioning's 77 tokens."""
    long_text = ", ".join(["highly detailed"] * 30) + ", a cat left of a dog"
    g = guided_with(["ckpt", 0], ["parse_long", 0], path)
    g["parse_long"] = {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["ckpt", 1], "text": long_text}}
    run = host.execute(g)
    assert not run.success
    assert "beyond the conditioning's 77 tokens" in run.error()
    assert "Connect the positive prompt's text to Spatial Relation Parse" in run.error()


@pytest.mark.parametrize("path", PATHS)
def test_settings_out_of_range_name_the_value_and_the_fix(host, checkpoints, path):
    run = host.execute(workflow(SD1, path, steps=2, start_percent=0.5, end_percent=0.25))
    assert not run.success
    assert "start_percent 0.5 / end_percent 0.25: need 0 <= start_percent < end_percent <= 1" in run.error()
    # values outside a widget's range never reach the node: ComfyUI's validation names them
    with pytest.raises(AssertionError, match=r"(?s)strength.*-5"):
        host.execute(workflow(SD1, path, steps=2, strength=-5.0))
