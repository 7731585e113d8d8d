"""Tensor operations and host-device syncs per sampling step: the launch cost, counted.

    .venv/bin/python bench/op_count.py             # SD1.5, SD2.x-v and SDXL test topologies (about 2 min)
    .venv/bin/python bench/op_count.py --topologies flux_dev,sd3   # the MMDiT test models (bench/op_graphs.py)
    .venv/bin/python bench/op_count.py --sites     # also where each counted sync happens

On a GPU a guided step is bound by the host (Python, the dispatcher, one kernel launch per
operation, every sync stalling the host until the GPU's queue drains), so what it costs
there is counted here on any machine, with the real executor and the narrow test models
(the counts depend on the topology, not on the width):
- ops: every ATen operation dispatched inside the step's prediction (CFGGuider's
  outer_predict_noise: the pack's wrappers, the forward, the backward), counted with a
  TorchDispatchMode;
- launches: the ops among them that do work on the device, i.e. all but those whose
  results only alias their inputs (views, transposes, detach, no-op casts: their schema
  says so) and eval-mode dropout. Under autograd PyTorch dispatches composite ops such as
  linear as their parts (t, a matmul, views), so a forward with autograd has about 1.4 times
  a plain forward's ops but fewer launches;
- syncs: what stops the host on a GPU: reading a number back (`.item()`, `float(t)`,
  `bool(t)`, `int(t)`), `.tolist()`, `.cpu()` / `.numpy()` / `.to("cpu")`, ops whose output
  size depends on values (nonzero, masked_select), and a Python list or scalar made into a
  tensor with an explicit device (on a GPU an upload from pageable memory). A guided step's
  syncs are told apart: before its forward, inside the forward, the loss and the backward
  (the sampler's own calc_cond_batch until torch.autograd.grad returns), after them.

Rows: plain sampling; Attention Capture Patch alone; InfSplign at strength 0 on every step;
guided `fast` and `low` steps; the unguided steps of a default-window run (25 % of 4 steps
guided); a Layout Boxes step (injection and box loss); one InfSplign Refine iteration.
Batch 1, cfg 5 (a cond and an uncond row; Flux.1-dev cfg 1, SD3 cfg 4), 64 x 64 px, 4 euler
steps. Each row's graph runs
twice with different seeds and the second run is counted (the first loads the model and
makes its weights usable by autograd once).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "host"), str(ROOT / "tests"), str(ROOT / "tests" / "tier3"), str(ROOT / "bench")]

import op_graphs  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# ops that make the host wait for the device: a value read back, or a value-dependent size
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.equal.default",
            "aten.nonzero.default", "aten.masked_select.default",
            "aten.unique_consecutive.default", "aten._unique2.default", "aten.repeat_interleave.Tensor"}
SYNC_METHODS = {"tolist", "cpu", "numpy"}
NO_KERNEL = {"aten.dropout.default", "aten.empty.memory_format"}  # eval-mode dropout: the input itself
FACTORIES = {"tensor", "as_tensor", "asarray", "new_tensor"}
STEPS = 4


_KINDS: dict = {}


def kind(func) -> tuple[str, bool]:
    """(name, does it do work on the device?) of an op; not when all its results alias its
    inputs. Worked out once per op."""
    if func not in _KINDS:
        returns = func._schema.returns
        aliasing = returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        _KINDS[func] = (str(func), not aliasing and str(func) not in NO_KERNEL)
    return _KINDS[func]


class Count:
    """Ops, launches and syncs of the current phase (None: not counted), per phase; syncs
    also per part of the step (before / work / after)."""

    def __init__(self, sites: bool = False):
        self.phase = None
        self.part = "before"
        self.ops: Counter = Counter()
        self.launches: Counter = Counter()
        self.syncs: Counter = Counter()
        self.kinds: dict = {}
        self.sites: Counter = Counter()
        self.keep_sites = sites

    def clear(self) -> None:
        for c in (self.ops, self.launches, self.syncs, self.sites):
            c.clear()
        self.kinds.clear()

    def op(self, func) -> None:
        if self.phase is None:
            return
        name, launch = kind(func)
        self.ops[self.phase] += 1
        self.launches[self.phase] += launch
        self.kinds.setdefault(self.phase, Counter())[name] += 1
        if name in SYNC_OPS:
            self.sync(name)

    def sync(self, what: str) -> None:
        if self.phase is None:
            return
        self.syncs[self.phase] += 1
        self.syncs[(*self.phase, self.part)] += 1
        if self.keep_sites:
            frames = [f for f in traceback.extract_stack()
                      if "/torch/" not in f.filename and "op_count.py" not in f.filename]
            where = next((f for f in reversed(frames) if _in_pack(f.filename)), frames[-1] if frames else None)
            self.sites[(self.phase[0], self.part, what, f"{Path(where.filename).name}:{where.lineno} {where.name}"
                        if where else "?")] += 1


class _Ops(TorchDispatchMode):
    def __init__(self, count: Count):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count.op(func)
        return func(*args, **(kwargs or {}))


class _Syncs(TorchFunctionMode):
    """The syncs that the dispatcher does not show on a CPU: host copies and uploads."""

    def __init__(self, count: Count):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.count.sync(name)
        elif name == "to" and "cpu" in (*args[1:], kwargs.get("device")):
            # (a device taken from another tensor, e.g. `.to(sigma.device)`, is the model's own
            # device on a GPU; only a literal "cpu" is a copy to the host there)
            self.count.sync('to("cpu")')
        elif name in FACTORIES and args and not isinstance(args[0], torch.Tensor) and (
                kwargs.get("device") is not None or name == "new_tensor"):
            self.count.sync(f"{name}(python data, device)")
        return func(*args, **kwargs)


def _in_pack(filename: str) -> bool:
    """A file of this pack (as the host loaded it: custom_nodes/infsplign), not ComfyUI's."""
    path = Path(filename)
    return "custom_nodes/infsplign" in filename or (ROOT in path.parents and ".host" not in path.parts)


