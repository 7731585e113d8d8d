"""Tier 1: presence and separation terms, the refinement burst, the objects list."""
import math

import pytest
import torch

from infsplign.guidance.losses import LossSettings, Objective, Pair, objective_loss
from infsplign.guidance.presence import presence_loss, separation_loss, smoothed
from infsplign.guidance.refine import RefineReport, RefineSettings, refine_index, refine_latent
from infsplign.guidance.relations import RelationError, split_objects


def blob(h, w, cy, cx, peak=1.0, width=1.0):
    y = torch.arange(h, dtype=torch.float32).view(h, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, w)
    return peak * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * width ** 2))


def test_smoothing_keeps_mass_and_spreads_a_spike():
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 4, 4] = 1.0
    s = smoothed(m)
    assert s[0, 0, 4, 4] < 1.0 and s[0, 0, 4, 5] > 0 and s[0, 0, 4, 6] == 0
    assert math.isclose(float(s.sum()), 1.0, rel_tol=1e-5)


def test_presence_counts_the_weakest_object():
    maps = torch.stack([blob(16, 16, 4, 4, 0.9), blob(16, 16, 12, 12, 0.2)])[None]
    loss = presence_loss(maps, (0, 1))
    weak_peak = float(smoothed(maps)[0, 1].max())
    assert math.isclose(float(loss[0]), 1 - weak_peak, rel_tol=1e-6)
    # its gradient reaches the weak object's map only
    maps.requires_grad_(True)
    presence_loss(maps, (0, 1)).sum().backward()
    assert maps.grad[0, 0].abs().sum() == 0 and maps.grad[0, 1].abs().sum() > 0


def test_separation_is_high_for_overlapping_maps_and_low_for_apart_ones():
    apart = torch.stack([blob(16, 16, 4, 4), blob(16, 16, 12, 12)])[None]
    fused = torch.stack([blob(16, 16, 8, 8), blob(16, 16, 8, 9)])[None]
    a, f = float(separation_loss(apart, (0, 1))[0]), float(separation_loss(fused, (0, 1))[0])
    assert a < 0.01 and f > 0.4
    three = torch.stack([blob(16, 16, 8, 8), blob(16, 16, 8, 8), blob(16, 16, 8, 8)])[None]
    assert math.isclose(float(separation_loss(three, (0, 1, 2))[0]), 3.0, rel_tol=1e-4)  # three pairs, IoU 1
    assert float(separation_loss(three, (0,))[0]) == 0.0


def test_objective_sums_the_weighted_terms():
    maps = torch.stack([blob(8, 8, 2, 2, 0.5), blob(8, 8, 5, 6, 0.3)])[None]
    layers = [("coarse", maps)]
    s = LossSettings()
    pairs = (Pair(0, 1, "left"),)
    relations = objective_loss(layers, Objective(pairs), s)
    terms = Objective(pairs, objects=(0, 1), presence=2.0, separation=3.0, relation_weight=0.5)
    expected = 0.5 * relations + 2 * presence_loss(maps, (0, 1)).sum() + 3 * separation_loss(maps, (0, 1)).sum()
    assert torch.allclose(objective_loss(layers, terms, s), expected)
    assert Objective(pairs, relation_weight=0.0).empty and not Objective(objects=(0,), presence=1.0).empty
    assert Objective(objects=(0,), separation=1.0).empty  # one object: nothing to separate


def test_refine_latent_lowers_the_loss_and_reports_each_iteration():
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(1, 4, 8, 8)
    sigma = 3.0
    scale = math.sqrt(sigma ** 2 + 1)

    def loss_at(xx):
        return ((xx / scale - target) ** 2).sum()
    out, report = refine_latent(loss_at, x, sigma, 20, 0.05)
    assert len(report.losses) == 20 and report.final < report.losses[0] and not report.skipped
    assert report.losses[0] == pytest.approx(float((target ** 2).sum()))
    # Adam moves each value by about lr per step in z = x / sqrt(sigma^2 + 1) units
    assert float((out / scale).abs().max()) <= 20 * 0.05 + 1e-4
    assert out.dtype == x.dtype


def test_refine_latent_stops_on_a_non_finite_loss_and_keeps_the_last_finite_latent():
    calls = []

    def loss_at(xx):
        calls.append(xx.detach().clone())
        return (xx.sum() * 0 + float("nan")) if len(calls) == 3 else (xx ** 2).sum() + 1
    x = torch.ones(1, 1, 2, 2)
    out, report = refine_latent(loss_at, x, 1.0, 10, 0.1)
    assert report.skipped == "the loss is not finite" and len(report.losses) == 2
    assert torch.equal(out, calls[1].to(out.dtype))
    none, rep = refine_latent(lambda xx: None, x, 1.0, 5, 0.1)
    assert torch.equal(none, x) and rep.skipped.startswith("no attention maps")


def test_refine_index_is_the_first_step_at_or_below_the_point():
    sigmas = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.0])
    assert refine_index(sigmas, 14.6) == 0 and refine_index(sigmas, 20.0) == 0
    assert refine_index(sigmas, 4.0) == 2 and refine_index(sigmas, 3.0) == 3
    assert refine_index(sigmas, 0.5) is None


@pytest.mark.parametrize("change, says", [
    ({"iterations": 201}, "iterations is 201"),
    ({"iterations": -1}, "iterations is -1"),
    ({"refine_percent": 1.5}, "refine_percent is 1.5"),
    ({"refine_percent": float("nan")}, "refine_percent is nan"),
    ({"learning_rate": 0.0}, "learning_rate is 0.0"),
    ({"presence": -1.0}, "presence is -1.0"),
    ({"memory": "tiny"}, 'memory is "tiny"'),
])
def test_refine_settings_name_the_bad_value(change, says):
    with pytest.raises(ValueError, match="InfSplign Refine settings") as e:
        RefineSettings(**change)
    assert says in str(e.value)


def test_takes_gradient():
    assert RefineSettings().takes_gradient
    assert not RefineSettings(iterations=0).takes_gradient
    assert RefineSettings(iterations=0, continuous=True).takes_gradient
    assert not RefineSettings(presence=0, separation=0, spatial=0).takes_gradient


def test_split_objects():
    assert split_objects("red circle, a blue square and, the green triangle") == [
        "red circle", "blue square", "green triangle"]
    assert split_objects("cat; dog") == ["cat", "dog"]
    with pytest.raises(RelationError, match="an item is empty"):
        split_objects("cat,, dog")
    with pytest.raises(RelationError, match='names "Cat" twice'):
        split_objects("cat, Cat")
    with pytest.raises(RelationError, match="at most 16"):
        split_objects(", ".join(f"thing{i}" for i in range(17)))


def test_report_defaults():
    r = RefineReport(3, 2.0)
    assert r.losses == [] and math.isnan(r.final)
