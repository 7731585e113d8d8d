"""Writes the thumbnail ComfyUI's Templates dialog shows beside each example workflow.

    .venv/bin/python host/make_thumbnails.py          # (re)write example_workflows/<name>.jpg (about 1 minute)
    .venv/bin/python host/make_thumbnails.py --check  # exit 1 if one is missing or older than its workflow

ComfyUI (0.3.75 and 0.33) lists a custom node pack's `example_workflows/*.json` under
Templates, titled with the file name, and asks for `<name>.jpg` beside each file as its
thumbnail (frontend 1.32 and 1.49). Each is made from the workflow itself:
- the demo-model workflows (d, e, f) are run through a real ComfyUI server (`main.py --cpu`
  on loopback, as `make demo` does) and their thumbnail shows what they produce: d's seeds
  unguided and guided side by side, e's images with their boxes drawn over them, f's seeds
  unrefined and refined;
- the SD1.5 / SDXL workflows (a, b, c) need model weights that are not here: their
  thumbnail is a drawn diagram of the graph (nodes in the order data flows, the pack's own
  in violet), its prompt and the model files it expects.
Every JPEG carries, as its comment, a fingerprint of what its picture depends on (the
nodes, their widget values and the links, not their positions nor the saved view); the
--check (and tests/tier3/test_example_workflows.py) compares it with the workflow's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "example_workflows"
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDE = 512
STAMP = "infsplign-thumbnail "
BACKGROUND, INK, DIM = (30, 30, 34), (236, 236, 240), (160, 160, 170)
PACK, CORE = (104, 72, 176), (62, 62, 70)
# What each demo-model workflow's thumbnail shows of its outputs; the others are diagrams.
RUNS = {
    "d - Demo model, unguided vs InfSplign": ("pairs", ("unguided", "InfSplign")),
    "e - Demo model, layout boxes": ("boxes", ()),
    "f - Demo model, InfSplign Refine": ("pairs", ("unrefined", "InfSplign Refine")),
}
LINK_COLOURS = {"MODEL": (178, 157, 255), "CLIP": (255, 210, 50), "VAE": (255, 110, 110),
                "CONDITIONING": (255, 160, 50), "LATENT": (255, 156, 249), "IMAGE": (100, 181, 246),
                "SPATIAL_RELATIONS": (110, 220, 140)}
BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (67, 99, 216), (245, 130, 49))  # web/layout_editor.js's first


def font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def fingerprint(workflow: dict) -> str:
    """What the thumbnail depends on: node types, titles, modes, widget values and links."""
    nodes = sorted(({"id": n["id"], "type": n["type"], "mode": n.get("mode", 0), "title": n.get("title"),
                     "widgets_values": n.get("widgets_values")} for n in workflow["nodes"]), key=lambda n: n["id"])
    text = json.dumps({"nodes": nodes, "links": workflow.get("links", [])}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp_of(path: Path) -> str | None:
    """The fingerprint a thumbnail was made for (None: no thumbnail, or not one of ours)."""
    if not path.is_file():
        return None
    with Image.open(path) as im:
        comment = im.info.get("comment", b"")
    comment = comment.decode(errors="replace") if isinstance(comment, bytes) else str(comment)
    return comment[len(STAMP):] if comment.startswith(STAMP) else None


def save(picture: Image.Image, path: Path, workflow: dict) -> None:
    assert picture.size == (SIDE, SIDE)
    picture.convert("RGB").save(path, "JPEG", quality=88, optimize=True,
                                comment=(STAMP + fingerprint(workflow)).encode())


def _label(draw, xy, text, px=18, fill=INK, anchor="ma"):
    draw.text(xy, text, font=font(px), fill=fill, anchor=anchor)


def _cell(im: np.ndarray, side: int) -> Image.Image:
    return Image.fromarray(im).resize((side, side), Image.BICUBIC)


def pairs_picture(rows: list[tuple[np.ndarray, np.ndarray]], labels: tuple[str, str]) -> Image.Image:
    """Two seeds, each as (left, right) images side by side, the columns labelled."""
    canvas = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    cell, gap, top = 232, 8, 40
    x0 = (SIDE - 2 * cell - gap) // 2
    for j, text in enumerate(labels):
        _label(draw, (x0 + j * (cell + gap) + cell // 2, 10), text)
    for i, (left, right) in enumerate(rows[:2]):
        for j, im in enumerate((left, right)):
            canvas.paste(_cell(im, cell), (x0 + j * (cell + gap), top + i * (cell + gap)))
    return canvas


def boxes_picture(images: list[np.ndarray], boxes: list[dict]) -> Image.Image:
    """Four images in a 2 x 2 grid, each with the layout's boxes drawn over it."""
    canvas = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    cell, gap = 248, 8
    for k, im in enumerate(images[:4]):
        x, y = (k % 2) * (cell + gap) + (SIDE - 2 * cell - gap) // 2, (k // 2) * (cell + gap) + (SIDE - 2 * cell - gap) // 2
        canvas.paste(_cell(im, cell), (x, y))
        for b, box in enumerate(boxes):
            x0, y0, x1, y1 = (v * cell for v in box["box"])
            draw.rectangle((x + x0, y + y0, x + x1, y + y1), outline=BOX_COLOURS[b % len(BOX_COLOURS)], width=3)
    return canvas


