"""Tier 1: the gradient helper against torch's inference mode (no ComfyUI)."""
import pytest
import torch

from infsplign.guidance.autograd import grad_enabled, grad_leaf, make_autograd_safe


def _built_in_inference_mode():
    with torch.inference_mode():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        net.register_buffer("scale", torch.full((4,), 2.0))
        x = torch.randn(3, 8)
    return net, x


def test_naive_gradient_fails_on_inference_weights():
    net, x = _built_in_inference_mode()
    assert net[0].weight.is_inference()
    with grad_enabled(), pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        net(grad_leaf(x)).sum().backward()


def test_helper_gives_the_same_values_and_a_finite_gradient():
    net, x = _built_in_inference_mode()
    with torch.inference_mode():
        before = net(x).clone()
    with torch.inference_mode():  # as inside ComfyUI's executor
        with grad_enabled():
            assert make_autograd_safe(net) == 5  # 4 parameters + 1 buffer
            assert make_autograd_safe(net) == 0
            xl = grad_leaf(x)
            out = net(xl)
            (g,) = torch.autograd.grad((out * net.scale).pow(2).sum(), xl)
    assert torch.equal(out.detach(), before)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    assert not any(p.requires_grad for p in net.parameters())
