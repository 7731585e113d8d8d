"""The graph of an example workflow as the ComfyUI frontend saves it (UI format): nodes with
their sockets and widgets (host/workflow_schema.py), links, the execution order, and the saved
view that shows the whole graph in a 1920 x 1080 window (host/make_example_workflows.py
builds the workflows with it).

Saved view (extra.ds): opened in a 1920 x 1080 window, the frontend's own bars cover the
left side bar (x < 60 px), the tabs, breadcrumb and Run bar (y < 135 px) and the minimap
(x > 1655, y > 815 px), on frontend 1.32 and 1.49 alike; the view puts the whole graph in
the rest (FREE), as large as fits (tests/tier4 checks it in the real frontends).
"""
from __future__ import annotations

import math

from workflow_schema import SCHEMA


class Workflow:
    def __init__(self, info: str):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.info = info

    def node(self, type_: str, pos, size, widgets=(), title: str | None = None) -> int:
        sockets, widget_specs, outputs = SCHEMA[type_]
        assert len(widgets) == len(widget_specs), (type_, widgets)
        node = {
            "id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size),
            "flags": {}, "order": 0, "mode": 0,
            "inputs": [{"name": n, "type": t, **({"shape": 7} if opt else {}), "link": None}
                       for n, t, opt in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {} if type_ == "MarkdownNote" else {"Node name for S&R": type_},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def note(self, pos, size, text: str) -> int:
        return self.node("MarkdownNote", pos, size, [text])

    def link(self, src: int, slot: int, dst: int, name: str) -> None:
        """Output `slot` of node `src` into input `name` of node `dst` (a socket, or a
        widget, which the frontend then lists as an input with a "widget" entry)."""
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        kind = s["outputs"][slot]["type"]
        target = next((i for i in d["inputs"] if i["name"] == name), None)
        if target is None:  # a widget fed by a link
            widget_type = dict(SCHEMA[d["type"]][1])[name]
            target = {"name": name, "type": widget_type, "link": None, "widget": {"name": name}}
            d["inputs"].append(target)
        assert target["type"] == kind and target["link"] is None, (s["type"], d["type"], name)
        link_id = len(self.links) + 1
        target["link"] = link_id
        s["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src, slot, dst, d["inputs"].index(target), kind])

    def _execution_order(self) -> None:
        """The frontend's "order": a topological order, nodes without inputs first."""
        deps = {n["id"]: {l[1] for l in self.links if l[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= set(done))
            done.append(ready[0])
        for n in self.nodes:
            n["order"] = done.index(n["id"])

    def to_json(self) -> dict:
        self._execution_order()
        for n in self.nodes:
            for out in n["outputs"]:
                if not out["links"]:
                    out["links"] = None
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": view(self.nodes), "info": self.info},
            "version": 0.4,
        }


# The part of a 1920 x 1080 window where nodes are not under the frontend's bars: x0, y0, x1, y1;
# and the minimap's corner (x > MINIMAP[0] and y > MINIMAP[1] is covered).
FREE = (70, 140, 1905, 1065)
MINIMAP = (1650, 810)
TITLE = 30  # the title bar LiteGraph draws above a node's pos


def view(nodes: list[dict]) -> dict:
    """extra.ds that shows every node (title bars included) inside FREE and off the minimap:
    the larger scale of fitting the graph beside the minimap or above it, at most 1, its
    top-left corner at FREE's."""
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] - TITLE for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    w, h = x1 - x0, y1 - y0
    beside = min((MINIMAP[0] - FREE[0]) / w, (FREE[3] - FREE[1]) / h)
    above = min((FREE[2] - FREE[0]) / w, (MINIMAP[1] - FREE[1]) / h)
    scale = math.floor(min(1.0, max(beside, above)) * 1000) / 1000
    # the canvas shows graph point p at (p + offset) * scale
    return {"scale": scale, "offset": [math.ceil((FREE[0] / scale - x0) * 10) / 10,
                                       math.ceil((FREE[1] / scale - y0) * 10) / 10]}


def template_view(nodes: list[dict]) -> dict:
    """The view frontend 1.49 opens a template at (it ignores extra.ds there): the nodes'
    bounds, title bars and 10 px around included, fitted into 75 % of the 1920 x 1080 window
    and centred (LGraphCanvas.ds.fitToBounds)."""
    x0 = min(n["pos"][0] for n in nodes) - 10
    y0 = min(n["pos"][1] - TITLE for n in nodes) - 10
    w = max(n["pos"][0] + n["size"][0] for n in nodes) + 10 - x0
    h = max(n["pos"][1] + n["size"][1] for n in nodes) + 10 - y0
    scale = min(0.75 * 1920 / max(w, 300), 0.75 * 1080 / max(h, 300))
    return {"scale": scale, "offset": [-x0 - w / 2 + 1920 / scale / 2, -y0 - h / 2 + 1080 / scale / 2]}
