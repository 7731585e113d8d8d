"""Tier 1: attention statistics, losses and the guided step (ALGORITHM.md sections 3-5)."""
import math

import pytest
import torch

from infsplign.guidance.attention_stats import centroids, mean_threshold, object_stats, variances
from infsplign.guidance.losses import (ACTIVATIONS, LossSettings, Pair, offsets, orthogonal_loss,
                                       relation_holds, spatial_loss, step_loss)
from infsplign.guidance.step import guided_denoised, guided_eps, guided_flow_denoised, in_window

H, W = 16, 24


def one_hot(i, j, h=H, w=W):
    m = torch.zeros(h, w, dtype=torch.float64)
    m[i, j] = 1.0
    return m


def gaussian(cy, cx, sigma, h=64, w=64):
    """A Gaussian blob in normalised coordinates, far from the borders."""
    y = torch.linspace(0, 1, h, dtype=torch.float64).view(h, 1)
    x = torch.linspace(0, 1, w, dtype=torch.float64).view(1, w)
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def test_one_hot_centroid_and_variance_are_exact():
    for i, j in [(0, 0), (3, 7), (H - 1, W - 1)]:
        c = centroids(one_hot(i, j))
        assert c.tolist() == [j / (W - 1), i / (H - 1)]
        assert variances(one_hot(i, j), c).item() == 0.0


def test_gaussian_centroid_and_variance():
    # centred on grid points 21/63 and 42/63 so the blob is symmetric about its centre
    cx, cy, sigma = 21 / 63, 42 / 63, 0.06
    m = gaussian(cy, cx, sigma)
    c = centroids(m)
    assert torch.allclose(c, torch.tensor([cx, cy], dtype=torch.float64), atol=1e-12)
    # sum-of-samples of a Gaussian wider than the grid step equals the integral to ~1e-9
    assert variances(m, c).item() == pytest.approx(2 * sigma**2, rel=1e-6)


def test_mean_threshold_keeps_values_above_the_mean():
    m = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    assert mean_threshold(m).tolist() == [[0.0, 0.0], [0.0, 5.0]]
    # a blob plus a weak uniform floor: thresholding removes the floor's pull to the centre
    blob = gaussian(0.2, 0.2, 0.05) + 0.02
    c_plain, _ = object_stats(blob)
    c_thr, _ = object_stats(blob, threshold=True)
    assert (c_thr - 0.2).abs().max() < 1e-3 < (c_plain - 0.2).abs().max()


def test_all_zero_maps_stay_finite_with_finite_gradients():
    maps = torch.zeros(2, 2, H, W, requires_grad=True)
    for threshold in (False, True):
        s = LossSettings(threshold=threshold, orthogonal="l2")
        loss = step_loss([("coarse", maps), ("mid", maps)], [Pair(0, 1, "left")], s)
        (g,) = torch.autograd.grad(loss, maps)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("relation, a, b", [
    ("left", (8, 2), (8, 20)), ("right", (8, 20), (8, 2)),
    ("above", (1, 12), (14, 12)), ("below", (14, 12), (1, 12)), ("near", (8, 11), (8, 13)),
])
def test_offsets_are_positive_exactly_when_the_relation_holds(relation, a, b):
    ca, cb = centroids(one_hot(*a)), centroids(one_hot(*b))
    assert offsets(ca, cb, relation)[0] > 0
    assert offsets(cb, ca, relation)[0] < 0 or relation == "near"
    if relation != "near":
        assert offsets(ca, cb, relation)[1].abs() < 1e-12  # aligned on the other axis


def test_near_is_false_for_far_objects():
    far = offsets(centroids(one_hot(0, 0)), centroids(one_hot(H - 1, W - 1)), "near")[0]
    assert far < 0


def test_each_activation_is_zero_or_positive_where_its_formula_says():
    below, at, above = torch.tensor(-0.3), torch.tensor(0.25), torch.tensor(0.8)
    relu = LossSettings(activation="relu", alpha=0.75, margin=0.25)
    assert spatial_loss(below, relu) > 0 and spatial_loss(at, relu) == 0 and spatial_loss(above, relu) == 0
    leaky = LossSettings(activation="leaky_relu", alpha=2, margin=0.25, leaky_slope=0.1)
    assert spatial_loss(below, leaky) > 0 and spatial_loss(above, leaky) < 0
    assert spatial_loss(above, leaky) == pytest.approx(0.1 * 2 * (0.25 - 0.8))
    gelu = LossSettings(activation="gelu", alpha=2, margin=0.25)
    assert spatial_loss(below, gelu) > 0 and spatial_loss(at, gelu) == 0 and spatial_loss(above, gelu) < 0
    sig = LossSettings(activation="sigmoid", alpha=8, margin=0.0)
    assert 0.5 < spatial_loss(below, sig) < 1 and 0 < spatial_loss(above, sig) < 0.5
    ortho = LossSettings(orthogonal="l2")
    assert orthogonal_loss(torch.tensor(0.0), ortho) == 0 and orthogonal_loss(torch.tensor(-0.2), ortho) > 0
    assert orthogonal_loss(torch.tensor(-0.2), LossSettings(orthogonal="none")) == 0


