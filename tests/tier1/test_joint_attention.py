"""Tier 1: object maps of a joint (MMDiT) attention call (guidance/joint_attention.py) against
the full softmax written out, values and gradients in float64."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from infsplign.guidance.joint_attention import chunk_rows, joint_maps, object_index


def naive(q, k, image, groups, hw, reduce="mean", scale=None):
    """The full (B, H, L, L) softmax over all keys, the image rows, each object's columns
    (mean or sum), mean over heads."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)[:, :, image[0]:image[1]]  # (B, H, N, L)
    maps = []
    for group in groups:
        cols = p[..., list(group)]
        maps.append((cols.mean(-1) if reduce == "mean" else cols.sum(-1)).mean(1))  # (B, N)
    return torch.stack(maps, 1).reshape(q.shape[0], len(groups), *hw)


def inputs(b, heads, text, n, d=8, seed=0, image_first=False):
    g = torch.Generator().manual_seed(seed)
    length = text + n
    q = (2 * torch.randn(b, heads, length, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    k = (2 * torch.randn(b, heads, length, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    image = (0, n) if image_first else (text, text + n)
    return q, k, image


CASES = [  # (batch, heads, text tokens, (h, w), chunk rows, objects, image first)
    (1, 2, 7, (4, 5), 3, [[1], [4]], False),  # chunks of 3 over 20 rows
    (2, 3, 11, (3, 6), 7, [[2, 3], [5], [6, 7, 8]], False),  # batch 2, multi-token objects
    (3, 1, 5, (2, 7), 14, [[0], [4]], False),  # one chunk exactly
    (2, 2, 6, (5, 3), 4, [[1, 2], [3]], True),  # image tokens first (HiDream's order)
]


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("b, heads, text, hw, rows, groups, image_first", CASES)
def test_equals_the_full_softmax(b, heads, text, hw, rows, groups, image_first, reduce):
    q, k, image = inputs(b, heads, text, hw[0] * hw[1], image_first=image_first)
    offset = hw[0] * hw[1] if image_first else 0  # object positions in the sequence
    seq_groups = [[offset + t for t in g] for g in groups]
    index = object_index(seq_groups, q.device, reduce)
    ours = joint_maps(q, k, image, index, hw, rows=rows)
    ref = naive(q, k, image, seq_groups, hw, reduce)
    assert ours.shape == (b, len(groups), *hw) and ours.dtype == torch.float64
    # (MapIndex keeps a multi-token object's weights 1/n in float32: 1e-8 relative)
    tol = 1e-12 if reduce == "sum" or all(len(g) in (1, 2) for g in groups) else 1e-7
    assert torch.allclose(ours, ref, rtol=tol, atol=1e-14)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    gq, gk = torch.autograd.grad((ours * weights).sum(), (q, k))
    rq, rk = torch.autograd.grad((ref * weights).sum(), (q, k))
    for ours_g, ref_g in ((gq, rq), (gk, rk)):
        assert torch.allclose(ours_g, ref_g, rtol=max(tol, 1e-10), atol=max(tol, 1e-12) * ref_g.abs().max())
    assert gk[:, :, image[0]:image[1]].abs().max() > 0  # image keys take part through the normalisation


def test_gradient_check():
    q, k, image = inputs(1, 2, 4, 6, d=4, seed=3)
    index = object_index([[1, 2], [3]], q.device)
    assert torch.autograd.gradcheck(lambda a, b: joint_maps(a, b, image, index, (2, 3), rows=4), (q, k))


def test_only_q_or_only_k_needs_a_gradient():
    q, k, image = inputs(2, 2, 5, 6, seed=4)
    index = object_index([[1], [2, 3]], q.device)
    ref = naive(q, k, image, [[1], [2, 3]], (2, 3))
    rq, rk = torch.autograd.grad(ref.square().sum(), (q, k))
    gk, = torch.autograd.grad(joint_maps(q.detach(), k, image, index, (2, 3), rows=4).square().sum(), (k,))
    gq, = torch.autograd.grad(joint_maps(q, k.detach(), image, index, (2, 3), rows=4).square().sum(), (q,))
    assert torch.allclose(gq, rq, rtol=1e-10, atol=1e-13) and torch.allclose(gk, rk, rtol=1e-10, atol=1e-13)


def test_scale_and_low_precision_inputs():
    q, k, image = inputs(1, 2, 6, 12, seed=5)
    index = object_index([[0], [5]], q.device)
    ref = naive(q, k, image, [[0], [5]], (3, 4), scale=0.3)
    assert torch.allclose(joint_maps(q, k, image, index, (3, 4), scale=0.3, rows=5), ref, rtol=1e-12)
    half = joint_maps(q.detach().bfloat16(), k.detach().bfloat16(), image, index, (3, 4), scale=0.3)
    assert half.dtype == torch.float32  # computed in float32 whatever the model's dtype
    assert torch.allclose(half.double(), ref.detach(), atol=0.05)


def test_maps_are_probabilities():
    q, k, image = inputs(2, 3, 9, 20, seed=6)
    every_text_token = [[t] for t in range(9)]
    maps = joint_maps(q, k, image, object_index(every_text_token, q.device), (4, 5), rows=6)
    assert (maps >= 0).all()
    # text mass of each image row: below 1 (image keys take the rest), sums of probabilities
    assert (maps.sum(1) < 1).all() and (maps.sum(1) > 0).all()


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_attention_matrix():
    """No tensor of the forward or the backward holds the call's logits (B H N L): only one
    chunk of image rows at a time."""
    b, heads, text, n, rows = 1, 4, 16, 256, 32
    q, k, image = inputs(b, heads, text, n, seed=7)
    index = object_index([[1], [2]], q.device)
    with LargestTensor() as seen:
        maps = joint_maps(q, k, image, index, (16, 16), rows=rows)
        maps.square().sum().backward()
    full = b * heads * n * (text + n)
    assert seen.largest <= b * heads * rows * (text + n) < full / 4


def test_chunk_rows_keeps_the_budget():
    q = torch.empty(1, 24, 4352, 128, dtype=torch.bfloat16, device="meta")  # Flux.1 at 1024 px
    rows = chunk_rows(q, 4352)
    assert rows * 24 * 4352 * 4 <= 256 * 2**20 < (rows + 1) * 24 * 4352 * 4
    assert chunk_rows(q, 4352, budget=1) == 1


def test_bad_input_is_named():
    q, k, image = inputs(1, 1, 3, 6)
    with pytest.raises(ValueError, match="6 image tokens do not make a 4 x 4 map"):
        joint_maps(q, k, image, object_index([[0]], q.device), (4, 4))
    with pytest.raises(ValueError, match="reduce must be"):
        object_index([[0]], q.device, reduce="max")


def test_joint_injection_is_the_unet_injection_of_the_image_queries_over_all_keys():
    """iLGD's injection on a joint call, chunked over the image queries, equals the UNet's
    (guidance/boxes.injection_delta) given the image queries and every key and value of the
    call: the bias spread is taken over all image queries, the softmax over all keys."""
    from infsplign.guidance.boxes import injection_delta
    from infsplign.guidance.joint_attention import joint_injection_delta
    g = torch.Generator().manual_seed(5)
    b, heads, d, text, hw = 2, 3, 8, 6, (4, 5)
    n = hw[0] * hw[1]
    length = text + n + 3  # three tokens after the image (reference latents)
    q, k, v = (torch.randn(b, heads, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    columns = torch.tensor([1, 4])
    masks = (torch.rand(2, n, generator=g, dtype=torch.float64) > 0.5).double()
    image = (text, text + n)
    joint = joint_injection_delta(q, k, v, image, columns, masks, 2.5, d ** -0.5, rows=3)
    flat = lambda t: t.transpose(1, 2).reshape(b, t.shape[2], heads * d)  # noqa: E731
    unet = injection_delta(flat(q[:, :, image[0]:image[1]]), flat(k), flat(v), heads, columns.tolist(), masks, 2.5)
    assert joint.shape == (b, heads, n, d)
    torch.testing.assert_close(flat(joint), unet, rtol=1e-10, atol=1e-12)
    assert joint.abs().max() > 1e-3  # the boxes do change the output
