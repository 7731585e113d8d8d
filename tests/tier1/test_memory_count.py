"""Tier 1: guidance.memory_count (exact byte counts) and guidance.recompute (the `low` mode's
activation checkpoints), on small torch computations with known sizes."""
import pytest
import torch
from torch import nn

from infsplign.guidance.memory_count import MemoryCounter, efficient_attention, math_attention
from infsplign.guidance.recompute import CloneInferenceArgs, recomputing

MB = 1_000_000


def mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.Tanh())
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counts_the_step_and_not_the_weights(device):
    """256 x 1000 float32 activations are 1.024 MB each. With weights that need no gradient
    the forward keeps the ReLU output and the Tanh output (each Linear keeps only its weight,
    made outside and never counted, as a transposed view); each Linear's output is freed
    once the activation after it has read it."""
    net = mlp().to(device)
    with MemoryCounter() as c:
        x = torch.zeros(256, 1000, device=device, requires_grad=True)
        y = net(x).sum()
        assert c.saved() == 2 * 1_024_000
        assert c.current == 3 * 1_024_000 + 4  # x, ReLU's output, Tanh's; the sum
        assert c.peak == 4 * 1_024_000  # x, ReLU's and Tanh's outputs and the second Linear's before it went
        (g,) = torch.autograd.grad(y, x)
        del y
    assert c.saved() == 0  # the graph is gone
    assert c.peak >= 4 * 1_024_000 and g.shape == x.shape


def test_meta_and_real_tensors_count_the_same():
    counts = []
    for device in ("cpu", "meta"):
        net = mlp().to(device)
        with MemoryCounter() as c:
            x = torch.zeros(64, 1000, device=device, requires_grad=True)
            torch.autograd.grad(net(x).square().sum(), x)
        counts.append((c.peak, c.current))
    assert counts[0] == counts[1]


def test_efficient_attention_keeps_no_weights_and_math_attention_keeps_them():
    b, n, heads, d = 1, 512, 2, 16
    for attend, n_by_n in ((efficient_attention, False), (math_attention, True)):
        with MemoryCounter() as c:
            q = torch.randn(b, n, heads * d, requires_grad=True)
            out = attend(q, q * 1.0, q * 1.0, heads)
            weights = b * heads * n * n * 4
            assert (c.saved() >= weights) is n_by_n, (attend.__name__, c.saved(), weights)
            torch.autograd.grad(out.sum(), q)


def test_efficient_attention_is_attention():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 16, 32, requires_grad=True) for _ in range(3))
    grads = []
    for attend in (efficient_attention, math_attention):
        out = attend(q, k, v, 4)
        grads.append((out, *torch.autograd.grad((out ** 2).sum(), (q, k, v))))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def blocks():
    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Sequential(nn.Linear(500, 2000), nn.GELU(), nn.Linear(2000, 500), nn.Tanh())
                          for _ in range(2)))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def test_recomputing_keeps_inputs_only_and_gives_the_same_gradient():
    """Two blocks that each keep a 256 x 2000 GELU input and a Tanh output: recomputed, only
    the blocks' inputs (256 x 500) are kept, and the gradient is the same, bit for bit."""
    net = blocks()
    plain_grad, saved = None, {}
    for low in (False, True):
        with MemoryCounter() as c:
            x = torch.ones(256, 500, requires_grad=True)
            with recomputing([net[0], net[1]] if low else []):
                y = net(x).sum()
            saved[low] = c.saved()
            (g,) = torch.autograd.grad(y, x)
        if low:
            assert torch.equal(g, plain_grad)
        plain_grad = g
    assert saved[False] == 2 * (256 * 2000 * 4 + 256 * 500 * 4)
    assert saved[True] == 2 * 256 * 500 * 4
    assert "forward" not in net[0].__dict__ and "forward" not in net[1].__dict__  # restored


def test_recomputing_tells_when_it_replays():
    net, calls = mlp(), []
    x = torch.ones(4, 1000, requires_grad=True)
    with recomputing([net[0]], replaying=calls.append):
        y = net(x).sum()
    assert calls == []
    torch.autograd.grad(y, x)
    assert calls == [True, False]


def test_inference_weights_work_inside_a_recomputed_module():
    """Weights made under inference mode cannot be saved for backward; inside a recomputed
    module each operation gets a normal copy, and nothing is copied for good."""
    with torch.inference_mode():
        frozen = nn.Linear(1000, 1000)
    frozen.requires_grad_(False)
    assert frozen.weight.is_inference()
    x = torch.ones(2, 1000, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        frozen(x)
    with recomputing([frozen]):
        y = frozen(x).sum()
    (g,) = torch.autograd.grad(y, x)
    assert torch.allclose(g, frozen.weight.sum(0).expand_as(g), atol=1e-5)
    assert frozen.weight.is_inference()
    with CloneInferenceArgs():
        assert not (frozen.weight + 0).is_inference()
