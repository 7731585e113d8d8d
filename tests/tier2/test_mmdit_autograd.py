"""Tier 2: autograd through the MMDiT blocks (engine/families/mmdit/autograd.py) on the narrow Flux.1-dev
(double and single blocks) and SD3.5 models, against finite differences in float64.

The gradient of a scalar loss on the model's output w.r.t. the input latent is checked as
directional derivatives: <grad, d> against (L(x + e d) - L(x - e d)) / 2e along unit
directions d. Flux's RoPE table is float32 and rounds q and k to it even in a float64 model
(comfy/ldm/flux/math.py), a noise of about 1e-7 on L that the quotient magnifies (seen:
1e-4 relative at e = 1e-3, 2e-3 at e = 1e-4); the test model's table is made float64, so
the whole forward is float64. `low` is emulated as the pack recomputes: every block one
activation checkpoint (guidance/recompute.py).
"""
import contextlib

import pytest
import torch

pytestmark = pytest.mark.host

STEP = 1e-3
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def models(host):
    from testkit import mmdit_models
    out = {}
    for topology in ("flux_dev", "sd3"):
        dm = mmdit_models.build(topology, seed=0)[1].diffusion_model.double()
        if topology == "flux_dev":
            table = dm.pe_embedder.forward
            dm.pe_embedder.forward = lambda ids, _table=table: _table(ids).double()
        out[topology] = dm
    return out


