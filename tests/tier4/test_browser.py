"""Tier 4: the pack in the real ComfyUI web frontend, in headless Chromium.

Starts the real server (host/comfy_server.py, `main.py --cpu` on loopback, serving the
pinned comfyui_frontend_package), and runs tests/browser/ui_check.mjs (playwright-core,
Debian's /usr/bin/chromium; both installed by host/setup_browser.sh, which `make test`
runs). The script opens the page, and
  1. queues a two-node graph (demo model -> Spatial Relation Parse) whose prompt holds
     HTML/script markup, once failing (no relation) and once parsed (objects named by
     overrides that carry the markup);
  2. loads example workflow d (the real file) and queues it with the Run button;
  3. opens the node help panel of Spatial Relation Parse with the (i) button;
  4. repeats 1 under the opt-in Vue node renderer ("Nodes 2.0"), then switches it off;
and writes what it saw as JSON; the tests below assert on it. Before those, it opens the
Templates dialog (the pack's workflows, their titles and thumbnails), opens workflow e from
it, checks its saved view, runs it and reads its loss plot, its Layout Boxes node and the
deprecation warnings logged meanwhile. Screenshots go to output/browser/. A missing browser
is a failure, not a skip.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

pytestmark = [pytest.mark.host, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "example_workflows" / "d - Demo model, unguided vs InfSplign.json"
TEMPLATES = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
BOXES_TEMPLATE = "e - Demo model, layout boxes"
SCRIPT = ROOT / "tests" / "browser" / "ui_check.mjs"
MODULES = ROOT / ".host" / "browser" / "node_modules"
CHROMIUM = Path(os.environ.get("INFSPLIGN_CHROMIUM", "/usr/bin/chromium"))
SHOTS = ROOT / "output" / "browser"
MARKUP = ('a <img src=x onerror="window.__pwned=1"> cat <b>left</b> of a '
          '<script>window.__pwned=2</script> dog')
SETUP_HINT = ("`make test` installs it first (`make setup-browser` = host/setup_browser.sh; as root: "
              "apt-get install chromium chromium-driver, and npm ci of tests/browser/package-lock.json "
              "into .host/browser)")


def _require_browser_bits() -> str:
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: the browser tests need it. {SETUP_HINT}.",
                    pytrace=False)
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"Node.js (`node`) is missing: the browser tests need it. {SETUP_HINT}.", pytrace=False)
    if not (MODULES / "playwright-core" / "package.json").is_file():
        pytest.fail(f"playwright-core is missing from {MODULES}. {SETUP_HINT}.", pytrace=False)
    return node


@pytest.fixture(scope="module")
def seen(request, tmp_path_factory):
    """Run the browser script once against a fresh server; what it observed."""
    node = _require_browser_bits()
    sys.path.insert(0, str(ROOT / "host"))
    from comfy_server import Server

    workdir = tmp_path_factory.mktemp("browser_server")
    result_file = workdir / "result.json"
    server = Server(workdir)
    try:
        server.wait_ready()
        env = {**os.environ,
               "INFSPLIGN_BASE_URL": server.base, "INFSPLIGN_WORKFLOW": str(WORKFLOW),
               "INFSPLIGN_MARKUP": MARKUP, "INFSPLIGN_SHOTS": str(SHOTS),
               "INFSPLIGN_RESULT": str(result_file), "INFSPLIGN_MODULES": str(MODULES),
               "INFSPLIGN_CHROMIUM": str(CHROMIUM), "INFSPLIGN_TEMPLATES": json.dumps(TEMPLATES),
               "INFSPLIGN_BOXES_TEMPLATE": BOXES_TEMPLATE}
        try:
            proc = subprocess.run([node, str(SCRIPT)], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=540)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"the browser script ran past {e.timeout} s:\n{e.stderr}\nserver log:\n{server.log()}",
                        pytrace=False)
        if not result_file.is_file():
            pytest.fail(f"the browser script wrote no result (exit {proc.returncode}):\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\nserver log:\n{server.log()}",
                        pytrace=False)
        data = json.loads(result_file.read_text())
        data["script_log"] = proc.stderr[-3000:]
        data["server_log"] = server.log()
    finally:
        server.stop()
    _report(request, data)
    if data.get("fatal"):
        pytest.fail(f"the browser script failed: {data['fatal']}\n{data['script_log']}\n"
                    f"server log:\n{data['server_log']}", pytrace=False)
    return data


def _report(request, data: dict) -> None:
    """Screenshot paths and timings on the terminal, past pytest's output capture."""
    lines = [f"[browser] screenshot {name}: {path}" for name, path in data.get("screenshots", {}).items()]
    t = data.get("timings", {})
    lines.append(f"[browser] frontend {data.get('frontend', {}).get('version')}; workflow d ran in "
                 f"{t.get('workflow_run_s')} s; browser session {t.get('total')} s")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is None or reporter is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


