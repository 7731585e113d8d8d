"""What tests/tier3/test_example_workflows.py checks in a workflow file before running it: the
model files it names (those the test provides, PROVIDED), every node, socket, link and saved
widget value against a real server's /object_info entry (check_against_object_info), and the
nodes' layout (overlaps). The UI-to-API converter is host/ui_workflow.py (ui_workflow()).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

# The model files the workflows expect users to have, and the test model written under
# each name (topology of testkit.models); "input" holds ComfyUI's input images.
PROVIDED = {
    "checkpoints": {"v1-5-pruned-emaonly.safetensors": "sd1", "sd_xl_base_1.0.safetensors": "sdxl",
                    "flux1-dev-fp8.safetensors": "flux_dev",
                    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors": "sd3"},
    "loras": {"your_sd15_lora.safetensors": "sd1"},
    "controlnet": {"control_v11p_sd15_canny_fp16.safetensors": "sd1"},
    "input": {"example.png": None},
}
FILE_WIDGETS = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints", ("LoraLoader", "lora_name"): "loras",
                ("ControlNetLoader", "control_net_name"): "controlnet", ("LoadImage", "image"): "input"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL = {"fixed", "increment", "decrement", "randomize"}
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ui_workflow():
    import comfy_host  # noqa: F401  (puts host/ on sys.path)
    import ui_workflow as wf
    return wf


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo(spec):
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return _options(spec).get("options", [])
    return None


def _check_value(where: str, node_type: str, name: str, spec, value, errors: list) -> None:
    options, combo = _options(spec), _combo(spec)
    if (node_type, name) in FILE_WIDGETS:
        folder = FILE_WIDGETS[node_type, name]
        if value not in PROVIDED[folder]:
            errors.append(f"{where}: {value!r} is not a file this test provides in {folder}/ (PROVIDED)")
    elif combo is not None:
        if value not in combo:
            errors.append(f"{where}: {value!r} not among {combo}")
    elif spec[0] in ("INT", "FLOAT"):
        ok_type = (int,) if spec[0] == "INT" else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            errors.append(f"{where}: {value!r} is not {spec[0]}")
        elif not options.get("min", -np.inf) <= value <= options.get("max", np.inf):
            errors.append(f"{where}: {value!r} outside [{options.get('min')}, {options.get('max')}]")
    elif spec[0] == "STRING" and not isinstance(value, str):
        errors.append(f"{where}: {value!r} is not a STRING")
    elif spec[0] == "BOOLEAN" and not isinstance(value, bool):
        errors.append(f"{where}: {value!r} is not a BOOLEAN")


def _is_upload(spec) -> bool:
    o = _options(spec)
    return _combo(spec) is not None and any(o.get(k) for k in ("image_upload", "video_upload", "animated_image_upload"))


def check_against_object_info(workflow: dict, info: dict) -> list[str]:
    """Everything in the UI file that the frontend would not have saved for these nodes."""
    wf = ui_workflow()
    errors = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in workflow["nodes"]:
        where = f'node {n["id"]} ({n["type"]})'
        if n["type"] in FRONTEND_ONLY:
            continue
        if n["type"] not in info:
            errors.append(f"{where}: not installed on the server")
            continue
        entry = info[n["type"]]
        specs = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
        for inp in n.get("inputs", []):
            spec = specs.get(inp["name"])
            if spec is None:
                errors.append(f'{where}: input {inp["name"]} unknown')
                continue
            declared = "COMBO" if _combo(spec) is not None else spec[0]
            if inp["type"] != declared:
                errors.append(f'{where}: input {inp["name"]} is {inp["type"]}, the server says {declared}')
            if wf.is_widget(spec) and inp.get("link") is not None and inp.get("widget", {}).get("name") != inp["name"]:
                errors.append(f'{where}: linked widget input {inp["name"]} lacks "widget"')
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for name, spec in entry["input"].get("required", {}).items():
            if not wf.is_widget(spec) and name not in linked:
                errors.append(f"{where}: required input {name} is not connected")
        outs = [(o["name"], o["type"]) for o in n.get("outputs", [])]
        want = list(zip(entry["output_name"], entry["output"]))
        # A core node may gain outputs at the end in a later ComfyUI (SaveImage's IMAGE in 0.33):
        # a file saved before lists the ones it had, and the frontend adds the new ones on load.
        # The pack's own nodes match exactly.
        if outs != want and (n["type"].startswith("InfSplign") or outs != want[:len(outs)]):
            errors.append(f"{where}: outputs {outs} != {want}")
        # widgets_values: each widget's value, then its control values, in input_order
        values = list(n.get("widgets_values") or [])
        cursor, upload = 0, False
        for name, spec in wf.ordered_inputs(entry):
            if not wf.is_widget(spec):
                continue
            upload = upload or _is_upload(spec)
            if cursor >= len(values):
                errors.append(f"{where}: no value saved for widget {name}")
                break
            _check_value(f"{where} {name}", n["type"], name, spec, values[cursor], errors)
            extra = wf.control_values(name, spec)
            for v in values[cursor + 1:cursor + 1 + min(extra, 1)]:
                if v not in CONTROL | ({"increment-wrap"} if extra == 2 else set()):
                    errors.append(f"{where}: {v!r} after {name} is no control_after_generate mode")
            cursor += 1 + extra
        if upload:  # the frontend's upload widget, saved last
            if values[cursor:cursor + 1] != ["image"]:
                errors.append(f"{where}: the upload widget's value 'image' is missing")
            cursor += 1
        if cursor != len(values):
            errors.append(f"{where}: {len(values)} widget values saved, the frontend saves {cursor}")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        s, d = nodes[src], nodes[dst]
        out, inp = s["outputs"][src_slot], d["inputs"][dst_slot]
        if out["type"] != kind or link_id not in (out.get("links") or []):
            errors.append(f"link {link_id}: not on output {src_slot} of node {src}")
        if inp.get("link") != link_id or inp["type"] not in (kind, "*"):
            errors.append(f"link {link_id}: not on input {dst_slot} of node {dst}")
    ids = [n["id"] for n in workflow["nodes"]]
    if len(set(ids)) != len(ids) or workflow["last_node_id"] < max(ids):
        errors.append("node ids repeat or exceed last_node_id")
    if workflow["links"] and workflow["last_link_id"] < max(l[0] for l in workflow["links"]):
        errors.append("link ids exceed last_link_id")
    return errors


def _box(n: dict):
    (x, y), (w, h) = n["pos"], n["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def overlaps(workflow: dict) -> list[tuple[int, int]]:
    boxes = [(n["id"], _box(n)) for n in workflow["nodes"]]
    return [(a, b) for i, (a, p) in enumerate(boxes) for b, q in boxes[i + 1:]
            if p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]]


# -- the run -------------------------------------------------------------------------------
