"""Guided vs plain sampling, side by side in one process: wall time and peak memory.

    .venv/bin/python bench/run_bench.py            # full table (about 40 minutes on 2 CPU cores)
    .venv/bin/python bench/run_bench.py --quick    # small models only, a smoke run
    .venv/bin/python bench/run_bench.py --gpu      # on a GPU: SD1.5 512 px and SDXL 1024 px, fp16
    .venv/bin/python bench/run_bench.py --gpu --ops  # and the op counter's table (bench/op_count.py)

Per model: the same model, seed and prompt; plain KSampler-style sampling and InfSplign
with its default window (25 % of the steps) in memory mode fast and in low alternate, and
the table gives the median wall-time ratios to plain and the ratios of peak memory
(resident memory on CPU, sampled during the run; torch.cuda.max_memory_allocated on GPU).
The CPU plan: full-width SD1.5 (random weights) at 256 px, 20 steps, and full-width SDXL
at 512 px, 8 steps (2 guided; a 20-step run of it takes most of an hour here). A third
table times one guided step four ways: the pack's `fast` step with the cond and uncond rows
in one forward with autograd and with them apart (the pack picks one forward on a GPU when
memory allows, apart on a CPU), `low`, and a naive step (the plain forward plus a second,
separate forward with autograd). `--models sd15` runs one model of the plan.

Per step (median milliseconds of 3 runs of 8 steps for the short rows): plain; Attention
Capture Patch alone; InfSplign at strength 0 on every step; the guided `fast` step; the
unguided steps after the window of a default-window run; with the forward design the guided
steps used (cond and uncond rows in one forward, or apart) and, on a GPU, the host-device
syncs of one guided step counted by torch.cuda.set_sync_debug_mode.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "host"), str(ROOT / "tests"), str(ROOT / "bench")]
from comfy_server import COMFY  # noqa: E402  (the host tree: .host/ComfyUI, or make test COMFYUI=...)

sys.path.insert(0, str(COMFY))

from comfy.cli_args import args  # noqa: E402

args.cpu = "--gpu" not in sys.argv
import psutil  # noqa: E402
import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
from comfy.patcher_extension import WrappersMP  # noqa: E402
from testkit.pack import module  # noqa: E402

from bench_models import PeakMemory, full_sd15, full_sdxl, test_sdxl  # noqa: E402

relations_mod = module("guidance.relations")
autograd = module("guidance.autograd")
step = module("guidance.step")
losses = module("guidance.losses")
hooks = module("engine.hooks")
guidance_nodes = module("nodes.guidance_nodes")

SETTINGS = dict(strength=1000.0, loss="sigmoid", alpha=8.0, margin=0.0, orthogonal="auto",
                presence_weight=1.0, balance_weight=1.0, start_percent=0.0, end_percent=0.25)
RELATIONS = relations_mod.SpatialRelations(
    (relations_mod.BoundRelation(relations_mod.Relation("cat", "left", "dog"), (2,), (8,)),),
    "a cat to the left of a dog", "clip_l", 77)


def naive_wrapper(settings):
    """A naive guided step for comparison only: the plain forward, then a second separate
    forward of the cond rows with autograd."""
    def predict_noise(executor, x, timestep, model_options={}, seed=None):
        store = model_options["transformer_options"][hooks.RUN_KEY]
        guider = executor.class_obj
        sampling = guider.model_patcher.get_model_object("model_sampling")
        window = (float(sampling.percent_to_sigma(settings.start_percent)),
                  float(sampling.percent_to_sigma(settings.end_percent)))
        if not step.in_window(float(timestep.max()), *window):
            return executor(x, timestep, model_options, seed)
        with torch.no_grad():
            denoised = executor(x, timestep, model_options, seed)
        autograd.make_autograd_safe(guider.inner_model)
        with autograd.grad_enabled():
            conds = {k: v.cond.clone() for k, v in guider.conds["positive"][0]["model_conds"].items()}
            sigma = timestep.clone()
            options = {**model_options["transformer_options"], "cond_or_uncond": [0], "sigmas": sigma}
            xl = autograd.grad_leaf(x)
            store.capturing = True
            guider.inner_model.apply_model(xl, sigma, transformer_options=options, **conds)
            store.capturing = False
            loss = losses.step_loss(store.take(), store.pairs, settings.loss)
            (grad,) = torch.autograd.grad(loss, xl)
        return step.guided_denoised(denoised, grad, timestep, settings.strength)
    return predict_noise


def variants(model, end_percent=0.25):
    settings = {**SETTINGS, "end_percent": end_percent}
    # the relations as Spatial Relation Parse gives them for this model's CLIP family
    family = module("engine.families").family_of(model)
    relations = dataclasses.replace(RELATIONS, encoder=family.encoder(model))
    fast = guidance_nodes._guided_model(model, relations, {**settings, "memory": "fast"})
    low = guidance_nodes._guided_model(model, relations, {**settings, "memory": "low"})
    strength0 = guidance_nodes._guided_model(model, relations, {**settings, "strength": 0.0, "end_percent": 1.0})
    capture = hooks.with_capture(model, relations, family.default_layers(model))
    naive = fast.clone()
    naive.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, hooks.SPLIT_KEY)
    naive.remove_wrappers_with_key(WrappersMP.PREDICT_NOISE, hooks.GUIDANCE_KEY)
    naive.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "bench.naive",
                               naive_wrapper(guidance_nodes.make_settings(model, **settings)))
    return {"plain": model, "fast": fast, "low": low, "strength 0": strength0, "capture only": capture,
            "naive": naive}


@contextlib.contextmanager
def reports():
    """The StepReports the "infsplign" logger gives during the block."""
    class Keep(logging.Handler):
        def emit(self, record):
            if hasattr(record, "infsplign"):
                seen.append(record.infsplign)
    seen, logger, handler = [], logging.getLogger("infsplign"), Keep(logging.INFO)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@contextlib.contextmanager
def design(name):
    """Force the guided `fast` step's forward design ("batched" / "split"; None: the pack's choice)."""
    memory_modes = module("engine.memory_modes")
    memory_modes.FORCE_DESIGN = name
    try:
        yield
    finally:
        memory_modes.FORCE_DESIGN = None


def count_syncs(model, positive, negative, size, device) -> int | None:
    """Host-device syncs of a one-step guided run (every step guided), as CUDA counts them."""
    if device.type != "cuda":
        return None
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(model, positive, negative, size, 1, device)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing" in str(w.message).lower() for w in caught)


def run(model, positive, negative, size, steps, device, step_times=None):
    """One sampling run: (seconds, peak memory); per-step durations go to `step_times`."""
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 1)
    stamps = []

    def callback(step, x0, x, total):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    with PeakMemory(device) as mem, torch.inference_mode():
        t0 = time.perf_counter()
        stamps.append(t0)
        out = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                                  seed=1, disable_pbar=True, callback=callback)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    assert torch.isfinite(out).all()
    if step_times is not None:
        step_times.append([b - a for a, b in zip(stamps, stamps[1:])])
    return seconds, mem.peak


RUNS = ("plain", "fast", "low")


def bench(name, build, size, steps, rounds, device):
    print(f"\n== {name}: {size}x{size}, {steps} steps, {rounds} alternating rounds", flush=True)
    model, positive, negative = build()
    baseline = psutil.Process().memory_info().rss if device.type != "cuda" else torch.cuda.memory_allocated()
    full = variants(model)
    for v in RUNS:  # warm-up: the one-off weight copy out of inference mode, the memory count
        run(full[v], positive, negative, size, 1, device)
    times, peaks, steps_of = ({v: [] for v in RUNS} for _ in range(3))
    for r in range(rounds):
        for v in RUNS:
            t, p = run(full[v], positive, negative, size, steps, device, steps_of[v])
            times[v].append(t)
            peaks[v].append(p)
            print(f"   round {r + 1} {v:8s} {t:7.2f} s  peak {p / 2**20:8.0f} MiB", flush=True)
    guided_steps = round(steps * SETTINGS["end_percent"])
    per_step = {"plain": statistics.median(d for ds in steps_of["plain"] for d in ds)}
    for v in ("fast", "low"):
        per_step[v] = statistics.median(d for ds in steps_of[v] for d in ds[:guided_steps])
    per_step["unguided steps"] = statistics.median(d for ds in steps_of["fast"] for d in ds[guided_steps:])
    with reports() as seen:  # which forward design the guided steps of a fast run used
        run(full["fast"], positive, negative, size, guided_steps, device)
    designs = sorted({r.forward for r in seen if getattr(r, "forward", "")})
    # capture only and strength 0: 3 runs of 8 steps each, every step
    for v in ("capture only", "strength 0"):
        times_of = []
        run(full[v], positive, negative, size, 1, device)
        for _ in range(3):
            run(full[v], positive, negative, size, 8, device, times_of)
        per_step[v] = statistics.median(d for ds in times_of for d in ds)
    # one guided step of each design: a 1-step schedule with the window over all of it, warmed once
    one = variants(model, end_percent=1.0)
    for label, v, forced in (("fast, one forward", "fast", "batched"), ("fast, split", "fast", "split"),
                             ("low", "low", None), ("naive", "naive", None)):
        with design(forced):
            run(one[v], positive, negative, size, 1, device)
            per_step[f"{label} (1-step run)"] = run(one[v], positive, negative, size, 1, device)[0]
    syncs = count_syncs(one["fast"], positive, negative, size, device)
    return {"name": name, "seconds": {v: statistics.median(times[v]) for v in RUNS},
            "ratios": {v: [g / p for g, p in zip(times[v], times["plain"])] for v in ("fast", "low")},
            "peaks": {v: max(peaks[v]) for v in RUNS}, "baseline": baseline, "per_step": per_step,
            "designs": designs, "syncs": syncs}


PLANS = {
    "cpu": [("SD1.5 full width (860 M), fp32", "sd15", 256, 20, 3),
            ("SDXL full width (2.6 B), fp32", "sdxl-full", 512, 8, 1)],
    "gpu": [("SD1.5 full width, fp16", "sd15-fp16", 512, 20, 3),
            ("SDXL full width, fp16", "sdxl-full-fp16", 1024, 20, 2)],
    "quick": [("SDXL-topology test model", "sdxl-test", 128, 4, 1)],
}
BUILDERS = {"sd15": lambda: full_sd15(torch.float32), "sd15-fp16": lambda: full_sd15(torch.float16),
            "sdxl-full": lambda: full_sdxl(torch.float32), "sdxl-full-fp16": lambda: full_sdxl(torch.float16),
            "sdxl-test": lambda: test_sdxl(RELATIONS.text)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model only, few steps (smoke run)")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU (fp16, 512 px)")
    parser.add_argument("--ops", action="store_true", help="also print the op counter's table")
    parser.add_argument("--models", help="comma list of plan entries to run (e.g. sd15), default all")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model, JSON out
    opts = parser.parse_args()
    device = comfy.model_management.get_torch_device()
    torch.manual_seed(0)
    if opts.one:
        name, key, size, steps, rounds = json.loads(opts.one)
        result = bench(name, BUILDERS[key], size, steps, rounds, device)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    t0 = time.perf_counter()
    plan = PLANS["quick" if opts.quick else "gpu" if opts.gpu else "cpu"]
    if opts.models:
        plan = [e for e in plan if e[1].split("-")[0] in opts.models.split(",")]
    results = []
    for entry in plan:  # each model in its own process: its memory peak is its own
        cmd = [sys.executable, __file__, "--one", json.dumps(entry)] + (["--gpu"] if opts.gpu else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
            else:
                print(line, end="", flush=True)
        if proc.wait() != 0:
            print(f"benchmark of {entry[0]} failed", file=sys.stderr)
            return 1
    unit = "VRAM" if device.type == "cuda" else "RSS"
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    print(f"\nInfSplign benchmark on {device} ({torch.get_num_threads()} threads), default window: 25 % of the "
          f"steps; memory modes fast and low")
    print(f"| model | plain s | fast s | low s | fast/plain time (each round) | low/plain time (each round) "
          f"| peak {unit} MiB plain / fast / low | fast/plain memory | low/plain memory "
          f"| above model MiB: plain / fast / low |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t, p, base = r["seconds"], r["peaks"], r["baseline"]
        ratio = {v: f"{statistics.median(r['ratios'][v]):.3f} ({', '.join(f'{x:.3f}' for x in r['ratios'][v])})"
                 for v in ("fast", "low")}
        print(f"| {r['name']} | {t['plain']:.2f} | {t['fast']:.2f} | {t['low']:.2f} | {ratio['fast']} | {ratio['low']} | "
              f"{mib(p['plain'])} / {mib(p['fast'])} / {mib(p['low'])} | {p['fast'] / p['plain']:.3f} | "
              f"{p['low'] / p['plain']:.3f} | {mib(p['plain'] - base)} / {mib(p['fast'] - base)} / "
              f"{mib(p['low'] - base)} |")
    print("\nPer step, median ms: plain and the guided and unguided steps inside the runs above (the "
          "guided steps' forward design in brackets); capture only and strength 0 from 3 runs of 8 steps; "
          "syncs: host-device syncs of a one-step guided run (CUDA's count)")
    print("| model | plain | capture only | strength 0 | guided step, fast | guided step, low | unguided steps "
          "after the window | unguided/plain | syncs |")
    print("|---|---|---|---|---|---|---|---|---|")
    ms = lambda v: f"{v * 1000:.0f}"  # noqa: E731
    for r in results:
        s = r["per_step"]
        print(f"| {r['name']} | {ms(s['plain'])} | {ms(s['capture only'])} | {ms(s['strength 0'])} | "
              f"{ms(s['fast'])} ({', '.join(r['designs']) or '-'}) | {ms(s['low'])} | {ms(s['unguided steps'])} | "
              f"{s['unguided steps'] / s['plain']:.3f} | {'-' if r['syncs'] is None else r['syncs']} |")
    print("\nOne guided step of each design, timed as a 1-step run after a warm-up run (one forward: cond "
          "and uncond rows in one forward with autograd; split: apart; low: recomputing inside the "
          "blocks; naive: the plain forward and a second, separate forward with autograd), seconds:")
    print("| model | fast, one forward | fast, split | low | naive | split/one forward |")
    print("|---|---|---|---|---|---|")
    for r in results:
        s = r["per_step"]
        one, split, low, nai = (s[f"{v} (1-step run)"] for v in ("fast, one forward", "fast, split", "low", "naive"))
        print(f"| {r['name']} | {one:.3f} | {split:.3f} | {low:.3f} | {nai:.3f} | {split / one:.3f} |")
    if opts.ops:
        print("\nOperations per step (bench/op_count.py --gpu-attention, on the CPU: the counts do not "
              "depend on the device):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "op_count.py"), "--gpu-attention"], check=False,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    print(f"\nfinished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
