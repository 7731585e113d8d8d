"""Tier 3: host/ui_workflow.py, the UI-to-API converter the example workflow tests run every
file through, on what the example files do not hold: muted and bypassed nodes, links into
widgets, reroutes, control_after_generate values, frontend-only nodes."""
from __future__ import annotations

import pytest

from workflow_checks import ui_workflow

pytestmark = pytest.mark.host


INFO = {
    "Loader": {"input": {"required": {}}, "input_order": {"required": []}},
    "Cond": {"input": {"required": {"text": ["STRING", {}]}}, "input_order": {"required": ["text"]}},
    "CNApply": {"input": {"required": {"positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
                                       "strength": ["FLOAT", {}]}},
                "input_order": {"required": ["positive", "negative", "strength"]}},
    "Sampler": {"input": {"required": {"positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
                                       "seed": ["INT", {"control_after_generate": False}],
                                       "noise_seed": ["INT", {}],
                                       "pick": [["a", "b"], {"control_after_generate": True}],
                                       "steps": ["INT", {}]}},
                "input_order": {"required": ["positive", "negative", "seed", "noise_seed", "pick", "steps"]}},
}


def _node(id_, type_, inputs=(), widgets=(), mode=0, outputs=1):
    return {"id": id_, "type": type_, "mode": mode, "widgets_values": list(widgets),
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": "out", "type": "CONDITIONING", "links": []} for _ in range(outputs)]}


def test_converter_frontend_rules():
    """Bypassed ControlNetApplyAdvanced-like node: its negative output passes its negative
    input (same slot), not its first CONDITIONING; a Reroute passes its input through; a
    PrimitiveNode's value stays in the widget it feeds; an explicit control_after_generate
    False on a seed adds no control value, a combo with it adds two (mode and filter)."""
    wf = ui_workflow()
    workflow = {
        "nodes": [
            _node(1, "Cond", widgets=["pos"]), _node(2, "Cond", widgets=["neg"]),
            _node(3, "CNApply", [("positive", "CONDITIONING", 1), ("negative", "CONDITIONING", 2)],
                  widgets=[1.0], mode=4, outputs=2),
            _node(4, "Reroute", [("", "*", 4)]),
            _node(5, "PrimitiveNode", widgets=[9]),
            _node(6, "Sampler", [("positive", "CONDITIONING", 3), ("negative", "CONDITIONING", 6),
                                 ("steps", "INT", 7)],
                  widgets=[11, 22, "fixed", "b", "fixed", "", 9]),
            _node(7, "Note", widgets=["hello"]),
        ],
        "links": [[1, 1, 0, 3, 0, "CONDITIONING"], [2, 2, 0, 3, 1, "CONDITIONING"],
                  [3, 3, 0, 6, 0, "CONDITIONING"], [4, 3, 1, 4, 0, "CONDITIONING"],
                  [6, 4, 0, 6, 1, "CONDITIONING"],
                  [7, 5, 0, 6, 5, "INT"]],
    }
    api = wf.to_api(workflow, INFO)
    assert set(api) == {"1", "2", "6"}
    assert api["6"]["inputs"] == {"positive": ["1", 0], "negative": ["2", 0], "seed": 11,
                                  "noise_seed": 22, "pick": "b", "steps": 9}