def _problem(dm, topology):
    """(loss(x), x, blocks): a scalar loss of the model's output, a latent, the blocks `low`
    recomputes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g, dtype=torch.float64)
    if topology == "sd3":
        kwargs = {"timesteps": torch.tensor([700.0], dtype=torch.float64),
                  "context": torch.randn(1, 10, 4096, generator=g, dtype=torch.float64),
                  "y": torch.randn(1, 128, generator=g, dtype=torch.float64)}
        blocks = list(dm.joint_blocks)
    else:
        kwargs = {"timestep": torch.tensor([0.7], dtype=torch.float64),
                  "context": torch.randn(1, 10, 64, generator=g, dtype=torch.float64),
                  "y": torch.randn(1, 64, generator=g, dtype=torch.float64),
                  "guidance": torch.tensor([3.5], dtype=torch.float64)}
        blocks = list(dm.double_blocks) + list(dm.single_blocks)
    weights = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def loss(latent):
        return (dm(latent, transformer_options={}, **kwargs) * weights).sum()
    return loss, x, blocks


def _directions(x, n=3):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        d = torch.randn(x.shape, generator=g, dtype=x.dtype)
        out.append(d / d.norm())
    return out


def _finite_differences(loss, x, directions):
    from infsplign.engine.families.mmdit.autograd import training_paths
    # (0.33: comfy_kitchen's RoPE takes no float64; training_paths selects plain torch)
    with torch.no_grad(), training_paths():
        return [float((loss(x + STEP * d) - loss(x - STEP * d)) / (2 * STEP)) for d in directions]


def _gradient(loss, x, blocks, mode, autograd_context):
    from infsplign.guidance.recompute import recomputing
    latent = x.clone().requires_grad_(True)
    with autograd_context(blocks if mode == "low" else []):
        with recomputing(blocks) if mode == "low" else contextlib.nullcontext():
            loss(latent).backward()
    return latent.grad


def _relative_errors(grad, directions, fd):
    return [abs(float((grad * d).sum()) - f) / max(abs(f), 1e-12) for d, f in zip(directions, fd)]


@pytest.mark.parametrize("mode", ["fast", "low"])
@pytest.mark.parametrize("topology", ["flux_dev", "sd3"])
def test_gradient_matches_finite_differences(models, topology, mode):
    from infsplign.engine.families.mmdit.autograd import differentiable
    loss, x, blocks = _problem(models[topology], topology)
    directions = _directions(x)
    fd = _finite_differences(loss, x, directions)
    grad = _gradient(loss, x, blocks, mode, lambda recomputed: differentiable(*recomputed))
    errors = _relative_errors(grad, directions, fd)
    print(f"{topology} {mode}: relative errors {[f'{e:.1e}' for e in errors]}")
    assert all(abs(f) > 1e-3 for f in fd)  # a live derivative, not a zero compared with zero
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("mode", ["fast", "low"])
def test_flux_without_the_utility_fails(models, mode):
    """Plain autograd through Flux's blocks stops at the in-place residual adds (on 0.33 with
    the plain-torch RoPE selected, which test_rope_needs_training_paths_on_033 covers)."""
    from infsplign.engine.families.mmdit.autograd import training_paths
    loss, x, blocks = _problem(models["flux_dev"], "flux_dev")
    with pytest.raises(RuntimeError, match="inplace operation"):
        _gradient(loss, x, blocks, mode, lambda recomputed: training_paths())


def test_flux_recomputation_needs_the_recomputed_modules(models):
    """The mode alone does not reach a checkpoint's recomputation (the autograd engine runs it
    without the caller's torch function modes): the gradient is silently wrong (seen: 5 %
    off), unless the recomputed blocks are handed to differentiable()."""
    from infsplign.engine.families.mmdit.autograd import differentiable
    loss, x, blocks = _problem(models["flux_dev"], "flux_dev")
    directions = _directions(x)
    fd = _finite_differences(loss, x, directions)
    wrong = _gradient(loss, x, blocks, "low", lambda recomputed: differentiable())
    assert max(_relative_errors(wrong, directions, fd)) > 10 * TOLERANCE
    right = _gradient(loss, x, blocks, "low", lambda recomputed: differentiable(*recomputed))
    assert max(_relative_errors(right, directions, fd)) <= TOLERANCE


def test_flux_fast_and_low_agree(models):
    from infsplign.engine.families.mmdit.autograd import differentiable
    loss, x, blocks = _problem(models["flux_dev"], "flux_dev")
    fast = _gradient(loss, x, blocks, "fast", lambda recomputed: differentiable(*recomputed))
    low = _gradient(loss, x, blocks, "low", lambda recomputed: differentiable(*recomputed))
    assert torch.allclose(fast, low, rtol=0, atol=1e-12 * fast.abs().max())


def test_nothing_changes_outside(models):
    """Outside differentiable() (and inside it without a graph) `a += b` stays in place; inside,
    only augmented assignments of recording tensors run out of place, a method call such as
    `sim.add_(mask)` stays in place, and everything is restored on the way out."""
    import comfy.model_management as mm
    from infsplign.engine.families.mmdit.autograd import differentiable
    dm = models["flux_dev"]
    block = dm.double_blocks[0]
    before_training = getattr(mm, "in_training", None)
    a, b = torch.ones(3), torch.ones(3)

    def augmented(x, y):
        x += y
        return x

    for context in (contextlib.nullcontext(), differentiable(block)):
        with context:
            same = augmented(a, b)
            assert same is a and a[0] == 2  # no graph: in place, inside or outside
            a.fill_(1)
    w = torch.ones(3, requires_grad=True)
    with differentiable(block):
        assert "forward" in block.__dict__
        if before_training is not None:
            assert mm.in_training is True
        base = torch.zeros(3)
        out = augmented(base, w)
        assert out is not base and torch.equal(base, torch.zeros(3)) and torch.equal(out, torch.ones(3))
        kept = torch.zeros(3)
        kept.add_(torch.ones(3))  # a method call: in place even with a graph around
        grown = w * 1
        grown.add_(torch.ones(3))
        assert torch.equal(grown, torch.full((3,), 2.0)) and grown._version == 1
    assert "forward" not in block.__dict__
    assert getattr(mm, "in_training", None) == before_training
    with torch.enable_grad():
        base = torch.zeros(3)
        out = augmented(base, w)
        assert out is base  # outside: in place (and recorded as such)


def test_values_unchanged_inside(models):
    """The blocks compute the same values bitwise with the out-of-place adds."""
    from infsplign.engine.families.mmdit.autograd import differentiable, training_paths
    loss, x, blocks = _problem(models["flux_dev"], "flux_dev")
    with torch.no_grad(), training_paths():
        plain = loss(x)
    latent = x.clone().requires_grad_(True)
    with differentiable(*blocks):
        inside = loss(latent)
    assert torch.equal(plain, inside.detach())


def test_rope_needs_training_paths_on_033(host):
    """ComfyUI 0.33's Flux RoPE (comfy_kitchen) has no backward; in_training selects plain
    torch. The narrow model in float32 (comfy_kitchen's op takes no float64)."""
    import comfy.model_management as mm
    from infsplign.engine.families.mmdit.autograd import OutOfPlaceAugmented, differentiable
    from testkit import mmdit_models
    if not hasattr(mm, "in_training"):
        pytest.skip("ComfyUI before 0.33: Flux's RoPE is plain torch")
    dm = mmdit_models.build("flux_dev", seed=0)[1].diffusion_model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, generator=g)
    kwargs = {"timestep": torch.tensor([0.7]), "context": torch.randn(1, 10, 64, generator=g),
              "y": torch.randn(1, 64, generator=g), "guidance": torch.tensor([3.5])}

    def grad(context):
        latent = x.clone().requires_grad_(True)
        with context:
            dm(latent, transformer_options={}, **kwargs).square().sum().backward()
        return latent.grad
    with pytest.raises(Exception):
        grad(OutOfPlaceAugmented())
    assert torch.isfinite(grad(differentiable())).all()
