"""Tier 3: every example workflow (example_workflows/*.json), as a user drags it into ComfyUI.

For each file: every node type is installed on a real ComfyUI server (GET /object_info of
host/comfy_server.py's `main.py --cpu`, fetched once per module); the sockets, links and
outputs agree with that node's /object_info entry; every saved widget value is valid for
its input, in the order the frontend saves them (numbers in range and of the right type,
combo values in the list, control_after_generate values after seeds); the layout has no
overlapping nodes. Then host/ui_workflow.py converts it to the API format with that
/object_info, and ComfyUI's executor (tests/comfy_host.py, in-process) runs it.

Model files: the workflows name real models (README of example_workflows/); the test
writes narrow test models under exactly those names into temporary folders registered
with folder_paths (checkpoints of the SD1.x / SDXL test topologies from testkit.models and
of the Flux.1-dev / SD3.5 ones from testkit.mmdit_models,
a LoRA and a ControlNet from testkit.files) and a generated control image as
example.png into a temporary input folder. Workflow d uses the pack's shipped demo
weights, and the test checks they are the file loaded.

Shrunk for run time on a CPU, and nothing else changed: every EmptyLatentImage (and SD3 one) to
64 x 64 px (kept at 128 x 128 where the demo model draws, which it was trained at), and
the steps of KSampler / BasicScheduler to 4. The guidance window (first 25 %, 50 % in d)
still covers the first step.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphs import Collect

pytestmark = [pytest.mark.host, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "example_workflows"
FILES = sorted(FOLDER.glob("*.json"))
DEMO_WEIGHTS = ROOT / "demo_world" / "infsplign_demo_shapes.safetensors"

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
SIZE, DEMO_SIZE, STEPS = 64, 128, 4
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


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real server (`main.py --cpu`), started before the in-process host boots (session
    scope, named before `host` in the tests), so that it starts up meanwhile. Stopped as soon
    as its /object_info is read."""
    import comfy_host
    s = comfy_host.Server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def provided(host, server, tmp_path_factory):
    """The model files and the input image of PROVIDED, in folders ComfyUI knows."""
    import folder_paths
    from testkit import files, mmdit_models, models
    base = tmp_path_factory.mktemp("example_models")
    for kind in ("checkpoints", "loras", "controlnet"):
        (base / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(base / kind))
    for name, topology in PROVIDED["checkpoints"].items():
        kind = mmdit_models if topology in mmdit_models.TOPOLOGIES else models
        kind.save_checkpoint(str(base / "checkpoints" / name), topology)
    for name, topology in PROVIDED["loras"].items():
        files.save_lora(str(base / "loras" / name), topology)
    for name, topology in PROVIDED["controlnet"].items():
        files.save_controlnet(str(base / "controlnet" / name), topology)
    (base / "input").mkdir()
    for name in PROVIDED["input"]:  # a control picture: two outlined boxes, left and right
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        img[16:48, 6:28] = 255
        img[18:46, 8:26] = 0
        img[20:44, 38:60] = 255
        img[22:42, 40:58] = 0
        Image.fromarray(img).save(base / "input" / name)
    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(base / "input"))
    yield base
    folder_paths.set_input_directory(previous)


@pytest.fixture(scope="module")
def object_info(server, provided):
    server.wait_ready()
    info = server.get("/object_info")
    server.stop()
    return info


@pytest.fixture
def loaded_files(monkeypatch):
    """Paths of the model files comfy.utils.load_torch_file reads during a run."""
    import comfy.utils
    seen, original = [], comfy.utils.load_torch_file

    def spy(path, *args, **kwargs):
        seen.append(Path(path).resolve())
        return original(path, *args, **kwargs)
    monkeypatch.setattr(comfy.utils, "load_torch_file", spy)
    return seen


# -- checks of the UI file against /object_info ------------------------------------------

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

def shrink(api: dict) -> dict:
    """The only changes made for run time: latent size and steps (see the module doc)."""
    api = copy.deepcopy(api)
    demo = any(n["class_type"] == "InfSplignDemoModelLoader" for n in api.values())
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs["width"] = inputs["height"] = DEMO_SIZE if demo else SIZE
        if node["class_type"] in ("KSampler", "BasicScheduler"):
            inputs["steps"] = STEPS
    return api


