"""Tier 1: guidance.step.guided_step around a small differentiable stand-in for the
sampler's batched forward (it records cond-row attention into the store as the attn2
capture patch does)."""
import math

import torch

from infsplign.guidance.capture import CaptureStore, Layer
from infsplign.guidance.losses import LossSettings, step_loss
from infsplign.guidance.relations import BoundRelation, Relation, SpatialRelations
from infsplign.guidance.step import GuidanceSettings, guided_denoised, guided_flow_denoised, guided_step

RELS = SpatialRelations((BoundRelation(Relation("cat", "left", "dog"), (2,), (5,)),), "a cat left of a dog", "clip_l", 8)
LAYER = Layer(3, 0, "coarse")


def fake_forward(store, scale=1.0):
    """x (B,4,4,4) -> denoised; queries from x, keys fixed: attention maps depend on x."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 8, 16, generator=g)
    proj = torch.randn(4, 16, generator=g)

    def predict(x):
        b = x.shape[0]
        q = (x.flatten(2).transpose(1, 2) @ proj) * scale  # (B, 16 positions, 16)
        k = keys.expand(2 * b, -1, -1)
        store.record(LAYER, torch.cat([q, q]), k, heads=2, cond_or_uncond=[0, 1], hw=(4, 4))
        return 0.5 * x
    return predict


def test_strength_zero_observes_only():
    store = CaptureStore(RELS, (LAYER,))
    x = torch.randn(2, 4, 4, 4)
    out, report = guided_step(fake_forward(store), x, torch.tensor([3.0, 3.0]), store, GuidanceSettings(strength=0.0))
    assert torch.equal(out, 0.5 * x) and not report.applied and report.loss > 0 and report.sigma == 3.0
    assert not store.capturing and store.take() == []


def test_applied_update_is_eq6_with_the_autograd_gradient():
    store = CaptureStore(RELS, (LAYER,))
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([3.0, 3.0])
    settings = GuidanceSettings(strength=50.0, loss=LossSettings(orthogonal="l2"))
    out, report = guided_step(fake_forward(store), x, sigma, store, settings)
    # the same gradient, computed directly
    xl = x.clone().requires_grad_(True)
    store.capturing = True
    fake_forward(store)(xl)
    store.capturing = False
    (grad,) = torch.autograd.grad(step_loss(store.take(), store.pairs, settings.loss), xl)
    assert report.applied and math.isclose(report.grad_norm, float(grad.norm()), rel_tol=1e-5)
    assert torch.allclose(out, guided_denoised(0.5 * x, grad, sigma, 50.0), atol=1e-6)


def test_the_step_applies_the_formula_it_is_given():
    """guided_step takes the model family's formula for its sampling type (flow matching
    here): the same forward, loss and gradient, another update."""
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.8])
    settings = GuidanceSettings(strength=50.0)
    eps_store, flow_store = CaptureStore(RELS, (LAYER,)), CaptureStore(RELS, (LAYER,))
    eps_out, eps_report = guided_step(fake_forward(eps_store), x, sigma, eps_store, settings)
    flow_out, flow_report = guided_step(fake_forward(flow_store), x, sigma, flow_store, settings,
                                        formula=guided_flow_denoised)
    assert eps_report.applied and flow_report.applied and flow_report.grad_norm == eps_report.grad_norm
    # both moved 0.5 x against the same gradient direction; the eps form by sqrt(1 + sigma^2) more
    eps_shift, flow_shift = eps_out - 0.5 * x, flow_out - 0.5 * x
    assert flow_shift.abs().max() > 0
    assert torch.allclose(eps_shift, flow_shift * math.sqrt(1 + 0.8**2), atol=1e-6)


def test_non_finite_gradient_is_skipped_and_the_output_stays_finite():
    store = CaptureStore(RELS, (LAYER,))
    x = torch.randn(1, 4, 4, 4)
    out, report = guided_step(fake_forward(store, scale=float("inf")), x, torch.tensor([3.0]), store,
                              GuidanceSettings())
    assert report.skipped and not report.applied
    assert torch.equal(out, 0.5 * x) and torch.isfinite(out).all()