def _no_markup_in_dom(report: dict, when: str) -> None:
    assert report["pwned"] is None, f"{when}: markup from the prompt ran as script (window.__pwned = {report['pwned']})"
    assert report["img_src_x"] == 0 and report["onerror_elements"] == 0, f"{when}: an <img> was created from the prompt: {report}"
    assert report["scripts_with_pwned"] == 0, f"{when}: a <script> element was created from the prompt: {report}"
    assert report["bold_left"] == 0, f"{when}: a <b> element was created from the prompt: {report}"
    assert not report["attributes_with_pwned"], f"{when}: prompt text reached HTML attributes: {report}"


def test_the_extension_loads_once_without_errors(seen):
    assert sorted(seen["frontend"]["infsplign_extensions"]) == ["infsplign.layoutEditor", "infsplign.relationSummary"], \
        seen["frontend"]
    ours = [e for e in seen["console_errors"] + seen["page_errors"] if "infsplign" in e.lower()]
    assert not ours, f"errors from the pack in the browser console: {ours}"


def test_example_workflow_d_shows_its_images_and_the_parsed_relation(seen):
    from infsplign.guidance.relations import parse_relations

    wf = seen["workflow"]
    assert wf["run"]["status"] == "execution_success", f"workflow d failed in the browser: {wf['run']}"
    assert wf["image_nodes"], "workflow d has no SaveImage/PreviewImage node"
    for node_id in wf["image_nodes"]:
        images = wf["images"][str(node_id)]
        assert images, f"image node {node_id} shows no image after the run"
        for im in images:
            assert im["complete"] and im["width"] > 0, f"image on node {node_id} did not load: {im}"
            assert "/view?" in im["src"], im
        fetched = wf["image_fetch"][str(node_id)]
        assert fetched["status"] == 200 and fetched["type"] == "image/png" and fetched["bytes"] > 1000, fetched

    (parse_id,) = wf["parse_nodes"]
    shown = wf["summaries"][str(parse_id)]
    assert shown["widget"], "Spatial Relation Parse shows no summary after the run"
    assert shown["box"] == shown["widget"] and shown["box_visible"], shown
    prompt = wf["prompt"]
    assert prompt, "workflow d has no prompt text node"
    for r in parse_relations(prompt):
        verb = "near" if r.relation == "near" else f"{r.relation} of"
        assert f'"{r.object_a}" {verb} "{r.object_b}"' in shown["widget"], (prompt, shown["widget"])
    assert "parsed" not in wf["prompt_inputs"][str(parse_id)], \
        f"the display widget is sent to the server as an input: {wf['prompt_inputs']}"
    _no_markup_in_dom(wf["after_run"], "workflow d")


def test_attention_preview_shows_its_image_when_workflow_d_has_one(seen):
    wf = seen["workflow"]
    if not wf["attention_preview_nodes"]:
        pytest.skip("example workflow d has no InfSplignAttentionPreview node (yet)")
    for node_id in wf["attention_preview_nodes"]:
        images = wf["images"][str(node_id)]
        assert images, f"InfSplignAttentionPreview node {node_id} shows no image after the run"
        for im in images:
            assert im["complete"] and im["width"] > 0, f"preview image on node {node_id} did not load: {im}"
        assert wf["image_fetch"][str(node_id)]["status"] == 200, wf["image_fetch"]


def test_markup_in_the_prompt_is_shown_as_text(seen):
    m = seen["markup"]
    # A prompt with no relation: the error the frontend shows quotes it literally.
    assert m["error_run"]["status"] == "execution_error", m["error_run"]
    assert MARKUP in m["error_run"]["error"]["exception_message"], m["error_run"]
    assert m["error_shown_verbatim"], "the error message with the prompt's markup is not shown as text"
    _no_markup_in_dom(m["after_error"], "after the parse error")

    # Objects named by overrides that carry markup: the summary repeats it verbatim.
    assert m["run"]["status"] == "execution_success", m["run"]
    assert m["text_widget"] == MARKUP
    summary = m["summary_widget"]
    assert summary and f'"{m["object_a"]}" left of "{m["object_b"]}"' in summary, summary
    box = m["summary_box"]
    assert box is not None, "no summary text box on the node"
    assert box["value"] == summary and box["readOnly"] and box["visible"], box
    assert box["children"] == 0, "the summary box holds elements, not text"
    _no_markup_in_dom(m["after_run"], "after the parse")


