"""ComfyUI workflow files: the UI format (what users drag in) to the API format (POST /prompt).

The UI format stores each node's widget values as a list, in the order of the node's
widget inputs; the node's input spec (from /object_info, input_order) gives that order.
As the frontend (1.32) builds them: an INT input is followed by one extra value, the
control mode ("fixed", "randomize", ...), when its spec says `control_after_generate`, or
says nothing and is named seed or noise_seed; a COMBO with `control_after_generate` is
followed by two (the mode and its filter text). Values the frontend appends after all of
them (LoadImage's upload widget) are ignored. A widget input fed by a link takes the link.
Muted (mode 2) and bypassed (mode 4) nodes are left out; a bypassed node's consumers get
its input of the output's slot when the type fits, else its first input of that type, as
the frontend does. Frontend-only nodes: notes are dropped, a Reroute passes its input
through, and a PrimitiveNode's value is already in the widget it feeds.
"""
from __future__ import annotations

import json
from pathlib import Path

CONNECTION_ONLY = ("*",)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def is_widget(spec) -> bool:
    kind = spec[0]
    if isinstance(kind, list):
        return True
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput") or options.get("rawLink"):
        return False
    return kind in WIDGET_TYPES


VIRTUAL = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")  # frontend-only node types


def control_values(name: str, spec) -> int:
    """How many values the frontend saves after this widget's own (its control widgets)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] == "INT":
        return 1 if options.get("control_after_generate", name in ("seed", "noise_seed")) else 0
    if isinstance(spec[0], list) or spec[0] == "COMBO":
        return 2 if options.get("control_after_generate") else 0
    return 0


def has_control_value(name: str, spec) -> bool:
    return control_values(name, spec) > 0


def ordered_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node type's inputs in widget order, from its /object_info entry."""
    out = []
    for group in ("required", "optional"):
        specs = info.get("input", {}).get(group, {})
        order = info.get("input_order", {}).get(group, list(specs))
        out += [(name, specs[name]) for name in order]
    return out


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow.get("links", [])}  # id, from node, from slot, to node, to slot, type

    def source(link_id):
        """[node id, slot] feeding a link, through bypassed nodes and reroutes; None when
        nothing executable feeds it (a muted node, a PrimitiveNode, an unlinked input)."""
        _, node_id, slot, _, _, kind = links[link_id]
        for _ in range(len(nodes) + 1):
            node = nodes[node_id]
            if node.get("mode", 0) == 2 or node["type"] == "PrimitiveNode":
                return None
            if node.get("mode", 0) == 4 or node["type"] == "Reroute":
                inputs = node.get("inputs", [])
                index = _bypass_input(node, slot, kind)
                if index is None or inputs[index].get("link") is None:
                    return None
                _, node_id, slot, _, _, _ = links[inputs[index]["link"]]
                continue
            return [str(node_id), slot]
        raise ValueError(f"link {link_id}: circular bypass / reroute chain")

    prompt = {}
    for node_id, node in nodes.items():
        if node.get("mode", 0) in (2, 4) or node["type"] in VIRTUAL:
            continue
        if node["type"] not in object_info:
            raise KeyError(f'node {node_id}: type "{node["type"]}" is not installed on this host')
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs, cursor = {}, 0
        for name, spec in ordered_inputs(object_info[node["type"]]):
            if is_widget(spec):
                if cursor < len(values):
                    inputs[name] = values[cursor]
                cursor += 1 + control_values(name, spec)
            if name in linked:
                src = source(linked[name])
                if src is not None:
                    inputs[name] = src
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def _bypass_input(node: dict, slot: int, kind: str) -> int | None:
    """The input a bypassed node (or a Reroute) passes to its output `slot` of type `kind`:
    the input at the same index when its type fits, else the first input of that type."""
    inputs = node.get("inputs", [])
    if not inputs:
        return None
    if kind in ("*", ""):
        return slot if slot < len(inputs) else 0

    def fits(t):
        return t == kind or t == "*" or kind in str(t).split(",")
    if slot < len(inputs) and fits(inputs[slot].get("type")):
        return slot
    for i, inp in enumerate(inputs):
        if inp.get("type") == kind:
            return i
    for i, inp in enumerate(inputs):
        if fits(inp.get("type")):
            return i
    return None


def local_object_info() -> dict:
    """/object_info's input part, from the node classes of this process (ComfyUI booted)."""
    import nodes
    info = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        try:
            types = cls.INPUT_TYPES()
        except Exception:  # a broken third-party node must not stop the conversion
            continue
        info[name] = {"input": {k: types.get(k, {}) for k in ("required", "optional")},
                      "input_order": {k: list(types.get(k, {})) for k in ("required", "optional")}}
    return info