@contextmanager
def counting(count: Count):
    """Count inside every CFGGuider prediction (one per euler step) and every refinement;
    a step's part is "work" from its first calc_cond_batch until torch.autograd.grad
    returns, "after" from then on."""
    import comfy.samplers
    original, calc, grad = comfy.samplers.CFGGuider.outer_predict_noise, comfy.samplers._calc_cond_batch, torch.autograd.grad
    steps = [0]

    def outer_predict_noise(self, *args, **kwargs):
        outer = count.phase
        if outer is None:
            count.phase, count.part = ("step", steps[0]), "before"
            steps[0] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            count.phase = outer

    def calc_cond_batch(*args, **kwargs):
        if count.part == "before":
            count.part = "work"
        return calc(*args, **kwargs)

    def autograd_grad(*args, **kwargs):
        try:
            return grad(*args, **kwargs)
        finally:
            if count.phase is not None and count.phase[0] == "step":
                count.part = "after"
    comfy.samplers.CFGGuider.outer_predict_noise = outer_predict_noise
    comfy.samplers._calc_cond_batch = calc_cond_batch
    torch.autograd.grad = autograd_grad
    try:
        with _Syncs(count), _Ops(count):
            yield steps
    finally:
        comfy.samplers.CFGGuider.outer_predict_noise = original
        comfy.samplers._calc_cond_batch = calc
        torch.autograd.grad = grad


@contextmanager
def counting_refinement(count: Count, refine_hooks):
    """The refinement burst (all its iterations) as one phase."""
    original = refine_hooks.refine_latent

    def refine_latent(*args, **kwargs):
        count.phase, count.part = ("refine", 0), "work"
        try:
            return original(*args, **kwargs)
        finally:
            count.phase = None
    refine_hooks.refine_latent = refine_latent
    try:
        yield
    finally:
        refine_hooks.refine_latent = original


def measure(topology: str, session, count: Count, pack, only=()) -> dict:
    """The rows of one topology (the model warmed up by one guided run first)."""
    memory_modes = pack("engine.memory_modes")
    rows = op_graphs.graphs(topology, STEPS)
    warm = session.execute(rows["guided fast, split"][0](0))
    if not warm.success:
        raise RuntimeError(f"{topology} warm-up: {warm.error()}")
    results = {}
    for seed, (name, (build, steps, design)) in enumerate(rows.items(), 1):  # (a new seed: the executor runs it again)
        if only and name not in only:
            continue
        count.clear()
        started = time.perf_counter()
        memory_modes.FORCE_DESIGN = design
        try:
            with counting(count), counting_refinement(count, pack("engine.refine_hooks")):
                run = session.execute(build(seed))
        finally:
            memory_modes.FORCE_DESIGN = None
        if not run.success:
            raise RuntimeError(f"{topology} {name}: {run.error()}")
        print(f"   {topology} {name}: {time.perf_counter() - started:.1f} s", flush=True)
        if steps == "refine":
            phases, per = [("refine", 0)], op_graphs.REFINE_ITERATIONS + 1  # Adam steps, and the loss at the result
        else:
            phases, per = [("step", i) for i in steps], 1
        pick = (lambda counter, key=None: statistics.median(  # noqa: E731
            counter[p if key is None else (*p, key)] for p in phases) / per)
        kinds = sum((count.kinds.get(p, Counter()) for p in phases), Counter())
        results[name] = {"ops": pick(count.ops), "launches": pick(count.launches), "syncs": pick(count.syncs),
                         "parts": {part: pick(count.syncs, part) for part in ("before", "work", "after")},
                         "kinds": Counter({k: v / len(phases) / per for k, v in kinds.items()}),
                         "sites": dict(count.sites)}
    if not only or FLOOR in only:
        results[FLOOR] = floor(session.output("ckpt"), count, pack)
    return results