def image_size(api: dict, ref) -> tuple[int, int]:
    """(height, width) of the IMAGE at output `ref` ([node, slot]), traced back to the latent."""
    node = api[ref[0]]
    kind, inputs = node["class_type"], node["inputs"]
    if kind == "VAEDecode":
        return image_size(api, inputs["samples"])
    if kind in ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"):
        return image_size(api, inputs["latent_image"])
    if kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
        return inputs["height"] // 8 * 8, inputs["width"] // 8 * 8
    if kind == "ImageStitch":
        (h1, w1), (h2, w2) = image_size(api, inputs["image1"]), image_size(api, inputs["image2"])
        gap = inputs.get("spacing_width", 0)
        if inputs["direction"] in ("left", "right"):
            return h1, w1 + gap + w2
        return h1 + gap + h2, w1
    raise NotImplementedError(f"image_size: teach it {kind}")


IMAGE_OUTPUTS = ("SaveImage", "PreviewImage")


def acted(report) -> bool:
    """A guided step that moved the prediction, or a refinement that lowered its loss."""
    if report.skipped:
        return False
    if hasattr(report, "grad_norm"):
        return report.applied and report.grad_norm > 0
    return bool(report.losses) and report.final < report.losses[0]


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_example_workflow(path, server, host, provided, object_info, loaded_files):
    wf = ui_workflow()
    workflow = wf.load(path)
    assert workflow.get("version") == 0.4 and "last_link_id" in workflow
    problems = check_against_object_info(workflow, object_info)
    assert not problems, "\n".join(problems)
    assert not overlaps(workflow), f"overlapping nodes (ids): {overlaps(workflow)}"

    api = shrink(wf.to_api(workflow, object_info))
    logger, collect = logging.getLogger("infsplign"), Collect()
    level = logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    session = host.Session()
    try:
        run = session.execute(api)
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    assert run.success, run.error()

    reports = [r.infsplign for r in collect.records if hasattr(r, "infsplign")]
    assert any(acted(r) for r in reports), reports

    import folder_paths
    outputs = [k for k, n in api.items() if n["class_type"] in IMAGE_OUTPUTS]
    assert outputs, "the workflow shows no image"
    for key in outputs:
        ref = api[key]["inputs"]["images"]
        h, w = image_size(api, ref)
        cached = session.cached(ref[0])
        tensor = cached.outputs[ref[1]]
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        assert tensor.shape[1:] == (h, w, 3), (key, tuple(tensor.shape))
        assert bool(tensor.isfinite().all()) and float(tensor.std()) > 0, key
        for item in run.outputs[key]["images"]:
            folder = folder_paths.get_directory_by_type(item["type"])
            with Image.open(Path(folder) / item["subfolder"] / item["filename"]) as im:
                assert im.size == (w, h)

    loaded = set(loaded_files)
    if any(n["class_type"] == "InfSplignDemoModelLoader" for n in api.values()):
        assert DEMO_WEIGHTS.resolve() in loaded, loaded  # the shipped weights, nothing substituted
    for node in api.values():  # and every model file named in the workflow is a test file
        for (kind, name), folder in FILE_WIDGETS.items():
            if node["class_type"] == kind and folder != "input":
                assert (provided / folder / node["inputs"][name]).resolve() in loaded


def test_generated_workflows_are_committed_and_laid_out_left_to_right():
    """a, b, c, e, f, g and h are written by host/make_example_workflows.py, and d's saved view: the
    files are its output, and every link runs from a node's column to a column further right."""
    gen = _module("make_example_workflows", ROOT / "host" / "make_example_workflows.py")
    texts = gen.outputs()
    assert sorted(texts) == sorted(p.name for p in FILES)
    for name, text in texts.items():
        assert (FOLDER / name).read_text() == text, f"{name}: run host/make_example_workflows.py"
    for name in gen.WORKFLOWS:
        workflow = json.loads((FOLDER / name).read_text())
        nodes = {n["id"]: n for n in workflow["nodes"]}
        for _, src, _, dst, _, _ in workflow["links"]:
            assert _box(nodes[src])[2] < nodes[dst]["pos"][0], (name, src, dst)