def test_presence_and_balance_terms():
    only = dict(spatial_weight=0.0, orthogonal="none")
    tight = torch.stack([one_hot(3, 3), one_hot(9, 9)]).unsqueeze(0)
    spread = torch.stack([gaussian(0.3, 0.3, 0.1, H, W), gaussian(0.6, 0.6, 0.1, H, W)]).unsqueeze(0)
    pair = [Pair(0, 1, "left")]
    presence = LossSettings(**only, presence_weight=1.0)
    assert step_loss([("coarse", tight)], pair, presence) == 0
    assert step_loss([("coarse", spread)], pair, presence) > 0
    balance = LossSettings(**only, balance_weight=1.0)
    assert step_loss([("mid", tight)], pair, balance) == 0
    uneven = torch.stack([one_hot(3, 3), gaussian(0.6, 0.6, 0.1, H, W)]).unsqueeze(0)
    assert step_loss([("mid", uneven)], pair, balance) > 0


def test_several_relations_add_up_and_batches_sum():
    maps = torch.rand(3, 3, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = LossSettings(orthogonal="l1")
    p1, p2 = Pair(0, 1, "left"), Pair(0, 2, "above")
    layers = [("coarse", maps), ("mid", maps.flip(-1))]
    both = step_loss(layers, [p1, p2], s)
    assert both == pytest.approx((step_loss(layers, [p1], s) + step_loss(layers, [p2], s)).item())
    per_image = sum(step_loss([(lv, m[i:i + 1]) for lv, m in layers], [p1, p2], s) for i in range(3))
    assert both == pytest.approx(per_image.item())


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("threshold", [False, True])
def test_gradients_equal_finite_differences(act, threshold):
    g = torch.Generator().manual_seed(1)
    maps = (torch.rand(2, 3, 6, 7, dtype=torch.float64, generator=g) + 0.05).requires_grad_(True)
    s = LossSettings(activation=act, alpha=2.0, margin=0.25, orthogonal="l2", threshold=threshold)
    pairs = [Pair(0, 1, "right"), Pair(2, 1, "below"), Pair(0, 2, "near")]
    fn = lambda m: step_loss([("coarse", m), ("mid", m * m)], pairs, s)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (maps,), eps=1e-6, atol=1e-6)


def test_relation_holds_reads_the_maps():
    maps = torch.stack([one_hot(8, 2), one_hot(8, 20)]).unsqueeze(0)
    assert relation_holds(maps, [Pair(0, 1, "left"), Pair(0, 1, "right")], LossSettings()).tolist() == [[True, False]]


def test_guided_denoised_is_eq6_in_eps_space():
    g = torch.Generator().manual_seed(2)
    x, d, grad = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([14.6, 0.3], dtype=torch.float64)
    w = 1000.0
    s = sigma.view(-1, 1, 1, 1)
    eps = (x - d) / s
    d_new = guided_denoised(d, grad, sigma, w)
    assert torch.allclose((x - d_new) / s, guided_eps(eps, grad, sigma, w), rtol=1e-12, atol=1e-9)
    assert torch.allclose(guided_eps(eps, grad, sigma, w) - eps, w * torch.sqrt(1 + s**2) * grad)
    assert torch.equal(guided_denoised(d, grad, sigma, 0.0), d)


