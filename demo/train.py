"""Train the demo model (shapes world) from scratch or fine-tune it; deterministic from --seed.

    .venv/bin/python demo/train.py --device cuda --workers 10   # the two-object base run: 7 min on one H100
    .venv/bin/python demo/train.py --steps 20 --batch 8 --out /tmp/w.safetensors   # a CPU smoke run
    OMP_NUM_THREADS=1 .venv/bin/python demo/train.py --init demo_world/infsplign_demo_shapes.safetensors \
        --objects 1,2,2,2,2,2,3,3 --steps 500 --batch 64 --lr 2e-4 --warmup 50 --threads 1 \
        --out /tmp/demo3.safetensors   # the fine-tune to 1-3 objects: 12 min on 2 shared CPU cores

--objects sets the objects per training image: "2" (the default, as the from-scratch base
run), "1-3" (one, two or three alike) or a list such as "1,2,2,3,3" drawn from uniformly (a
repeat weighs a count). --init starts from a weights file instead of a fresh initialisation.
The shipped weights are the two-object base run fine-tuned this way (the command above,
from the base run's weights; demo_world/training_log.txt).

Writes --out (default demo_world/infsplign_demo_shapes.safetensors; EMA weights, fp16) every
--save-every steps and at the end, and logs the loss and the localisation probe (share of
objects whose word attention centroid is nearer their own centre than any other object's of
the image; one line per object count of two or more).
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
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="steps of linear lr warm-up")
    p.add_argument("--attention-weight", type=float, default=defaults.attention_weight)
    p.add_argument("--objects", default=defaults.objects,
                   help='objects per image: "2" (default), "1-3", or a list to draw from such as "1,2,2,3"')
    p.add_argument("--init", type=Path, default=None, help="fine-tune from this weights file (default: from scratch)")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--probe-every", type=int, default=defaults.probe_every)
    p.add_argument("--save-every", type=int, default=defaults.save_every)
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
    settings = training.TrainSettings(steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup, seed=a.seed,
                                      attention_weight=a.attention_weight, objects=a.objects,
                                      init=str(a.init) if a.init else None, log_every=a.log_every,
                                      probe_every=a.probe_every, save_every=a.save_every)
    print(f"training on {a.device} with {a.workers} batch workers: {settings}", flush=True)
    training.train(settings, a.out, log=lambda s: print(s, flush=True), device=a.device, workers=a.workers)
    print(f"weights: {a.out}")


if __name__ == "__main__":
    main()