def test_markup_is_shown_as_text_with_the_vue_node_renderer_too(seen):
    v = seen["vue"]
    assert v["run"]["status"] == "execution_success", v["run"]
    assert v["vue_enabled"] is True
    summary = v["summary_widget"]
    assert summary and seen["markup"]["object_b"] in summary, summary
    assert v["boxes"], "with Nodes 2.0 the parse node shows no text box holding the summary"
    assert all(b["readOnly"] and b["children"] == 0 for b in v["boxes"]), v["boxes"]
    _no_markup_in_dom(v["after_run"], "Vue node renderer")


def test_every_pack_node_has_help_in_the_frontend(seen):
    docs = seen["help"]["docs"]
    assert "InfSplignRelationParse" in docs and len(docs) >= 5, docs.keys()
    for name, doc in docs.items():
        assert doc["status"] == 200, f"no help page web/docs/{name}.md (HTTP {doc['status']})"
        assert doc["heading"] == f"# {doc['display_name']}", (name, doc["heading"])
        assert doc["description"], f"{name} has no DESCRIPTION (the frontend's fallback help)"
    assert seen["help"]["panel_has_help"], "the (i) button did not open the pack's help for Spatial Relation Parse"
    assert seen["help"]["panel_has_table"]


def test_a_box_drawn_on_the_layout_node_is_where_the_object_lands(seen):
    """Drag on the InfSplign Layout Boxes editor: the `boxes` widget gets the box (saved in the
    workflow and sent with the prompt); the guided image has the red circle in it."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from infsplign.demo_world import scorer

    lay = seen["layout"]
    boxes = {b["object"]: b["box"] for b in json.loads(lay["widget"])}
    assert boxes["blue square"] == [0.55, 0.55, 0.95, 0.95]  # the box it started with
    drawn = boxes["red circle"]
    assert all(abs(a - b) < 0.02 for a, b in zip(drawn, lay["drawn"])), (drawn, lay["drawn"])
    assert lay["widget"] in lay["serialized"]  # saved into the workflow
    assert lay["prompt_inputs"]["boxes"] == lay["widget"] and "box_editor" not in lay["prompt_inputs"]
    assert lay["run"]["status"] == "execution_success", lay["run"]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(lay["image"]["png_base64"]))).convert("RGB")) / 255.0
    circle = scorer.find(scorer.detect(image), "red", "circle")
    assert circle is not None, "no red circle in the guided image"
    size = image.shape[0]
    x0, y0, x1, y1 = (v * size for v in drawn)
    assert x0 <= circle.cx <= x1 and y0 <= circle.cy <= y1, (circle, drawn)


def test_markup_in_a_box_name_stays_text(seen):
    lay = seen["layout"]
    boxes = json.loads(lay["markup_widget"])
    names = [b["object"] for b in boxes]
    assert MARKUP[:60].strip() in names or " ".join(MARKUP[:60].split()) in names, names
    drawn = boxes[names.index(next(n for n in names if "<" in n))]["box"]
    assert all(abs(a - b) < 0.02 for a, b in zip(drawn, lay["markup_drawn"])), (drawn, lay["markup_drawn"])
    _no_markup_in_dom(lay["after_markup"], "box editor")


def test_the_templates_dialog_shows_every_workflow_with_its_thumbnail_and_title(seen):
    t = seen["templates"]
    assert t.get("module"), f"/api/workflow_templates does not list the pack's workflows: {t.get('listing')}"
    assert sorted(t["listing"][t["module"]]) == TEMPLATES
    for name in TEMPLATES:
        card = t["cards"][name]
        assert card and card["visible"], f"no card for {name} in the Templates dialog"
        assert name in card["text"], (name, card["text"])  # the title: the file name
        # the card's picture is the pack's 512 x 512 thumbnail (the frontend's placeholder is
        # 224 px); frontend 1.32 shows it from a blob: URL of the fetched file, 1.49 from its URL
        shown = [im for im in card["images"] if im["complete"] and im["shown"] > 50]
        assert any((im["width"], im["height"]) == (512, 512) for im in shown), (name, card["images"])
        assert all("default-template" not in im["src"] for im in shown), (name, card["images"])
    asked = [r for r in seen["template_responses"] if r["url"].endswith(".jpg")]
    assert {unquote(r["url"]).rsplit("/", 1)[1] for r in asked} == {f"{n}.jpg" for n in TEMPLATES}, asked
    assert all(r["status"] == 200 and r["type"] == "image/jpeg" for r in asked), asked


def _view_ok(view: dict, name: str) -> None:
    assert view["window"] == [1920, 1080], view["window"]
    assert view["scale"] >= 0.6, f"{name} opens at zoom {view['scale']}: node text is not drawn below 0.6"
    assert not view["covered"], f"{name} opens with nodes under the frontend's bars: {view['covered']}"


def test_workflows_d_and_e_open_with_the_whole_graph_in_view(seen):
    assert seen["templates"].get("opened"), "clicking workflow e's card in the Templates dialog opened no workflow"
    _view_ok(seen["boxes_workflow"]["view"], "workflow e (from Templates)")
    _view_ok(seen["templates"]["dropped_view"], "workflow e (loaded as a dropped file is)")
    _view_ok(seen["workflow"]["view"], "workflow d (loaded as a dropped file is)")


# the first four of preview/maps.IMAGE_COLOURS: the lines of images 1-4 in the loss plot
IMAGE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def _plot_panels(rgb):
    """(top, bottom) of each panel of a loss plot: the frames' grey edges met going down a
    column just inside them (preview/plot.py draws them from x = 70)."""
    import numpy as np
    grey = np.all(rgb[:, 75] == (90, 90, 90), axis=-1)
    edges = [y for y in range(1, len(grey)) if grey[y] and not grey[y - 1]]
    return list(zip(edges[::2], edges[1::2]))


def test_workflow_e_from_templates_runs_and_its_loss_plot_shows_the_box_loss_falling(seen):
    """Workflow e guides with boxes only: its plot has the box loss's panel and the placing
    burst's below it, and every image's line of the box loss ends lower than it starts (its
    guided steps hold each object in its box)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    e = seen["boxes_workflow"]
    assert e["run"]["status"] == "execution_success", e["run"]
    assert e["loss_plot"] and e["loss_plot"]["status"] == 200, e.get("loss_plot")
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(e["loss_plot"]["png_base64"]))).convert("RGB"))
    panels = _plot_panels(rgb)
    assert len(panels) == 2, f"workflow e's plot has {len(panels)} panels, expected the box loss and the burst"
    top, bottom = panels[0]
    inside = rgb[top + 2:bottom - 1, 72:-22]
    for b, colour in enumerate(IMAGE_COLOURS):
        ys, xs = np.nonzero(np.all(inside == colour, axis=-1))
        assert len(xs) > 100, f"image {b + 1}'s line is not drawn"
        span = xs.max() - xs.min()
        start = ys[xs <= xs.min() + 0.05 * span].mean()
        end = ys[xs >= xs.max() - 0.05 * span].mean()
        assert end > start + 5, f"image {b + 1}: the box loss does not fall (line from y {start:.0f} to {end:.0f})"


