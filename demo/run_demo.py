"""`make demo`: the bundled demo model, unguided vs InfSplign, through a real ComfyUI server.

Starts ComfyUI (main.py --cpu, loopback) with this pack, loads the example workflow
example_workflows/d - Demo model, unguided vs InfSplign.json (the UI file users drag in),
converts it to the API format with the server's /object_info, and queues it once per
relation prompt with the prompt text replaced. Each run samples 4 seeds unguided and
guided from the same noise; the demo writes one PNG per prompt (rows: seeds; left:
unguided, right: InfSplign), scores every image with the shapes-world detector and prints
the VISOR table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "host")]
from comfy_server import Server  # noqa: E402
import ui_workflow as wf  # noqa: E402

WORKFLOW = ROOT / "example_workflows" / "d - Demo model, unguided vs InfSplign.json"
OUT = ROOT / "output" / "demo"
TEXT_NODE, SAVE_NODE, PARSE_NODE = "2", "13", "5"
DEFAULT_PROMPTS = (
    "a red circle to the left of a blue square",
    "a green triangle to the right of a yellow circle",
    "a white square above a purple triangle",
    "a blue triangle below a red square",
    "a yellow square to the left of a green circle",
    "a purple circle to the right of a white triangle",
    "a green square above a blue circle",
    "a white circle below a yellow triangle",
)


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo_modules():
    """The pack's scorer and prompt helpers, without importing ComfyUI in this process
    (the pack is registered as a bare package, so its root __init__ does not run)."""
    import importlib
    import types
    pkg = types.ModuleType("infsplign")
    pkg.__path__ = [str(ROOT)]
    sys.modules.setdefault("infsplign", pkg)
    return importlib.import_module("infsplign.demo_world.evaluation"), importlib.import_module("infsplign.demo_world.scorer")


def parse_prompt(evaluation, text: str):
    for p in evaluation.all_prompts():
        if p.text == text:
            return p
    raise SystemExit(f'"{text}" is not a demo prompt: write "a <colour> <shape> <relation> a '
                     f'<colour> <shape>" with colours red, green, blue, yellow, purple, white, shapes '
                     f'circle, square, triangle, relations "to the left of", "to the right of", "above", "below".')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", action="append", help="a relation prompt (repeatable); default: 8 built-in ones")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    t0 = time.monotonic()
    evaluation, scorer = demo_modules()
    prompts = [parse_prompt(evaluation, t) for t in (a.prompt or DEFAULT_PROMPTS)]
    images_dir = a.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    say("starting ComfyUI (main.py --cpu) with the pack on a loopback port")
    server = Server(a.out)
    unguided, guided = [], []
    try:
        server.wait_ready()
        api = wf.to_api(wf.load(WORKFLOW), server.get("/object_info"))
        say(f"server up at {server.base}; workflow {WORKFLOW.relative_to(ROOT)}")
        for i, p in enumerate(prompts, 1):
            api[TEXT_NODE]["inputs"]["value"] = p.text
            started = time.monotonic()
            entry = server.run(api)
            if entry["status"]["status_str"] != "success":
                say(f"the workflow failed: {entry['status']['messages']}")
                return 1
            rows = [np.asarray(Image.open(server.output / im["subfolder"] / im["filename"]).convert("RGB"))
                    for im in entry["outputs"][SAVE_NODE]["images"]]
            half = (rows[0].shape[1] - 8) // 2
            unguided.append(evaluation.score_images(p, [r[:, :half] / 255.0 for r in rows]))
            guided.append(evaluation.score_images(p, [r[:, -half:] / 255.0 for r in rows]))
            sheet = images_dir / f"{i:02d}_{p.text.replace(' ', '_')}.png"
            Image.fromarray(np.concatenate(rows, axis=0)).save(sheet)
            right_u = sum(s.correct for s in unguided[-1])
            right_g = sum(s.correct for s in guided[-1])
            say(f"[{i}/{len(prompts)}] {p.text!r}: relation holds in {right_u}/4 unguided, "
                f"{right_g}/4 guided ({time.monotonic() - started:.0f} s) -> {sheet}")
        say("Spatial Relation Parse, last prompt:\n" + entry["outputs"][PARSE_NODE]["text"][0])
    finally:
        server.stop()
    print()
    print(evaluation.table(unguided, guided))
    print()
    say(f"side-by-side images (rows: seeds; left unguided, right InfSplign): {images_dir}")
    say(f"server log: {server.log_path}")
    say(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
