"""Tier 3: InfSplign inside real workflows, next to what else they hold: LoRA, ControlNet,
ComfyUI's built-in model patches, samplers and schedulers, batches, sizes, img2img, cfg 1
and model compute dtypes (area, masked and combined conditioning: test_compat_conditioning.py). Every case runs a whole
prompt through ComfyUI's executor (inference mode on, real nodes, real loaders) on both
sampler paths where the case applies, and asserts three things: the output is finite,
guidance was applied (StepReports from the "infsplign" logger), and the partner still has
its own effect (its output differs from the run without it, or its effect is seen inside
the guided step).

Runs are small (64 x 64 px, 3 steps, the narrow SD1.x test model, every step guided) and
shared: a graph that several tests need runs once per module.
"""
from __future__ import annotations

import pytest

from compat_runs import (PATHS, SD1, STEPS, assert_guided, base, combine, differs, model_files,  # noqa: F401
                         run, with_controlnet, with_lora)
from graphs import insert_model_patch, set_latent, workflow

pytestmark = pytest.mark.host

# -- LoRA and ControlNet --------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_lora(run, path):
    """The real LoraLoader with a LoRA file for the test model: its weights (inference
    tensors once patched in the executor) work in the guided step's autograd, and the
    LoRA still changes both the attention the step reads and the image."""
    guided_lora = run(with_lora(workflow(SD1, path, steps=STEPS)))
    plain_lora = run(with_lora(workflow(SD1, path, steps=STEPS, guided=False)))
    guided = base(run, path)
    assert_guided(guided_lora)
    assert differs(guided_lora.latent, guided.latent)  # the LoRA's effect, under guidance
    assert guided_lora.reports[0].loss != pytest.approx(guided.reports[0].loss, rel=1e-4)
    assert differs(guided_lora.latent, plain_lora.latent)  # guidance still acts with the LoRA


@pytest.mark.parametrize("path", PATHS)
def test_controlnet(run, path):
    """ComfyUI's ControlNetLoader and ControlNetApplyAdvanced with a ControlNet file for
    the SD1.x test model. Its module is loaded inside the executor (inference tensors) and
    sits in the guided step's autograd graph; the control still changes the image."""
    guided_cn = run(with_controlnet(workflow(SD1, path, steps=STEPS)))
    assert_guided(guided_cn)
    guided = base(run, path)
    assert differs(guided_cn.latent, guided.latent)  # the control changes the guided image
    assert guided_cn.reports[0].loss != pytest.approx(guided.reports[0].loss, rel=1e-4)
    other_hint = run(with_controlnet(workflow(SD1, path, steps=STEPS), color=0x000000))
    assert_guided(other_hint)
    assert differs(guided_cn.latent, other_hint.latent)  # and follows its hint image
    plain_cn = run(with_controlnet(workflow(SD1, path, steps=STEPS, guided=False)))
    assert differs(guided_cn.latent, plain_cn.latent)


# -- ComfyUI's built-in model patches --------------------------------------------------

BUILTIN = {
    "FreeU_V2": {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2},
    "PerturbedAttentionGuidance": {"scale": 3.0},
    "SelfAttentionGuidance": {"scale": 0.5, "blur_sigma": 2.0},
    "RescaleCFG": {"multiplier": 0.7},
}
# Patches that act outside the sampler's own cond forward (an extra model pass in a
# post-CFG function, or the CFG combination): the maps InfSplign reads are unchanged by them.
# 128 px: the middle block sees 2 x 2 (at 64 px it is 1 x 1, where PAG's perturbation is
# the identity and FreeU_V2's feature normalisation divides by zero, with or without InfSplign).
PATCH_SIZE = 128
OUTSIDE_THE_FORWARD = {"PerturbedAttentionGuidance", "SelfAttentionGuidance", "RescaleCFG"}


@pytest.mark.parametrize("patch", list(BUILTIN))
@pytest.mark.parametrize("path, order", [("ksampler", "before"), ("ksampler", "after"), ("custom", "before")])
def test_builtin_model_patches(run, path, order, patch):
    """FreeU_V2, PerturbedAttentionGuidance, SelfAttentionGuidance and RescaleCFG (which owns
    sampler_cfg_function), applied to the model before or after InfSplign: guidance is
    applied and the patch keeps its effect.

    PAG and SAG run extra model passes inside the same prediction (on the cond with a
    perturbed self-attention, on the blurred uncond). Only the sampler's own cond forward
    is recorded: the first step's loss (same latent for both runs) equals the loss
    without the patch. Recording their passes too would average other maps in."""
    g = workflow(SD1, path, steps=STEPS, width=PATCH_SIZE, height=PATCH_SIZE)
    if order == "before":
        insert_model_patch(g, "patch", patch, **BUILTIN[patch])
    else:
        insert_model_patch(g, "patch", patch, after="apply", **BUILTIN[patch])
    patched, guided = run(g), base(run, path, width=PATCH_SIZE, height=PATCH_SIZE)
    assert_guided(patched)
    assert differs(patched.latent, guided.latent)  # the patch's own effect
    if patch in OUTSIDE_THE_FORWARD:
        assert patched.reports[0].loss == pytest.approx(guided.reports[0].loss, rel=1e-5)
        assert patched.reports[0].grad_norm == pytest.approx(guided.reports[0].grad_norm, rel=1e-4)
    else:  # FreeU_V2 rescales decoder features: the captured maps change with it
        assert patched.reports[0].loss != pytest.approx(guided.reports[0].loss, rel=1e-4)


