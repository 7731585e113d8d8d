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
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphs import Collect
from workflow_checks import (FILE_WIDGETS, PROVIDED, _box, _module, _options, check_against_object_info,
                             overlaps, ui_workflow)

pytestmark = [pytest.mark.host, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "example_workflows"
FILES = sorted(FOLDER.glob("*.json"))
DEMO_WEIGHTS = ROOT / "demo_world" / "infsplign_demo_shapes.safetensors"

SIZE, DEMO_SIZE, STEPS = 64, 128, 4


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
    frontend's side bar, top bars and minimap do not cover it (host/workflow_graph.FREE,
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
    layout = ["injection", "injection_end_percent", "box_loss", "box_weight", "box_end_percent", "box_margin",
              "placing_iterations", "placing_percent"]
    for node_type, values, names in (("InfSplignApply", gen.GUIDANCE_DEFAULTS, None),
                                     ("InfSplignRefine", gen.REFINE_DEFAULTS, None),
                                     ("InfSplignLayout", [*gen.LAYOUT_DEFAULTS, *gen.LAYOUT_OPTIONAL], layout)):
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