def test_no_deprecation_warning_from_the_pack_during_a_run(seen):
    e = seen["boxes_workflow"]
    ours = [w for w in e["all_deprecations"] if "/extensions/" in w["stack"] and "infsplign" in w["stack"].lower()]
    assert not ours, f"deprecation warnings logged by the pack's script: {ours}"
    assert not [w for w in e["deprecations"] if "inputEl" in w["text"]], e["deprecations"]


def test_after_a_run_layout_boxes_shows_every_summary_line_and_keeps_its_editor(seen):
    e = seen["boxes_workflow"]
    before, after = e["before"], e["after"]
    assert before["summary"] is None and after["summary"], after
    s = after["summary"]
    lines = s["value"].split("\n")
    assert len(lines) == 5 and lines[0].startswith('box "red circle"') and lines[-1].startswith("encoder"), lines
    assert lines[3].startswith("placing: 20 Adam steps"), lines
    assert s["visible"] and s["scroll_height"] <= s["client_height"] + 1, \
        f"the summary box shows {s['client_height']} px of its {s['scroll_height']} px of text"
    assert before["editor"] and after["editor"], (before, after)
    assert all(abs(a - b) <= 1 for a, b in zip(after["editor"], before["editor"])), \
        f"the box editor was {before['editor']} px before the run, {after['editor']} px after"
