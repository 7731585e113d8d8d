"""Tier 3: whole prompts through ComfyUI's real executor, in-process (inference mode on)."""
import math

import pytest

from graphs import gradient_probe, txt2img

pytestmark = pytest.mark.host
SD1 = "infsplign_test_sd1.safetensors"


def test_txt2img_with_the_pack_node(host, checkpoints):
    run = host.execute(txt2img(SD1))
    assert run.success, run.error()
    (image,) = run.outputs["preview"]["images"]
    assert image["filename"].endswith(".png") and image["type"] == "temp"
    (summary,) = run.outputs["parse"]["text"]
    assert '"cat" left of "dog"' in summary and "tokens cat: [2]" in summary


def test_bad_prompt_is_a_clear_node_error(host, checkpoints):
    run = host.execute(txt2img(SD1, text="a cat behind a dog"))
    assert not run.success
    assert "depth relation" in run.error()


def test_latent_gradient_inside_an_executed_prompt(host, checkpoints):
    """The pack's autograd helper gives a finite gradient of the SD1 UNet's output w.r.t.
    the latent in a real prompt execution; without it the same probe fails."""
    run = host.execute(gradient_probe(SD1, helper=True))
    assert run.success, run.error()
    (norm,) = run.outputs["probe"]["grad_norm"]
    assert math.isfinite(norm) and norm > 0
    assert run.outputs["probe"]["inference_tensor"] == [True]  # it ran under inference mode

    naive = host.execute(gradient_probe(SD1, helper=False))
    assert not naive.success
    assert "Inference tensors cannot be saved for backward" in naive.error()
