"""Tier 2: the pack's UNet block patches when an earlier output_block_patch hands on
`hsp = None` (it merged the skip itself; ComfyUI 0.33 accepts that and skips its own
concatenation). Called directly, so this runs on every host; tests/tier3/test_compat.py
runs the same through the executor where the host's UNet accepts it."""
import pytest
import torch

pytestmark = pytest.mark.host


def store():
    from infsplign.guidance.capture import CaptureStore, Layer
    from infsplign.guidance.relations import BoundRelation, Relation, SpatialRelations
    rels = SpatialRelations((BoundRelation(Relation("cat", "left", "dog"), (2,), (5,)),), "a cat left of a dog", "clip_l", 7)
    s = CaptureStore(rels, (Layer(3, 0, "coarse"), Layer(5, 0, "mid")))
    s.capturing = True
    return s


def merge(h, hsp, options):
    return (h, hsp) if hsp is None else (torch.cat([h, 0.5 * hsp], dim=1), None)


def merge_in_place(h, hsp, options):
    """Like FreeU: writes into the tensor it was given, then merges."""
    if hsp is None:
        return h, hsp
    h[:, :1] = h[:, :1] * 2.0
    return torch.cat([h, hsp], dim=1), None


def test_stop_graph_after_passes_a_missing_skip_on(host):
    from infsplign.engine.families.unet_patches import stop_graph_after
    patch = stop_graph_after(store())
    h = torch.randn(1, 4, 2, 2, requires_grad=True)
    with torch.enable_grad():
        out, skip = patch(h * 1.0, None, {"block": ("output", 6)})  # after the last captured block
        assert skip is None and not out.requires_grad
        out, skip = patch(h * 1.0, None, {"block": ("output", 4)})  # inside: the graph stays
        assert skip is None and out.requires_grad


def test_a_guarded_foreign_patch_may_return_no_skip(host):
    """The autograd guard runs another pack's output_block_patch on a guided step: its
    merged output keeps a gradient to both inputs, with hsp None out, and a later call
    with hsp None in is passed on."""
    from infsplign.engine.families.unet_patches import autograd_guard
    guarded = autograd_guard(store(), merge)
    h = torch.randn(1, 2, 2, 2, requires_grad=True)
    hsp = torch.randn(1, 2, 2, 2, requires_grad=True)
    with torch.enable_grad():
        out, skip = guarded(h * 1.0, hsp * 1.0, {"block": ("output", 3)})
        assert skip is None and torch.equal(out, merge(h, hsp, {})[0])
        gh, gs = torch.autograd.grad(out.sum(), (h, hsp))
        assert torch.equal(gh, torch.ones_like(h)) and torch.equal(gs, torch.full_like(hsp, 0.5))
        again, skip = guarded(out, None, {"block": ("output", 3)})
        assert skip is None and again is out


def test_a_guarded_patch_that_writes_in_place_and_merges(host):
    """One that also writes into its input (as FreeU does) runs on copies: its exact values,
    hsp None, and the caller's tensors untouched (a merged output of another shape has no
    straight-through gradient; the skip's values still come out exactly)."""
    from infsplign.engine.families.unet_patches import autograd_guard
    guarded = autograd_guard(store(), merge_in_place)
    h = torch.randn(1, 2, 2, 2)
    hsp = torch.randn(1, 2, 2, 2)
    want = merge_in_place(h.clone(), hsp.clone(), {})[0]
    before = h.clone()
    with torch.enable_grad():
        out, skip = guarded(h, hsp, {"block": ("output", 3)})
    assert skip is None and torch.equal(out, want) and torch.equal(h, before)
