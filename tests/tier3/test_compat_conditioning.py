"""Tier 3: InfSplign next to area, masked and combined conditioning (ConditioningSetArea,
ConditioningSetMask, ConditioningCombine) through ComfyUI's executor on both sampler paths:
conds over the whole image are guided, conds on a crop of the latent are not read (one
warning), and the partner keeps its effect. Small runs, as in test_compat.py."""
from __future__ import annotations

import pytest
import torch

from compat_runs import (PATHS, SD1, STEPS, assert_guided, base, combine, differs, model_files,  # noqa: F401
                         positive, run)
from graphs import workflow

pytestmark = pytest.mark.host

# ConditioningSetArea takes 64 px at least: these cases run at 128 x 128 px, the area (and
# the mask) being the left half.
AREA_SIZE = 128


def area(g: dict, cond=("pos", 0)) -> dict:
    g["area"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": list(cond), "width": AREA_SIZE // 2, "height": AREA_SIZE, "x": 0, "y": 0, "strength": 1.0}}
    return g


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
