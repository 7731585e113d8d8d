"""Tier 3: InfSplign inside real workflows, next to what else they hold: LoRA, ControlNet,
ComfyUI's built-in model patches, samplers and schedulers, batches, sizes, img2img, cfg 1,
area / masked / combined conditioning and model compute dtypes. Every case runs a whole
prompt through ComfyUI's executor (inference mode on, real nodes, real loaders) on both
sampler paths where the case applies, and asserts three things: the output is finite,
guidance was applied (StepReports from the "infsplign" logger), and the partner still has
its own effect (its output differs from the run without it, or its effect is seen inside
the guided step).

Runs are small (64 x 64 px, 3 steps, the narrow SD1.x test model, every step guided) and
shared: a graph that several tests need runs once per module.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import pytest
import torch

from graphs import Collect, cond_consumer, insert_model_patch, set_latent, workflow

pytestmark = pytest.mark.host
SD1 = "infsplign_test_sd1.safetensors"
LORA = "infsplign_test_sd1_lora.safetensors"
CONTROLNET = "infsplign_test_sd1_controlnet.safetensors"
PATHS = ["ksampler", "custom"]
STEPS = 3


@dataclass
class Result:
    reports: list
    latent: torch.Tensor
    warnings: list[str] = field(default_factory=list)


class Runner:
    """Executes graphs in one executor session (the checkpoint loads once, as on a server)
    and remembers each graph's result."""

    def __init__(self, host):
        self.host, self.session, self.cache = host, host.Session(), {}

    def __call__(self, graph: dict) -> Result:
        key = json.dumps(graph, sort_keys=True)
        if key not in self.cache:
            logger, collect = logging.getLogger("infsplign"), Collect()
            level = logger.level
            logger.addHandler(collect)
            logger.setLevel(logging.INFO)
            try:
                run = self.session.execute(graph)
            finally:
                logger.removeHandler(collect)
                logger.setLevel(level)
            assert run.success, run.error()
            self.cache[key] = Result(
                [r.infsplign for r in collect.records if hasattr(r, "infsplign")],
                self.host.saved_latents(run, "save_latent")[0],
                [r.getMessage() for r in collect.records if r.levelno >= logging.WARNING])
        return self.cache[key]


@pytest.fixture(scope="module")
def model_files(host, tmp_path_factory):
    """A LoRA and a ControlNet generated for the SD1.x test model, in folders that ComfyUI's
    folder_paths knows, so LoraLoader and ControlNetLoader list and load them."""
    import folder_paths
    from testkit import files
    loras, controlnets = tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("controlnet")
    files.save_lora(str(loras / LORA), "sd1")
    files.save_controlnet(str(controlnets / CONTROLNET), "sd1")
    folder_paths.add_model_folder_path("loras", str(loras))
    folder_paths.add_model_folder_path("controlnet", str(controlnets))
    return loras, controlnets


@pytest.fixture(scope="module")
def run(host, checkpoints, model_files):
    return Runner(host)


def assert_guided(res: Result, steps: int | None = STEPS):
    assert torch.isfinite(res.latent).all()
    assert res.reports, "no guided step was logged"
    if steps is not None:
        assert len(res.reports) == steps
    assert all(r.applied and r.grad_norm > 0 and not r.skipped for r in res.reports), res.reports
    assert all(r.maps_dtype == "float32" for r in res.reports)


def differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """a and b differ by more than rounding: max |a - b| > rel * max |b|."""
    return bool((a - b).abs().max() > rel * b.abs().max())


def base(run, path, **kw) -> Result:
    return run(workflow(SD1, path, steps=STEPS, **kw))


# -- LoRA and ControlNet --------------------------------------------------------------

def with_lora(g: dict, strength: float = 1.0) -> dict:
    g["lora"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": LORA,
        "strength_model": strength, "strength_clip": strength}}
    for node in g.values():
        inputs = node["inputs"]
        if inputs.get("model") == ["ckpt", 0] and node["class_type"] != "BasicScheduler" and node is not g["lora"]:
            inputs["model"] = ["lora", 0]
        if inputs.get("clip") == ["ckpt", 1] and node is not g["lora"]:
            inputs["clip"] = ["lora", 1]
    return g


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


def with_controlnet(g: dict, color: int = 0xFFFFFF, strength: float = 1.0) -> dict:
    g["cn_load"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    g["cn_hint"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}}
    consumer = cond_consumer(g)
    g["cn_apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": g[consumer]["inputs"]["positive"], "negative": g[consumer]["inputs"]["negative"],
        "control_net": ["cn_load", 0], "image": ["cn_hint", 0], "strength": strength,
        "start_percent": 0.0, "end_percent": 1.0}}
    g[consumer]["inputs"]["positive"] = ["cn_apply", 0]
    g[consumer]["inputs"]["negative"] = ["cn_apply", 1]
    return g


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


# -- area, masked and combined conditioning --------------------------------------------

def positive(g: dict, node_id: str, node: dict) -> dict:
    """Feed `node` (built on the positive prompt "pos") to the sampler / guider as positive."""
    g[node_id] = node
    g[cond_consumer(g)]["inputs"]["positive"] = [node_id, 0]
    return g


# ConditioningSetArea takes 64 px at least: these cases run at 128 x 128 px, the area (and
# the mask) being the left half.
AREA_SIZE = 128