def test_guided_flow_denoised_adds_w_grad_to_the_velocity():
    """Flow matching (CONST): x = sigma n + (1 - sigma) x0, D = x - sigma v (ComfyUI's
    CONST.calculate_denoised); the step is v' = v + w grad_x L, finite at sigma = 1."""
    g = torch.Generator().manual_seed(3)
    x, v, grad = (torch.randn(3, 16, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([1.0, 0.55, 0.02], dtype=torch.float64)
    w = 7.5
    s = sigma.view(-1, 1, 1, 1)
    d = x - s * v
    d_new = guided_flow_denoised(d, grad, sigma, w)
    v_new = (x - d_new) / s  # the velocity the sampler reads back
    assert torch.allclose(v_new, v + w * grad, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(d_new).all()
    assert torch.allclose(d_new[0], d[0] - w * grad[0], rtol=1e-12, atol=1e-12)  # sigma = 1: no 1/(1 - sigma)
    assert torch.equal(guided_flow_denoised(d, grad, sigma, 0.0), d)
    # not the eps-form step: that one scales the gradient by sqrt(1 + sigma^2) as well
    assert not torch.allclose(d_new, guided_denoised(d, grad, sigma, w))


def test_window_rule_and_its_tolerance():
    start, end = 1e9, 4.0861  # percent_to_sigma(0.0), percent_to_sigma(0.25) for SD1
    assert in_window(14.6, start, end) and in_window(4.2, start, end)
    assert not in_window(4.0819, start, end)  # the "simple" step at 25 %: a hair outside
    assert not in_window(4.0861 * 1.0005, start, end)  # a hair inside: still "on" the bound
    assert not in_window(1.0, start, end)
    assert in_window(10.0 * 1.0005, 1e9, 0.0) is True
    assert not in_window(10.0 * 1.01, 10.0, 0.0) and in_window(10.0 * 1.0005, 10.0, 0.0)
    assert math.isfinite(end)


@pytest.mark.parametrize("kwargs, names", [
    ({"strength": -1.0}, "strength is -1.0"),
    ({"strength": float("nan")}, "strength is nan"),
    ({"start_percent": 0.5, "end_percent": 0.25}, "start_percent 0.5 / end_percent 0.25"),
    ({"loss": LossSettings(alpha=0.0)}, "alpha is 0.0"),
    ({"loss": LossSettings(presence_weight=-2.0)}, "presence_weight is -2.0"),
    ({"loss": LossSettings(temperature=0.0)}, "temperature is 0.0"),
    ({"loss": LossSettings(temperature=float("inf"))}, "temperature is inf"),
])
def test_settings_errors_name_the_value_and_the_fix(kwargs, names):
    from infsplign.guidance.step import GuidanceSettings
    with pytest.raises(ValueError) as err:
        GuidanceSettings(**kwargs)
    msg = str(err.value)
    assert names in msg and ("use" in msg or "need" in msg), msg


def test_unknown_loss_names_are_refused():
    with pytest.raises(ValueError, match='loss "tanh" is not one of sigmoid, relu, leaky_relu, gelu'):
        LossSettings(activation="tanh")
    with pytest.raises(ValueError, match='orthogonal term "l3"'):
        LossSettings(orthogonal="l3")


def test_temperature_divides_the_logits_of_the_recorded_maps():
    from infsplign.guidance.attention_maps import token_maps
    g = torch.Generator().manual_seed(0)
    b, n, t, heads, d = 2, 16, 6, 2, 4
    q, k = torch.randn(b, n, heads * d, generator=g), torch.randn(b, t, heads * d, generator=g)
    logits = q.view(b, n, heads, d).transpose(1, 2) @ k.view(b, t, heads, d).transpose(1, 2).transpose(-1, -2)
    for temperature in (1.0, 4.0):
        want = torch.softmax(logits * d ** -0.5 / temperature, dim=-1).mean(dim=1)  # (b, n, t)
        got = token_maps(q, k, heads, [(1,), (2, 3)], (4, 4), temperature)
        assert torch.allclose(got[:, 0].reshape(b, n), want[..., 1], atol=1e-6)
        assert torch.allclose(got[:, 1].reshape(b, n), want[..., 2:4].mean(-1), atol=1e-6)
    assert torch.equal(token_maps(q, k, heads, [(1,)], (4, 4)), token_maps(q, k, heads, [(1,)], (4, 4), 1.0))


def test_temperature_gives_a_saturated_map_a_gradient_toward_the_target():
    """A word whose attention is ~1 on one cell and ~1e-13 elsewhere: its centroid cannot be
    pulled across the map at temperature 1, and can at temperature 4."""
    h = w = 4
    k = torch.zeros(1, 2, 1)
    k[0, 1, 0] = 1.0  # token 1 is the object word, token 0 takes the rest
    logit = torch.full((1, h * w, 1), -30.0)
    logit[0, 5, 0] = 30.0  # the object sits on cell (1, 1)
    from infsplign.guidance.attention_maps import token_maps
    pulls = []
    for temperature in (1.0, 4.0):
        q = logit.clone().requires_grad_(True)
        maps = token_maps(q, k, 1, [(1,)], (h, w), temperature)
        centroids(maps)[0, 0, 0].backward()  # x of the centroid; the loss would push it right
        pulls.append(q.grad[0, :, 0].view(h, w)[:, 3].abs().max().item())  # on the far right column
    assert pulls[0] < 1e-12 and pulls[1] > 1e-5, pulls  # 1e8 times more pull at temperature 4


def test_object_token_maps_have_the_gradient_of_the_full_softmax():
    """token_maps keeps only the object columns (and a logsumexp) for backward; its
    gradient w.r.t. q and k is the full softmax's, checked in float64 by gradcheck, and
    equal to explicit softmax-then-select in float32."""
    from infsplign.guidance.attention_maps import token_maps
    g = torch.Generator().manual_seed(1)
    b, n, t, heads, d = 2, 6, 5, 2, 3
    q = torch.randn(b, n, heads * d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, t, heads * d, generator=g, dtype=torch.float64, requires_grad=True)
    groups = [(1,), (3, 2)]
    assert torch.autograd.gradcheck(lambda q, k: token_maps(q, k, heads, groups, (2, 3), 2.0), (q, k))

    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    weights = torch.randn(b, 2, 2, 3, generator=g)
    (token_maps(qf, kf, heads, groups, (2, 3), 2.0) * weights).sum().backward()
    qr, kr = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    logits = qr.view(b, n, heads, d).transpose(1, 2) @ kr.view(b, t, heads, d).transpose(1, 2).transpose(-1, -2)
    probs = torch.softmax(logits * d ** -0.5 / 2.0, dim=-1).mean(dim=1)
    ref = torch.stack([probs[..., 1], probs[..., 2:4].mean(-1)], dim=1).view(b, 2, 2, 3)
    (ref * weights).sum().backward()
    assert torch.allclose(qf.grad, qr.grad, atol=1e-6) and torch.allclose(kf.grad, kr.grad, atol=1e-6)


def test_layers_computed_together_equal_each_layer_alone():
    """token_maps_of_layers on L layers (with a row selection: the cond rows of a batched
    cond/uncond call) gives each layer's own maps, and the same gradient w.r.t. each layer's
    q as the layers computed one by one (float64 gradcheck of the stacked computation)."""
    from infsplign.guidance.attention_maps import MapIndex, token_maps, token_maps_of_layers
    g = torch.Generator().manual_seed(3)
    layers, b, n, t, heads, d = 3, 4, 6, 5, 2, 3
    groups = [(1,), (3, 2)]
    qs = [torch.randn(b, n, heads * d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(layers)]
    ks = [torch.randn(b, t, heads * d, generator=g, dtype=torch.float64) for _ in range(layers)]
    index = MapIndex.of(groups, "cpu")
    rows = slice(2, 4)
    together = token_maps_of_layers(qs, ks, heads, index, (2, 3), 2.0, rows)
    assert together.shape == (layers, 2, 2, 2, 3) and together.dtype == torch.float64
    for i in range(layers):
        alone = token_maps(qs[i][rows], ks[i][rows], heads, groups, (2, 3), 2.0)
        assert torch.allclose(together[i], alone, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *q: token_maps_of_layers(q, ks, heads, index, (2, 3), 2.0, rows), tuple(qs))
    # the uncond rows get no gradient
    together.pow(2).sum().backward()
    assert all(float(q.grad[:2].abs().max()) == 0.0 and float(q.grad[2:].abs().max()) > 0 for q in qs)


def test_keys_get_their_gradient_when_they_need_one():
    from infsplign.guidance.attention_maps import MapIndex, token_maps_of_layers
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    index = MapIndex.of([(1,), (2, 4)], "cpu")
    assert torch.autograd.gradcheck(lambda q, k: token_maps_of_layers([q], [k], 3, index, (2, 3), 1.5), (q, k))


def test_half_precision_layers_give_float32_maps_and_gradients_of_their_dtype():
    from infsplign.guidance.attention_maps import MapIndex, token_maps_of_layers
    g = torch.Generator().manual_seed(5)
    qs = [torch.randn(1, 4, 4, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(2)]
    ks = [torch.randn(1, 3, 4, generator=g).to(torch.bfloat16) for _ in range(2)]
    maps = token_maps_of_layers(qs, ks, 2, MapIndex.of([(1,)], "cpu"), (2, 2))
    assert maps.dtype == torch.float32
    maps.sum().backward()
    assert all(q.grad.dtype == torch.bfloat16 for q in qs)
