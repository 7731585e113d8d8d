"""Train the demo model (shapes world) from scratch; deterministic from --seed.

    .venv/bin/python demo/train.py --device cuda --workers 10   # the shipped weights: 7 min on one H100
    .venv/bin/python demo/train.py --steps 20 --batch 8 --out /tmp/w.safetensors   # a CPU smoke run

Writes demo_world/infsplign_demo_shapes.safetensors (EMA weights, fp16) every 500 steps and
at the end, and logs the loss and the localisation probe (share of objects whose word
attention centroid is nearer their own centre than the other object's).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "host"), str(ROOT / "tests")]
from comfy_server import COMFY  # noqa: E402  (the host tree: .host/ComfyUI, or make test COMFYUI=...)

sys.path.insert(0, str(COMFY))

from comfy.cli_args import args  # noqa: E402

args.cpu = True
import torch  # noqa: E402

from testkit.pack import module  # noqa: E402

training = module("demo_world.training")
model = module("demo_world.model")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = training.TrainSettings()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (1 when the machine is shared)")
    p.add_argument("--attention-weight", type=float, default=defaults.attention_weight)
    p.add_argument("--out", type=Path, default=model.WEIGHTS)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="processes building batches ahead (0: none)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda"):
        # Same seed, same GPU model and software: same weights.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    settings = training.TrainSettings(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
                                      attention_weight=a.attention_weight)
    print(f"training on {a.device} with {a.workers} batch workers: {settings}", flush=True)
    training.train(settings, a.out, log=lambda s: print(s, flush=True), device=a.device, workers=a.workers)
    print(f"weights: {a.out}")


if __name__ == "__main__":
    main()