# -- batches, sizes, img2img, cfg 1 ----------------------------------------------------

@pytest.mark.parametrize("path, batch", [("ksampler", 2), ("ksampler", 3), ("ksampler", 4), ("custom", 2)])
def test_batches_get_a_loss_per_image(run, path, batch):
    """Batch sizes 2 to 4 next to batch 1. The loss is per image (summed over the batch, so
    each image's gradient is its own): image 0 of the batch comes out as the batch-1 image
    (same noise), and every image of the batch is guided."""
    one, many = base(run, path), base(run, path, batch=batch)
    plain_many = base(run, path, batch=batch, guided=False)
    plain_one = base(run, path, guided=False)
    assert_guided(many)
    assert all(r.batch == batch for r in many.reports) and one.reports[0].batch == 1
    assert many.latent.shape[0] == batch
    effect = (one.latent[0] - plain_one.latent[0]).abs().max()
    assert effect > 1e-2 * plain_one.latent.abs().max()
    assert (many.latent[0] - one.latent[0]).abs().max() <= 1e-3 * effect
    for i in range(batch):
        assert differs(many.latent[i], plain_many.latent[i])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("width, height", [(80, 48), (72, 72)])
def test_non_square_and_odd_sizes(run, path, width, height):
    """640 x 384 and 520 x 520 scaled down for the narrow model: 80 x 48 px (5:3, a 10 x 6
    latent) and 72 x 72 px (an odd 9 x 9 latent, odd at every UNet level)."""
    res = base(run, path, width=width, height=height)
    assert_guided(res)
    assert res.latent.shape[-2:] == (height // 8, width // 8)
    assert differs(res.latent, base(run, path, width=width, height=height, guided=False).latent)


def img2img(g: dict, denoise: float = 0.6) -> dict:
    g["image"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x3366CC}}
    set_latent(g, "encode", {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 2]}})
    return g


@pytest.mark.parametrize("path", PATHS)
def test_img2img(run, path):
    """denoise 0.6 on a VAE-encoded image: the guided steps start below the full schedule's
    first sigma, every step of the shortened schedule is guided."""
    guided = run(img2img(workflow(SD1, path, steps=4, denoise=0.6)))
    plain = run(img2img(workflow(SD1, path, steps=4, denoise=0.6, guided=False)))
    txt2img = base(run, path)
    assert_guided(guided, steps=4)
    assert guided.reports[0].sigma < 0.5 * txt2img.reports[0].sigma
    assert differs(guided.latent, plain.latent)


@pytest.mark.parametrize("path", PATHS)
def test_cfg_one(run, path):
    """cfg 1.0: ComfyUI skips the uncond pass; the cond-only forward is guided."""
    guided, plain = base(run, path, cfg=1.0), base(run, path, cfg=1.0, guided=False)
    assert_guided(guided)
    assert differs(guided.latent, plain.latent)
    assert differs(guided.latent, base(run, path).latent)  # cfg 1 is not cfg 5


