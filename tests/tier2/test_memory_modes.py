"""Tier 2: engine/memory_modes.py against the real comfy package: the per-step mode choice,
the out-of-memory test, and the attention the guided forward uses on CUDA."""
import pytest
import torch

pytestmark = pytest.mark.host


def plan(requested, fast=3 * 2**30, low=2**28):
    from infsplign.engine.memory_modes import MemoryPlan
    counts = {"fast": fast, "low": low}
    return MemoryPlan(requested, torch.device("cpu"), counts.__getitem__)


def test_auto_picks_fast_when_it_fits_the_free_memory_and_low_when_not(host, monkeypatch):
    import comfy.model_management as mm
    from infsplign.engine.memory_modes import HEADROOM, MARGIN
    p = plan("auto")
    need = int(3 * 2**30 * HEADROOM) + MARGIN
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: need)
    assert p.step_mode() == "fast"
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: need - 1)
    assert p.step_mode() == "low"
    assert plan("fast").step_mode() == "fast" and plan("low").step_mode() == "low"  # whatever is free
    p.fallback = "low"
    assert p.step_mode() == "low"
    p.fallback = "unguided"
    assert p.step_mode() == "unguided"
    assert set(p.extra) == {"fast"}  # low was never needed, so never counted


def test_out_of_memory_errors_are_told_from_others(host):
    from infsplign.engine.memory_modes import is_oom
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("Inference tensors cannot be saved for backward"))
    assert not is_oom(ValueError("out of memory"))


def test_the_guided_forward_uses_pytorch_attention_on_cuda(host):
    """The override routes attention with autograd on to ComfyUI's attention_pytorch (SDPA:
    flash / memory-efficient kernels with a backward pass) where `wants` says so (CUDA), and
    otherwise to another pack's override or the function ComfyUI was going to call."""
    import comfy.ldm.modules.attention as attention
    from infsplign.engine.memory_modes import efficient_attention_on_cuda
    calls = []

    def other(func, *args, **kwargs):
        calls.append("other")
        return func(*args, **kwargs)
    q, k, v = (torch.randn(1, 16, 32) for _ in range(3))
    want = attention.attention_pytorch(q, k, v, 4)
    routed = efficient_attention_on_cuda(other, wants=lambda t: True)
    with torch.enable_grad():
        got = attention.attention_basic(q, k, v, 4, transformer_options={"optimized_attention_override": routed})
    assert torch.allclose(got, want, atol=1e-6) and calls == []
    with torch.no_grad():
        attention.attention_basic(q, k, v, 4, transformer_options={"optimized_attention_override": routed})
    assert calls == ["other"]
    on_cpu = efficient_attention_on_cuda(None)  # (the default test: a CUDA tensor)
    with torch.enable_grad():
        same = attention.attention_basic(q, k, v, 4, transformer_options={"optimized_attention_override": on_cpu})
    assert torch.equal(same, attention.attention_basic(q, k, v, 4))
