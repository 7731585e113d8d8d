"""Tier 3: the guided step's memory modes through ComfyUI's real executor.

- `low` (recompute inside the UNet's blocks during backward) gives the latents of `fast` on
  the three test topologies and with a LoRA and a ControlNet, on both sampler paths;
- the memory ComfyUI reserves before sampling (`load_models_gpu(memory_required=...)`) grows
  by the counted extra of the mode in use;
- `auto` picks `low` when the free memory ComfyUI reports is small;
- an out-of-memory error inside a guided step falls back to `low`, then to unguided, with
  one warning, a finite image, nothing left on the model, and a normal next prompt.
"""
from __future__ import annotations

import logging

import pytest
import torch

from graphs import insert_model_patch, workflow
from compat_runs import Runner, model_files, with_controlnet, with_lora  # noqa: F401  (model_files: a fixture)
from test_robustness import assert_nothing_left, leftovers, loaded_pack

pytestmark = pytest.mark.host
SD1 = "infsplign_test_sd1.safetensors"
STEPS = 3
TOLERANCE = 1e-5  # max |latent_low - latent_fast|, float32


@pytest.fixture(scope="module")
def run(host, checkpoints, model_files):  # noqa: F811
    return Runner(host)


def ckpt(topology: str) -> str:
    return f"infsplign_test_{topology}.safetensors"


def modes_of(res) -> set[str]:
    return {r.memory_mode for r in res.reports}


CASES = [("sd1", "ksampler", None), ("sd1", "custom", None), ("sd2v", "ksampler", None), ("sdxl", "custom", None),
         ("sd1", "ksampler", "lora"), ("sd1", "custom", "controlnet")]


@pytest.mark.parametrize("topology, path, partner", CASES)
def test_low_gives_the_latents_of_fast(run, topology, path, partner):
    """Every step guided (end_percent 1), batch 2, fp32: the recomputed backward of `low`
    gives the gradient of `fast`, so the sampled latents agree to rounding."""
    def graph(memory):
        g = workflow(ckpt(topology), path, steps=STEPS, batch=2, memory=memory)
        if partner == "lora":
            with_lora(g)
        elif partner == "controlnet":
            with_controlnet(g)
        return g
    fast, low = run(graph("fast")), run(graph("low"))
    assert modes_of(fast) == {"fast"} and modes_of(low) == {"low"}
    assert all(r.applied and r.grad_norm > 0 for r in fast.reports + low.reports)
    plain = run(workflow(ckpt(topology), path, steps=STEPS, batch=2, guided=False))
    effect = (fast.latent - plain.latent).abs().max()
    assert effect > 1e-3 * plain.latent.abs().max()  # guidance moved the latent
    assert (low.latent - fast.latent).abs().max() <= TOLERANCE, (low.latent - fast.latent).abs().max()


@pytest.fixture
def reservations(monkeypatch):
    """memory_required of each load_models_gpu call that loads a diffusion model (the
    sampler's reservation; ComfyUI's own function, spied on)."""
    import comfy.model_base
    import comfy.model_management
    seen = []
    real = comfy.model_management.load_models_gpu

    def spy(models, memory_required=0, *args, **kwargs):
        if any(isinstance(getattr(m, "model", None), comfy.model_base.BaseModel) for m in models):
            seen.append(memory_required)
        return real(models, memory_required, *args, **kwargs)
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", spy)
    return seen


@pytest.mark.parametrize("path", ["ksampler", "custom"])
@pytest.mark.parametrize("memory", ["fast", "low"])
def test_reservation_grows_by_the_counted_extra(host, checkpoints, reservations, path, memory):
    session = host.Session()
    plain = session.execute(workflow(SD1, path, steps=1, width=128, height=96, guided=False))
    assert plain.success, plain.error()
    before = list(reservations)
    guided = session.execute(workflow(SD1, path, steps=1, width=128, height=96, memory=memory))
    assert guided.success, guided.error()
    after = reservations[len(before):]
    memory_modes, estimate = loaded_pack("engine.memory_modes"), loaded_pack("engine.memory_estimate")
    model = session.output("ckpt")
    layers = loaded_pack("engine.families").family_of(model).layers(model, "auto")
    counted = estimate.estimate(session.output("ckpt"), 1, (12, 16), memory, "math", layers,
                                estimate.PROBE_RELATIONS, 77).extra
    assert counted > 0 or memory == "low"  # (low can peak below the plain step's batched forward)
    want = int(counted * memory_modes.HEADROOM) + memory_modes.MARGIN
    assert len(before) == len(after) == 1
    assert after[0] - before[0] == want, (before, after, want)


