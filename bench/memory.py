"""What one guided step costs in memory, counted exactly, without weights.

    .venv/bin/python bench/memory.py            # the table (about 1 to 2 minutes on 2 CPU cores)
    .venv/bin/python bench/memory.py --check    # the same count on real CPU tensors vs on meta
    .venv/bin/python bench/memory.py --mmdit    # Flux.1-dev, SD3.5-M, SD3.5-L at 1024 px, bf16 (about 1 minute)
    .venv/bin/python bench/memory.py --mmdit --check   # narrow Flux / SD3 test models: real CPU tensors vs meta

For SD1.5 512 px, SD2.1 768 px, SDXL 1024 px and 832 x 1216, fp16, batch 1 and 4: the peak
of a plain step (one forward of the cond and uncond rows without autograd), and per memory
mode what autograd keeps for backward at the end of the guided forward and the guided
step's peak over the plain step's (cond forward with autograd, uncond forward, backward);
last, `fast` with the cond and uncond rows in one forward with autograd (the design a GPU
uses when this fits its free memory).
"as on CUDA": attention with a memory-efficient kernel's footprint (what the guided step
uses on CUDA); "as on CPU": ComfyUI's CPU attention, which keeps every head's weights.

The counts run the pack's own guided-step code (engine/memory_estimate.py) on the model's
UNet class rebuilt on the meta device, counting every storage (guidance/memory_count.py).
`--check` counts the same steps of the full-width SD1.5 UNet at 256 px, fp32, on real CPU
tensors (random weights) and on meta, and prints their ratio (must be within 5 %).
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "host"), str(ROOT / "tests")]
from comfy_server import COMFY  # noqa: E402  (the host tree: .host/ComfyUI, or make test COMFYUI=...)

sys.path.insert(0, str(COMFY))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import torch  # noqa: E402

import comfy.supported_models  # noqa: E402
from testkit import models  # noqa: E402
from testkit.pack import module  # noqa: E402

unet_family = module("engine.families.unet")
memory_estimate = module("engine.memory_estimate")
mmdit_memory = module("engine.families.mmdit.memory")
mmdit_family = module("engine.families.mmdit.family")

GIB = 2**30
MODELS = {  # full-width UNet configs, as ComfyUI detects them from real checkpoints
    "SD1.5": (comfy.supported_models.SD15, {**models.TOPOLOGIES["sd1"].unet, "model_channels": 320, "context_dim": 768}),
    "SD2.1": (comfy.supported_models.SD20, {**models.TOPOLOGIES["sd2v"].unet, "model_channels": 320, "context_dim": 1024}),
    "SDXL": (comfy.supported_models.SDXL, {**models.TOPOLOGIES["sdxl"].unet, "model_channels": 320,
                                          "context_dim": 2048, "adm_in_channels": 2816}),
}
SIZES = [("SD1.5", 512, 512), ("SD2.1", 768, 768), ("SDXL", 1024, 1024), ("SDXL", 832, 1216)]
ATTENTION = {"efficient": "as on CUDA", "math": "as on CPU"}


def unet_config(name: str) -> dict:
    supported, detected = MODELS[name]
    return supported(detected).unet_config


def count(job):
    name, width, height, batch, attention, dtype = job
    twin = unet_family.meta_twin(unet_config(name), dtype)
    layers = unet_family.auto_layers(twin.module)
    hw = (height // 8, width // 8)
    counts = {mode: memory_estimate.count_step(twin, batch, hw, mode, attention, layers) for mode in ("fast", "low")}
    counts["fast+batched"] = memory_estimate.count_step(twin, batch, hw, "fast", attention, layers, batched=True)
    return job, counts


def table(workers: int) -> int:
    jobs = [(name, w, h, batch, attention, torch.float16) for name, w, h in SIZES for batch in (1, 4)
            for attention in ATTENTION]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = dict(pool.imap_unordered(count, jobs))
    print("\nOne guided step of InfSplign, fp16, default layers (coarse + mid), counted on the meta device")
    print("(GiB; kept = autograd's saved tensors at the end of the guided forward; extra = the guided step's peak "
          "over the plain step's)\n")
    print("| model | size | batch | attention | plain step peak | fast: kept | fast: extra | low: kept | low: extra "
          "| fast, one forward: extra |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for job in jobs:
        name, w, h, batch, attention, _ = job
        r = results[job]
        print(f"| {name} | {w}x{h} | {batch} | {ATTENTION[attention]} | {r['fast'].plain_peak / GIB:.2f} | "
              f"{r['fast'].kept / GIB:.2f} | {r['fast'].extra / GIB:.2f} | {r['low'].kept / GIB:.2f} | "
              f"{r['low'].extra / GIB:.2f} | {r['fast+batched'].extra / GIB:.2f} |")
    print()
    for (name, w, limit) in (("SDXL", 1024, 1.5), ("SD1.5", 512, 0.5)):
        low = results[(name, w, w, 1, "efficient", torch.float16)]["low"].extra / GIB
        print(f"target: low, {name} {w} px, batch 1, as on CUDA: {low:.2f} GiB extra (at most {limit}): "
              f"{'met' if low <= limit else 'NOT met'}")
    print(f"\n{len(jobs) * 3} steps counted in {time.perf_counter() - t0:.0f} s ({workers} processes)")
    return 0


def check() -> int:
    """The same counts on real CPU tensors (random weights) and on meta: ratios."""
    torch.manual_seed(0)
    config = unet_config("SD1.5")
    real = unet_family.meta_twin(config, torch.float32, device="cpu")
    with torch.no_grad():
        for name, tensor in real.module.state_dict().items():
            models._fill(name, tensor, 0)
    meta = unet_family.meta_twin(config, torch.float32)
    layers = unet_family.auto_layers(meta.module)
    print("Full-width SD1.5 UNet, 256 x 256 px, fp32, batch 1: counted on real CPU tensors / on meta")
    print("| attention | mode | quantity | real (MiB) | meta (MiB) | real / meta |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for attention in ATTENTION:
        for mode in ("fast", "low"):
            t0 = time.perf_counter()
            on_cpu = memory_estimate.count_step(real, 1, (32, 32), mode, attention, layers)
            on_meta = memory_estimate.count_step(meta, 1, (32, 32), mode, attention, layers)
            for quantity in ("plain_peak", "kept", "guided_peak"):
                a, b = getattr(on_cpu, quantity), getattr(on_meta, quantity)
                worst = max(worst, abs(a / b - 1))
                print(f"| {ATTENTION[attention]} | {mode} | {quantity} | {a / 2**20:.1f} | {b / 2**20:.1f} | {a / b:.4f} |")
            print(f"   ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(f"\nlargest difference: {100 * worst:.2f} % (at most 5 %: {'met' if worst <= 0.05 else 'NOT met'})")
    return 0 if worst <= 0.05 else 1


MMDIT_ROWS = [("Flux.1-dev", "auto"), ("Flux.1-dev", "all"), ("SD3.5-M", "auto"), ("SD3.5-M", "all"),
              ("SD3.5-L", "auto"), ("SD3.5-L", "all")]
MMDIT_BLOCKS = {"all": "all joint blocks", "auto": "auto (the default)"}


def mmdit_table() -> int:
    """One guided step of the MMDiT models at 1024 px, bf16, batch 1, as on CUDA (the
    models ComfyUI builds for the real checkpoints, on meta; engine/families/mmdit/memory.py)."""
    t0 = time.perf_counter()
    print("\nOne guided step on MMDiT models, bf16, batch 1, 1024 x 1024, attention as on CUDA, counted on the "
          "meta device")
    print("(GiB; captured blocks: all joint blocks unless said; the graph stops after the last captured block; "
          "plain step: cond + uncond rows, Flux.1-dev cond rows only at cfg 1)\n")
    print("| model | captured | size | batch | plain step peak | fast: kept | fast: extra | low: kept | low: extra |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for name, blocks in MMDIT_ROWS:
        full = mmdit_memory.FULL_SIZE[name]
        twin = mmdit_memory.meta_twin(mmdit_memory.full_size_config(name), torch.bfloat16)
        wanted = None
        if blocks == "auto":  # the guidance nodes' default blocks (Flux: the double blocks; SD3: the first half)
            wanted = [(layer.kind, layer.block) for layer in mmdit_family.auto_layers(twin.model)]
        r = {mode: mmdit_memory.count_step(twin, mode, wanted, 1, (128, 128), full.text_tokens, full.real_cfg)
             for mode in ("fast", "low")}
        results[(name, blocks)] = r
        print(f"| {name} | {MMDIT_BLOCKS[blocks]} | 1024x1024 | 1 | {r['fast'].plain_peak / GIB:.2f} | "
              f"{r['fast'].kept / GIB:.2f} | {r['fast'].extra / GIB:.2f} | {r['low'].kept / GIB:.2f} | "
              f"{r['low'].extra / GIB:.2f} |")
    low = results[("Flux.1-dev", "all")]["low"].extra / GIB
    print(f"\ntarget: low, Flux.1-dev 1024 px, batch 1, all blocks, as on CUDA: {low:.2f} GiB extra (at most 2): "
          f"{'met' if low <= 2 else 'NOT met'}")
    print(f"\n{2 * len(MMDIT_ROWS)} steps counted in {time.perf_counter() - t0:.0f} s")
    return 0


def mmdit_check() -> int:
    """The MMDiT counts on real CPU tensors (the narrow test models' seeded weights) and on meta."""
    from testkit import mmdit_models
    print("Narrow test models (tests/testkit/mmdit_models.py), 256 x 256 px, fp32, batch 1: "
          "counted on real CPU tensors / on meta")
    print("| model | mode | quantity | real (MiB) | meta (MiB) | real / meta |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for topology, real_cfg, tokens in (("flux_dev", False, 256), ("sd3", True, 154)):
        model = mmdit_models.build(topology, seed=0)[1].diffusion_model
        model.requires_grad_(False)  # as in a guided step (and the twin): no weight gradients
        real = mmdit_memory.Twin(model, torch.float32, "cpu")
        meta = mmdit_memory.meta_twin(mmdit_models.model_config(topology), torch.float32)
        for mode in ("fast", "low"):
            on_cpu = mmdit_memory.count_step(real, mode, None, 1, (32, 32), tokens, real_cfg)
            on_meta = mmdit_memory.count_step(meta, mode, None, 1, (32, 32), tokens, real_cfg)
            for quantity in ("plain_peak", "kept", "guided_peak"):
                a, b = getattr(on_cpu, quantity), getattr(on_meta, quantity)
                worst = max(worst, abs(a / b - 1))
                print(f"| {topology} | {mode} | {quantity} | {a / 2**20:.2f} | {b / 2**20:.2f} | {a / b:.4f} |")
    print(f"\nlargest difference: {100 * worst:.2f} % (at most 5 %: {'met' if worst <= 0.05 else 'NOT met'})")
    return 0 if worst <= 0.05 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="real CPU tensors vs meta, full-width SD1.5 at 256 px")
    parser.add_argument("--mmdit", action="store_true", help="Flux.1-dev, SD3.5-M and SD3.5-L instead of the UNets")
    parser.add_argument("--workers", type=int, default=2, help="processes counting in parallel (default 2)")
    opts = parser.parse_args()
    if opts.mmdit:
        return mmdit_check() if opts.check else mmdit_table()
    return check() if opts.check else table(opts.workers)


if __name__ == "__main__":
    sys.exit(main())
