"""ComfyUI workflow files: the UI format (what users drag in) to the API format (POST /prompt).

The UI format stores each node's widget values as a list, in the order of the node's
widget inputs; the node's input spec (from /object_info) gives that order. INT inputs
marked `control_after_generate` (seeds) are followed by one extra value, the control
mode ("fixed", "randomize", ...). A widget input fed by a link takes the link.
Muted (mode 2) and bypassed (mode 4) nodes are left out; a bypassed node's consumers get
its input of the same type, as the frontend does.
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


def has_control_value(name: str, spec) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] != "INT":
        return False
    return bool(options.get("control_after_generate")) or name in ("seed", "noise_seed")


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
        """[node id, slot] feeding a link, through bypassed nodes."""
        _, node_id, slot, _, _, kind = links[link_id]
        node = nodes[node_id]
        while node.get("mode", 0) == 4:  # bypassed: pass through the first input of that type
            match = [i for i in node.get("inputs", []) if i.get("link") is not None
                     and (i.get("type") == kind or kind == "*")]
            if not match:
                return None
            _, node_id, slot, _, _, _ = links[match[0]["link"]]
            node = nodes[node_id]
        if node.get("mode", 0) == 2:
            return None
        return [str(node_id), slot]

    prompt = {}
    for node_id, node in nodes.items():
        if node.get("mode", 0) in (2, 4) or node["type"] in ("Note", "MarkdownNote", "Reroute"):
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
                cursor += 1
                if has_control_value(name, spec):
                    cursor += 1
            if name in linked:
                src = source(linked[name])
                if src is not None:
                    inputs[name] = src
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return prompt


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
