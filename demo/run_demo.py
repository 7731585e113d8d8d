"""`make demo`: start ComfyUI with this pack, run a small workflow, say where the output is.

Until the pack ships its own demo model, the workflow runs on the deterministic SD1-topology
test model (random weights: the image is noise; the point is the pack running in a real host).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
from comfy_server import COMFY, Server  # noqa: E402

OUT = ROOT / "output" / "demo"
CKPT = "infsplign_test_sd1.safetensors"
PROMPT = "a red cube to the left of a blue ball"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def write_checkpoint(folder: Path) -> None:
    path = folder / CKPT
    if path.exists():
        return
    sys.path[:0] = [str(COMFY), str(ROOT / "tests")]
    from comfy.cli_args import args
    args.cpu = True
    from testkit import models
    say(f"writing the test checkpoint {path}")
    models.save_checkpoint(str(path), "sd1")


def workflow() -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": PROMPT}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "parse": {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["ckpt", 1], "text": PROMPT}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "seed": 1, "steps": 8, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "infsplign_demo"}},
    }


def main() -> int:
    t0 = time.monotonic()
    checkpoints = OUT / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_checkpoint(checkpoints)
    say("starting ComfyUI (main.py --cpu) with the pack on a loopback port")
    server = Server(OUT, checkpoints=checkpoints)
    try:
        server.wait_ready()
        say(f"server up at {server.base}; queueing the workflow: {PROMPT!r}")
        entry = server.run(workflow())
        if entry["status"]["status_str"] != "success":
            say(f"the workflow failed: {entry['status']['messages']}")
            return 1
        say("Spatial Relation Parse says:\n" + entry["outputs"]["parse"]["text"][0])
        for image in entry["outputs"]["save"]["images"]:
            say(f"image written to {server.output / image['subfolder'] / image['filename']}")
        say(f"server log: {server.log_path}")
    finally:
        server.stop()
    say(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