def area(g: dict, cond=("pos", 0)) -> dict:
    g["area"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": list(cond), "width": AREA_SIZE // 2, "height": AREA_SIZE, "x": 0, "y": 0, "strength": 1.0}}
    return g


def combine(g: dict, a, b, node_id: str = "combine") -> dict:
    return positive(g, node_id, {"class_type": "ConditioningCombine",
                                 "inputs": {"conditioning_1": list(a), "conditioning_2": list(b)}})


def left_half_mask(g: dict) -> dict:
    g["mask_zero"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": AREA_SIZE, "height": AREA_SIZE}}
    g["mask_half"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": AREA_SIZE // 2, "height": AREA_SIZE}}
    g["mask"] = {"class_type": "MaskComposite", "inputs": {
        "destination": ["mask_zero", 0], "source": ["mask_half", 0], "x": 0, "y": 0, "operation": "add"}}
    return g


CROP_WARNING = "covers only part of the latent"


@pytest.mark.parametrize("path", PATHS)
def test_area_conditioning_next_to_a_full_one(run, path):
    """ConditioningSetArea (left half) combined with the full prompt. The area cond runs on
    a crop of the latent, so its attention maps are of the crop: it is not recorded (one
    warning says so), and the guided step reads the full cond alone, exactly as without the
    area cond (same first-step loss). The area cond still shapes the image."""
    g = workflow(SD1, path, steps=STEPS, width=AREA_SIZE, height=AREA_SIZE)
    res = run(combine(area(g), ("pos", 0), ("area", 0)))
    guided = base(run, path, width=AREA_SIZE, height=AREA_SIZE)
    assert_guided(res)
    assert res.reports[0].loss == pytest.approx(guided.reports[0].loss, rel=1e-5)
    assert sum(CROP_WARNING in w for w in res.warnings) == 1, res.warnings
    assert differs(res.latent, guided.latent)
    assert not any(CROP_WARNING in w for w in guided.warnings)


@pytest.mark.parametrize("path", PATHS)
def test_area_conditioning_alone_runs_unguided_with_a_warning(run, path):
    """Only an area cond: no cond covers the image, so there is nothing to guide on. Every
    step is skipped with a warning and the result is plain sampling, never an error."""
    g = workflow(SD1, path, steps=STEPS, width=AREA_SIZE, height=AREA_SIZE)
    res = run(positive(area(g), "area_only", {"class_type": "ConditioningCombine", "inputs": {
        "conditioning_1": ["area", 0], "conditioning_2": ["area", 0]}}))
    plain_g = workflow(SD1, path, steps=STEPS, width=AREA_SIZE, height=AREA_SIZE, guided=False)
    plain = run(positive(area(plain_g), "area_only", {"class_type": "ConditioningCombine", "inputs": {
        "conditioning_1": ["area", 0], "conditioning_2": ["area", 0]}}))
    assert torch.isfinite(res.latent).all()
    assert len(res.reports) == STEPS and all(r.skipped and not r.applied for r in res.reports)
    assert any(CROP_WARNING in w and "unguided" in w for w in res.warnings), res.warnings
    assert torch.allclose(res.latent, plain.latent, rtol=1e-4, atol=1e-4 * plain.latent.abs().max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("set_cond_area", ["default", "mask bounds"])
def test_masked_conditioning(run, path, set_cond_area):
    """ConditioningSetMask (left half) on a second prompt, combined with the full prompt.
    "default": the masked cond runs on the whole latent and is guided with the full one;
    "mask bounds": it runs on the mask's bounding box (a crop) and is left out, with the
    warning, so the first step reads the full cond alone. Either way the mask still shapes
    the image."""
    g = left_half_mask(workflow(SD1, path, steps=STEPS, width=AREA_SIZE, height=AREA_SIZE))
    g["pos2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a cat to the left of a dog, red"}}
    g["masked"] = {"class_type": "ConditioningSetMask", "inputs": {
        "conditioning": ["pos2", 0], "mask": ["mask", 0], "strength": 1.0, "set_cond_area": set_cond_area}}
    res = run(combine(g, ("pos", 0), ("masked", 0)))
    guided = base(run, path, width=AREA_SIZE, height=AREA_SIZE)
    assert_guided(res)
    assert differs(res.latent, guided.latent)
    if set_cond_area == "mask bounds":
        assert res.reports[0].loss == pytest.approx(guided.reports[0].loss, rel=1e-5)
        assert any(CROP_WARNING in w for w in res.warnings)
    else:
        assert res.reports[0].loss != pytest.approx(guided.reports[0].loss, rel=1e-4)
        assert not any(CROP_WARNING in w for w in res.warnings)


@pytest.mark.parametrize("path", PATHS)
def test_conditioning_combine(run, path):
    """ConditioningCombine of the prompt and a restyled prompt: both conds are full-size and
    guided (their maps are averaged per image); the second prompt changes the image."""
    g = workflow(SD1, path, steps=STEPS)
    g["pos2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a cat to the left of a dog, oil painting"}}
    res = run(combine(g, ("pos", 0), ("pos2", 0)))
    guided = base(run, path)
    assert_guided(res)
    assert differs(res.latent, guided.latent)
    assert res.reports[0].loss != pytest.approx(guided.reports[0].loss, rel=1e-4)  # both were read
    assert not res.warnings


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