FLOOR = "the network alone: forward with autograd, backward"


def floor(model, count: Count, pack) -> dict:
    """What any gradient through the network costs, without the pack: the model's diffusion
    model called directly with autograd on the rows of the sampler's forward, then the
    backward of its output to the latent. A guided step that shares one forward cannot cost
    less."""
    network, inputs, exact = op_graphs.floor_call(model, pack)
    x = inputs.pop("x").requires_grad_(True)
    frozen = [p for p in network.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    count.clear()
    try:
        with exact, _Ops(count):
            count.phase = ("floor", 0)
            out = network(x, **inputs)
            torch.autograd.grad(out.sum(), x)
            count.phase = None
    finally:
        for p in frozen:
            p.requires_grad_(True)
    key = ("floor", 0)
    return {"ops": count.ops[key], "launches": count.launches[key], "syncs": 0,
            "parts": {"before": 0, "work": 0, "after": 0}, "kinds": count.kinds.get(key, Counter()), "sites": {}}


def table(results: dict, topologies: list[str]) -> list[str]:
    names = list(next(iter(results.values())))
    lines = ["| row | " + " | ".join(f"{t} ops (x plain) | launches (x plain) | syncs: before / work / after"
                                      for t in topologies) + " |",
             "|---|" + "---|---|---|" * len(topologies)]
    for name in names:
        cells = []
        for t in topologies:
            r, plain = results[t][name], results[t].get("plain")
            x = (lambda key: f" ({r[key] / plain[key]:.2f})" if plain else "")  # noqa: E731
            parts = r["parts"]
            cells.append(f"{r['ops']:.0f}{x('ops')} | {r['launches']:.0f}{x('launches')} | "
                         f"{parts['before']:g} / {parts['work']:g} / {parts['after']:g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default="sd1,sd2v,sdxl")
    parser.add_argument("--sites", action="store_true", help="print where each sync happens")
    parser.add_argument("--kinds", type=int, default=0, help="print the N most frequent ops of each row")
    parser.add_argument("--only", default="", help="row names separated by semicolons")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--gpu-attention", action="store_true",
                        help="PyTorch's attention, ComfyUI's default on a GPU, instead of its CPU choice (sub-quadratic)")
    opts = parser.parse_args()
    t0 = time.perf_counter()
    import comfy_host
    sys.path.insert(0, str(comfy_host.COMFY))
    from comfy.cli_args import args
    # --gpu-attention: attention as ComfyUI runs it on a GPU by default (PyTorch's
    # scaled_dot_product_attention, which the guided forward also uses there)
    args.use_pytorch_cross_attention = opts.gpu_attention
    comfy_host.boot()
    folder = Path(tempfile.mkdtemp(prefix="infsplign_opcount_"))
    comfy_host.set_output_directory(folder / "output")
    (folder / "checkpoints").mkdir()
    topologies = [t.strip() for t in opts.topologies.split(",") if t.strip()]
    op_graphs.save_models(folder / "checkpoints", topologies)
    comfy_host.add_checkpoint_folder(folder / "checkpoints")
    from test_robustness import loaded_pack
    count = Count(sites=opts.sites)
    only = {s.strip() for s in opts.only.split(";") if s.strip()}
    results = {t: measure(t, comfy_host.Session(), count, loaded_pack, only) for t in topologies}
    attention = "PyTorch attention, as on a GPU" if opts.gpu_attention else "ComfyUI's CPU attention"
    print(f"\nPer step (median over the steps of one run): dispatched ATen ops, launches, syncs; batch 1, "
          f"cfg 5 (Flux.1-dev 1, SD3 4), {STEPS} euler steps, 64 x 64 px, {attention}, ComfyUI {comfy_host.version()}, "
          f"torch {torch.__version__}")
    print("\n".join(table(results, topologies)))
    if opts.kinds:
        for t in topologies:
            for name, r in results[t].items():
                top = r["kinds"].most_common(opts.kinds)
                print(f"\n{t} {name}: " + ", ".join(f"{k.removeprefix('aten.')} {v:.0f}" for k, v in top))
    if opts.sites:
        for t in topologies:
            for name, r in results[t].items():
                for (phase, part, what, where), n in sorted(r["sites"].items(), key=lambda kv: -kv[1]):
                    print(f"{t} {name}: {n} x {what} at {where} ({phase}, {part}; whole run)")
    if opts.json:
        Path(opts.json).write_text(json.dumps(
            {t: {n: {k: r[k] for k in ("ops", "launches", "syncs", "parts")} for n, r in rows.items()}
             for t, rows in results.items()}, indent=1))
    print(f"\nfinished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