def test_saved_views_show_the_whole_graph_in_a_1920_by_1080_window():
    """Opened in a 1920 x 1080 window, every node, title bar included, lies where the
    frontend's side bar, top bars and minimap do not cover it (host/make_example_workflows.FREE,
    MINIMAP; tests/tier4 checks it in the real frontends), at a zoom where the frontend still
    draws node text (0.6 and above): at the saved view (a dropped file; Templates on frontend
    1.32) and at the view frontend 1.49 opens a template at (the graph fitted to the window)."""
    gen = _module("make_example_workflows", ROOT / "host" / "make_example_workflows.py")
    for path in FILES:
        workflow = json.loads(path.read_text())
        for how, ds in (("saved view", workflow["extra"]["ds"]), ("1.49 template view", gen.template_view(workflow["nodes"]))):
            _check_view(f"{path.name} ({how})", workflow, ds, gen)


def _check_view(name: str, workflow: dict, ds: dict, gen) -> None:
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert 0.6 <= scale <= 1, (name, scale)
    for n in workflow["nodes"]:
        x0, y0, x1, y1 = ((v + o) * scale for v, o in zip(_box(n), (ox, oy, ox, oy)))
        where = f"{name}: node {n['id']} at {[round(v) for v in (x0, y0, x1, y1)]}"
        assert gen.FREE[0] <= x0 and gen.FREE[1] <= y0 and x1 <= gen.FREE[2] and y1 <= gen.FREE[3], where
        assert not (x1 > gen.MINIMAP[0] and y1 > gen.MINIMAP[1]), f"{where}: under the minimap"


def test_every_workflow_has_a_thumbnail_made_from_it():
    """ComfyUI's Templates dialog shows <name>.jpg beside each example workflow: each is there,
    a 512 x 512 JPEG whose stamp says it was made from the workflow as it is now."""
    thumbs = _module("make_thumbnails", ROOT / "host" / "make_thumbnails.py")
    for path in FILES:
        jpg = path.with_suffix(".jpg")
        assert jpg.is_file(), f"{jpg.name} is missing: run host/make_thumbnails.py"
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.size == (thumbs.SIDE, thumbs.SIDE), (jpg.name, im.format, im.size)
            assert np.asarray(im.convert("L")).std() > 10, f"{jpg.name} is a flat picture"
        assert thumbs.stamp_of(jpg) == thumbs.fingerprint(json.loads(path.read_text())), \
            f"{jpg.name} was made from an older {path.name}: run host/make_thumbnails.py"
    assert sorted(FOLDER.glob("*.jpg")) == [p.with_suffix(".jpg") for p in FILES], "a thumbnail without its workflow"


def _widget_names(entry: dict) -> list[str]:
    """A node's widget inputs (not sockets), in the order the frontend saves their values."""
    specs = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
    order = entry["input_order"].get("required", []) + entry["input_order"].get("optional", [])
    widget = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")
    return [n for n in order if isinstance(specs[n][0], list) or specs[n][0] in widget]


def test_workflows_at_the_nodes_defaults_carry_the_nodes_defaults(object_info):
    """The generator's "at its defaults" values are the nodes' /object_info defaults, so a
    tuned default cannot leave the example workflows behind."""
    gen = _module("make_example_workflows", ROOT / "host" / "make_example_workflows.py")
    layout = ["injection", "injection_end_percent", "box_loss", "box_weight", "box_end_percent"]
    for node_type, values, names in (("InfSplignApply", gen.GUIDANCE_DEFAULTS, None),
                                     ("InfSplignRefine", gen.REFINE_DEFAULTS, None),
                                     ("InfSplignLayout", gen.LAYOUT_DEFAULTS, layout)):
        entry = object_info[node_type]
        names = names or _widget_names(entry)
        specs = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
        defaults = [_options(specs[n])["default"] for n in names]
        assert values == defaults, (node_type, dict(zip(names, values)), dict(zip(names, defaults)))


def test_readme_names_every_workflow_and_its_model_files():
    readme = (FOLDER / "README.md").read_text()
    wf = ui_workflow()
    for path in FILES:
        assert f"`{path.name}`" in readme, path.name
        line = next(line for line in readme.split("\n- ") if f"`{path.name}`" in line)
        for node in wf.load(path)["nodes"]:
            for (kind, name), folder in FILE_WIDGETS.items():
                if node["type"] == kind and folder != "input":
                    value = node["widgets_values"][0]
                    assert value in line, (path.name, value)


# -- the converter on what the example files do not hold ---------------------------------

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
