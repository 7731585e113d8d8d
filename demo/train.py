"""Train the demo model (shapes world) from scratch; deterministic from --seed.

    .venv/bin/python demo/train.py --threads 1          # the shipped weights: 3000 steps, ~52 min on one core
    .venv/bin/python demo/train.py --steps 20 --out /tmp/w.safetensors   # a smoke run

Writes demo_world/infsplign_demo_shapes.safetensors (EMA weights, fp16) every 500 steps and
at the end, and logs the loss and the localisation probe (share of objects whose word
attention centroid is nearer their own centre than the other object's).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / ".host" / "ComfyUI"), str(ROOT / "tests")]

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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    settings = training.TrainSettings(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
                                      attention_weight=a.attention_weight)
    training.train(settings, a.out, log=lambda s: print(s, flush=True))
    print(f"weights: {a.out}")


if __name__ == "__main__":
    main()