# -- samplers, schedulers, dtypes ------------------------------------------------------

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "ddim", "lcm"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform"]
COMBINATIONS = [(s, "normal") for s in SAMPLERS] + [("euler", s) for s in SCHEDULERS[1:]] + [("dpmpp_2m_sde", "karras")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sampler, scheduler", COMBINATIONS)
def test_samplers_and_schedulers(run, path, sampler, scheduler):
    """Every model call of these samplers is guided (the window is the whole schedule here)
    and the result differs from the same sampler and scheduler unguided."""
    guided = base(run, path, sampler=sampler, scheduler=scheduler)
    plain = base(run, path, sampler=sampler, scheduler=scheduler, guided=False)
    assert_guided(guided, steps=None)
    assert len(guided.reports) >= STEPS - 1  # one per model call; a final sigma-0 step may be skipped
    assert differs(guided.latent, plain.latent)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_model_compute_dtypes(run, path, dtype):
    """ModelComputeDtype makes the UNet compute in fp16 / bf16 (the result differs from
    fp32); the attention maps and the loss stay float32 and guidance is applied."""
    g = insert_model_patch(workflow(SD1, path, steps=STEPS), "dtype", "ModelComputeDtype", dtype=dtype)
    low = run(g)
    fp32 = run(insert_model_patch(workflow(SD1, path, steps=STEPS), "dtype", "ModelComputeDtype", dtype="fp32"))
    assert_guided(low)
    assert_guided(fp32)
    assert differs(low.latent, fp32.latent)
    assert low.reports[0].loss == pytest.approx(fp32.reports[0].loss, rel=0.05)  # same maps, in low precision
    assert differs(low.latent, run(insert_model_patch(workflow(SD1, path, steps=STEPS, guided=False),
                                                      "dtype", "ModelComputeDtype", dtype=dtype)).latent)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_model_weight_dtypes(run, path, dtype):
    """UNet weights stored in fp16 / bf16 (loaded by ComfyUI's checkpoint loading function
    with that dtype; on this CPU ComfyUI casts them per operation): guidance is applied on
    the cast weights, maps and loss in float32, and the rounded weights change the image."""
    def loaded(weight_dtype, guided=True):
        g = workflow(SD1, path, steps=STEPS, guided=guided)
        g["ckpt"] = {"class_type": "InfSplignTestModel", "inputs": {"topology": "sd1", "seed": 0,
                                                                    "weight_dtype": weight_dtype}}
        return run(g)
    low, fp32 = loaded(dtype), loaded("fp32")
    assert_guided(low)
    assert differs(low.latent, fp32.latent)
    assert differs(low.latent, loaded(dtype, guided=False).latent)


@pytest.mark.parametrize("topology", ["sd2v", "sdxl"])
def test_other_topologies_with_a_batch_at_a_non_square_size(run, topology):
    """The SD2.x-v and SDXL test models (other decoder layouts, v-prediction, two text
    encoders with adm) with a batch of 2 at 80 x 48 px and ConditioningCombine."""
    ckpt = f"infsplign_test_{topology}.safetensors"
    g = workflow(ckpt, "ksampler", steps=2, batch=2, width=80, height=48)
    g["pos2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a cat to the left of a dog, photo"}}
    guided = run(combine(g, ("pos", 0), ("pos2", 0)))
    plain_g = workflow(ckpt, "ksampler", steps=2, batch=2, width=80, height=48, guided=False)
    plain_g["pos2"] = g["pos2"]
    plain = run(combine(plain_g, ("pos", 0), ("pos2", 0)))
    assert_guided(guided, steps=2)
    assert all(r.batch == 2 for r in guided.reports)
    assert guided.latent.shape == (2, 4, 6, 10)
    for i in range(2):
        assert differs(guided.latent[i], plain.latent[i])


# -- an output_block_patch that merges the skip itself (hsp None) ------------------------

MERGE = {"blocks": "3,4,5,6,7,8,9,10,11", "scale": 0.9, "tag": "merge"}


@pytest.mark.parametrize("path, order", [("ksampler", "before"), ("ksampler", "after"), ("custom", "before")])
def test_output_block_patch_that_hands_on_no_skip(run, host, path, order):
    """Another pack's output_block_patch joins the skip connection itself and returns
    hsp = None (ComfyUI 0.33 accepts it; older hosts fail in their own torch.cat, with or
    without InfSplign, and the test is skipped there). Guidance is applied through it, the
    patch ran on every output block of every step, and it changes the image."""
    import nodes
    calls = nodes.NODE_CLASS_MAPPINGS["InfSplignTestSkipMerge"].calls  # the class ComfyUI loaded
    plain = host.execute(insert_model_patch(workflow(SD1, path, steps=1, guided=False), "merge",
                                            "InfSplignTestSkipMerge", **MERGE))
    if not plain.success:
        pytest.skip(f"ComfyUI {host.version()} does not accept hsp None from an output_block_patch "
                    f"({plain.error()[:120]})")
    g = workflow(SD1, path, steps=STEPS)
    if order == "before":
        insert_model_patch(g, "merge", "InfSplignTestSkipMerge", **MERGE)
    else:
        insert_model_patch(g, "merge", "InfSplignTestSkipMerge", after="apply", **MERGE)
    calls.clear()
    merged = run(g)
    assert_guided(merged)
    # 9 blocks, in the cond and the uncond pass of each step (a guarded patch runs once more
    # per block on the first guided step, on copies, to see whether it writes in place)
    assert calls["merge"] >= 9 * STEPS * 2
    assert differs(merged.latent, base(run, path).latent)