def _depths(nodes: dict, links: list) -> dict[int, int]:
    """Each node's column: the longest chain of links that leads to it."""
    depth = {i: 0 for i in nodes}
    for _ in range(len(nodes)):
        for _, src, _, dst, _, _ in links:
            if src in depth and dst in depth:
                depth[dst] = max(depth[dst], depth[src] + 1)
    return depth


def diagram_picture(title: str, workflow: dict, object_info: dict) -> Image.Image:
    """The graph as boxes in columns (the order data flows), the pack's nodes in violet; the
    prompt and the model files the workflow expects below it."""
    canvas = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(textwrap.wrap(title, 34)[:2]):
        _label(draw, (SIDE // 2, 14 + 28 * i), line, px=22)
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in ("MarkdownNote", "Note")}
    links = [l for l in workflow["links"] if l[1] in nodes and l[3] in nodes]
    depth = _depths(nodes, links)
    columns: dict[int, list[int]] = {}
    for i in sorted(nodes, key=lambda i: (depth[i], nodes[i]["pos"][1])):
        columns.setdefault(depth[i], []).append(i)
    top, bottom, margin, gap = 82, 372, 12, 10
    width = (SIDE - 2 * margin - gap * (len(columns) - 1)) / len(columns)
    height = min(46, (bottom - top) / max(len(c) for c in columns.values()) - 8)
    where = {}
    for c, ids in columns.items():
        span = len(ids) * (height + 8) - 8
        for k, i in enumerate(ids):
            x = margin + c * (width + gap)
            y = top + (bottom - top - span) / 2 + k * (height + 8)
            where[i] = (x, y, x + width, y + height)
    for _, src, _, dst, _, kind in links:
        a, b = where[src], where[dst]
        draw.line((a[2], (a[1] + a[3]) / 2, b[0], (b[1] + b[3]) / 2), fill=LINK_COLOURS.get(kind, DIM), width=2)
    small = font(10)
    for i, (x0, y0, x1, y1) in where.items():
        n = nodes[i]
        draw.rounded_rectangle((x0, y0, x1, y1), 5, fill=PACK if n["type"].startswith("InfSplign") else CORE,
                               outline=(20, 20, 24))
        name = n.get("title") or object_info.get(n["type"], {}).get("display_name") or n["type"]
        lines = textwrap.wrap(name, max(6, int(width / 6)))[:2]
        for k, line in enumerate(lines):
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2 + (k - (len(lines) - 1) / 2) * 12), line, font=small,
                      fill=INK, anchor="mm")
    prompt = next((n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "PrimitiveStringMultiline"), "")
    for i, line in enumerate(textwrap.wrap(f'"{prompt}"', 40)[:2]):
        _label(draw, (SIDE // 2, 392 + 26 * i), line, px=20)
    files = [n["widgets_values"][0] for n in workflow["nodes"]
             if n["type"] in ("CheckpointLoaderSimple", "LoraLoader", "ControlNetLoader")]
    for i, line in enumerate(textwrap.wrap("needs " + ", ".join(files), 62)[:3]):
        _label(draw, (SIDE // 2, 452 + 16 * i), line, px=12, fill=DIM)
    return canvas


def run_picture(kind: str, labels, workflow: dict, server, wf) -> Image.Image:
    """Run the workflow on the server; the picture of what it produced."""
    api = wf.to_api(workflow, server.get("/object_info"))
    entry = server.run(api)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"the workflow failed: {entry['status']['messages']}")
    saves = sorted((k for k, n in api.items() if n["class_type"] == "SaveImage"), key=int)

    def images(key):
        return [np.asarray(Image.open(server.output / im["subfolder"] / im["filename"]).convert("RGB"))
                for im in entry["outputs"][key]["images"]]
    if kind == "boxes":
        layout = next(n for n in api.values() if n["class_type"] == "InfSplignLayout")
        return boxes_picture(images(saves[0]), json.loads(layout["inputs"]["boxes"]))
    if len(saves) == 1:  # one stitched image per seed: left and right halves
        rows = images(saves[0])
        gap = next((n["inputs"].get("spacing_width", 0) for n in api.values() if n["class_type"] == "ImageStitch"), 0)
        half = (rows[0].shape[1] - gap) // 2
        pairs = [(r[:, :half], r[:, -half:]) for r in rows]
    else:
        pairs = list(zip(images(saves[0]), images(saves[1])))
    return pairs_picture(pairs, labels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare the stamps with the workflows, write nothing")
    args = ap.parse_args(argv)
    files = sorted(FOLDER.glob("*.json"))
    stale = [p.name for p in files
             if stamp_of(p.with_suffix(".jpg")) != fingerprint(json.loads(p.read_text()))]
    if args.check:
        if stale:
            print("thumbnails missing or out of date (run host/make_thumbnails.py):", ", ".join(stale))
        return 1 if stale else 0
    from comfy_server import Server
    import ui_workflow as wf
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            server.wait_ready()
            info = server.get("/object_info")
            for path in files:
                workflow = json.loads(path.read_text())
                if path.stem in RUNS:
                    kind, labels = RUNS[path.stem]
                    picture = run_picture(kind, labels, workflow, server, wf)
                else:
                    picture = diagram_picture(path.stem.split(" - ", 1)[-1], workflow, info)
                save(picture, path.with_suffix(".jpg"), workflow)
                print(f"wrote {path.with_suffix('.jpg').relative_to(ROOT)}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