def test_auto_picks_low_when_the_free_memory_reported_is_small(host, checkpoints, monkeypatch):
    import comfy.model_management
    session = host.Session()
    from graphs import execute_logged
    run, reports, _ = execute_logged(session, workflow(SD1, "ksampler", steps=2, memory="auto"))
    assert run.success and {r.memory_mode for r in reports} == {"fast"}  # 24 GB of RAM is plenty here
    small = 64 * 2**20

    def free(dev=None, torch_free_too=False):  # ComfyUI's signature: a pair when asked for both
        return (small, small) if torch_free_too else small
    monkeypatch.setattr(comfy.model_management, "get_free_memory", free)
    run, reports, _ = execute_logged(session, workflow(SD1, "ksampler", steps=2, memory="auto", seed=8))
    assert run.success and {r.memory_mode for r in reports} == {"low"}
    assert all(r.applied for r in reports)


def _oom_graph(fault: str, tag: str, **kw) -> dict:
    return insert_model_patch(workflow(SD1, "ksampler", steps=STEPS, **kw), "fault", "InfSplignTestFault",
                              fault=fault, blocks="3", tag=tag)


def _memory_warnings(warnings) -> list[str]:
    return [w.getMessage() for w in warnings if "ran out of memory" in w.getMessage()]


def test_out_of_memory_in_fast_retries_in_low(host, checkpoints):
    from graphs import execute_logged
    session, left = host.Session(), leftovers()
    run, reports, warnings = execute_logged(session, _oom_graph("oom_once", "oom-once", memory="fast"))
    assert run.success, run.error()
    assert [r.memory_mode for r in reports] == ["low"] * STEPS  # the failed step retried, then the rest
    assert all(r.applied for r in reports)
    (warning,) = _memory_warnings(warnings)
    assert "64x64 px" in warning and "fast mode" in warning and "low memory mode" in warning
    latent = host.saved_latents(run, "save_latent")[0]
    assert torch.isfinite(latent).all()
    assert_nothing_left(left)


def test_out_of_memory_in_low_too_runs_unguided_and_the_next_prompt_is_normal(host, checkpoints):
    from graphs import execute_logged
    session, left = host.Session(), leftovers()
    run, reports, warnings = execute_logged(session, _oom_graph("oom_grad", "oom-grad", memory="auto"))
    assert run.success, run.error()
    assert [r.memory_mode for r in reports] == ["unguided"] * STEPS and not any(r.applied for r in reports)
    (warning,) = _memory_warnings(warnings)
    assert "64x64 px" in warning and "fast and low mode" in warning and "unguided" in warning
    assert len([w for w in warnings if w.levelno >= logging.WARNING]) == 1, [w.getMessage() for w in warnings]
    latent = host.saved_latents(run, "save_latent")[0]
    # exactly plain sampling: the fault patch does nothing without autograd
    plain = session.execute(_oom_graph("oom_grad", "oom-grad", guided=False))
    assert torch.equal(latent, host.saved_latents(plain, "save_latent")[0])

    source = session.output("ckpt")
    assert "memory_required" not in source.model.__dict__  # the reservation patch is gone
    assert not any("forward" in m.__dict__ for m in source.model.diffusion_model.modules())
    assert_nothing_left(left)
    again, reports, warnings = execute_logged(session, workflow(SD1, "ksampler", steps=STEPS))
    assert again.success and all(r.applied and r.memory_mode == "fast" for r in reports)
    assert not _memory_warnings(warnings)


def test_a_weight_autograd_refuses_is_handled_by_low(host, checkpoints):
    """A weight made under inference mode (as ComfyUI's streamed weights may be) inside the
    guided forward: fast cannot save it for backward; the step is retried in low, whose
    recomputed blocks give each operation a normal copy, with one warning."""
    from graphs import execute_logged
    session = host.Session()
    run, reports, warnings = execute_logged(session, _oom_graph("inference_weight", "inference", memory="fast"))
    assert run.success, run.error()
    assert [r.memory_mode for r in reports] == ["low"] * STEPS and all(r.applied for r in reports)
    (warning,) = [w.getMessage() for w in warnings]
    assert "autograd refuses" in warning and "fast mode" in warning
