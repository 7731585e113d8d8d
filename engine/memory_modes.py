"""The guided step's memory modes, and ComfyUI's memory manager told of them.

- `fast`: the guided forward keeps what autograd saves (today's step; nothing recomputed).
  Modules that fetch their weights per call (offloaded, cast or patched per call) are
  recomputed one by one even here, so no fetched weight is kept: the step never holds a
  second copy of the weights (lowvram, dynamic VRAM).
- `low`: every computation with weights on the gradient's path is recomputed during the
  backward pass (the model family's recompute_units, guidance/recompute.py): the forward
  keeps only the modules' inputs. Same latents as `fast`, one more forward's worth of time.
- `auto` (default): `low` when the step's counted extra (engine/memory_estimate.py) does not
  fit the device's free memory with headroom, else `fast`; decided on every guided step.

Before sampling, a PREPARE_SAMPLING wrapper adds the extra of the mode the run expects to
what ComfyUI reserves (`load_models_gpu(memory_required=...)`), so ComfyUI offloads
weights instead of the step running out of memory. On CUDA the guided forward computes
attention with PyTorch's memory-efficient kernels (no n x n weights kept), whatever
attention ComfyUI was started with (some have no backward pass at all).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import comfy.ldm.modules.attention as attention
import comfy.model_management as mm

from ..guidance.autograd import make_autograd_safe, weights_frozen
from ..guidance.capture import CaptureStore
from ..guidance.recompute import recomputing
from . import memory_estimate
from .families import ModelFamily, of_run

log = logging.getLogger("infsplign")

HEADROOM = 1.25  # the counted extra times this, plus MARGIN, must be free for `fast`
# The design of a `fast` step's forward, "batched" or "split" (None: chosen per step, see
# MemoryPlan.batched). Benchmarks and tests set it to measure one design on any device.
FORCE_DESIGN: str | None = None
MARGIN = 256 * 2**20  # what the count leaves out: ControlNet, other packs' patches, fragmentation
OVERRIDE = "optimized_attention_override"
INFERENCE_REFUSED = "Inference tensors cannot be saved for backward"


def streams_weights(module: torch.nn.Module) -> bool:
    """Does this module fetch (cast, move, patch) its weights on each call? ComfyUI's ops do
    when weights are offloaded (lowvram, dynamic VRAM) or stored in another dtype, or carry
    a LoRA patch applied per call. Those weights are not the module's own parameters, so
    cloning its parameters for autograd would copy the whole offloaded model for nothing."""
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or getattr(module, "bias_function", None))


def attention_kind(device: torch.device) -> str:
    """How the guided forward's attention keeps memory on this device (memory_estimate)."""
    return "efficient" if device.type == "cuda" else "math"


@dataclass
class MemoryPlan:
    """One run's memory decisions: the requested mode, the counted extras, fallbacks."""

    requested: str
    device: torch.device
    count: Callable[[str], int]  # mode -> counted extra bytes of one guided step of this run
    extra: dict[str, int] = field(default_factory=dict)  # the counts made so far
    reserved: str = ""  # the mode whose extra was added to ComfyUI's reservation
    fallback: str = ""  # "low" after an out-of-memory error in fast, "unguided" after one in low
    # after autograd refused an inference tensor: `low` copies those of every operation it
    # recomputes, not only of modules whose own weights are inference tensors
    copy_everywhere: bool = False
    warned: str = ""  # the last warning given for this run's memory (each is given once)

    def needed(self, mode: str) -> int:
        """Bytes that must be free for a guided step in `mode`: the count with headroom."""
        if mode not in self.extra:
            self.extra[mode] = self.count(mode)
        return int(self.extra[mode] * HEADROOM) + MARGIN

    def batched(self, mode: str) -> bool:
        """Does a guided step in `mode` run the cond and uncond rows in one forward with
        autograd? On a GPU in `fast` when its counted extra (the uncond rows' activations
        kept too) fits the free memory: one forward instead of two, which on a GPU, where a
        step costs what the host dispatches, is the cheaper step. On a CPU the second forward
        costs less than a backward over twice the rows: split. `low` always splits."""
        if FORCE_DESIGN is not None:
            return FORCE_DESIGN == "batched" and mode == "fast"
        if mode != "fast" or self.device.type == "cpu":
            return False
        return self.needed("fast+batched") <= mm.get_free_memory(self.device)

    def step_mode(self) -> str:
        """The mode of the next guided step ("unguided" once both modes ran out of memory)."""
        if self.fallback == "unguided":
            return "unguided"
        if self.fallback == "low" or self.requested == "low":
            return "low"
        if self.requested == "fast":
            return "fast"
        return "fast" if self.needed("fast") <= mm.get_free_memory(self.device) else "low"


def plan_run(model, store: CaptureStore, requested: str, noise_shape) -> MemoryPlan:
    """The run's plan; a mode's extra is counted (memory_estimate) when first needed."""
    device = model.load_device
    batch, hw = int(noise_shape[0]), tuple(int(s) for s in noise_shape[2:4])

    def count(key: str) -> int:
        # key: "fast", "low" or "fast+batched"; (two probe objects: the objects' maps are a
        # few kilobytes of the count)
        mode, _, design = key.partition("+")
        return memory_estimate.estimate(model, batch, hw, mode, attention_kind(device), store.layers,
                                        memory_estimate.PROBE_RELATIONS, store.relations.sequence_length,
                                        batched=design == "batched").extra
    return MemoryPlan(requested, device, count)


def reserve_memory(plan_of):
    """PREPARE_SAMPLING wrapper: ComfyUI's reservation for sampling grows by the extra of
    the mode this run expects (`auto`: `fast` when the device could hold the model, ComfyUI's
    own reservation and the fast step, else `low`). `plan_of(model_options, model,
    noise_shape)` gives the run's MemoryPlan, or None for a run that is not guided."""
    def prepare_sampling(executor, model, noise_shape, conds, model_options=None, **kwargs):
        plan = plan_of(model_options or {}, model, noise_shape)
        if plan is None:
            return executor(model, noise_shape, conds, model_options=model_options, **kwargs)
        mode = plan.requested
        if mode == "auto":
            comfy_needs = model.model.memory_required([noise_shape[0] * 2, *noise_shape[1:]])
            room = mm.get_total_memory(plan.device) - model.model_size() - comfy_needs
            mode = "fast" if plan.needed("fast") <= room else "low"
        plan.reserved = mode
        with more_memory_required(model.model, plan.needed(mode)):
            return executor(model, noise_shape, conds, model_options=model_options, **kwargs)
    return prepare_sampling


@contextlib.contextmanager
def more_memory_required(base_model, extra: int):
    """While inside, the model's memory_required (what ComfyUI reserves for sampling)
    answers `extra` bytes more. The model's own attribute state is restored after."""
    own = base_model.__dict__.get("memory_required")
    counted = base_model.memory_required
    base_model.memory_required = lambda *args, **kwargs: counted(*args, **kwargs) + extra
    try:
        yield
    finally:
        if own is None:
            del base_model.memory_required
        else:
            base_model.memory_required = own


@contextlib.contextmanager
def guided_forward(inner_model, store: CaptureStore, mode: str, transformer_options: dict, batched: bool = False,
                   copy_everywhere: bool = False):
    """The guided step's forward (and its backward, which runs inside guided_step) in `mode`;
    `batched`: the cond and uncond rows in one forward (MemoryPlan.batched);
    `copy_everywhere`: MemoryPlan.copy_everywhere. The modules, and what keeps backward
    correct, are the run's model family's (transformer_options' family)."""
    family = of_run(transformer_options)
    walked = _walked(store, family, inner_model)
    if mode == "low":
        units = walked["units"]
    else:
        units = [m for m in walked["graph"] if streams_weights(m)]
    # Resident weights become normal tensors once (the same values, no copy kept: the module
    # holds the new ones); weights fetched per call are left alone (cloning them would copy
    # an offloaded model), and recomputed modules copy what they still get per operation.
    make_autograd_safe(inner_model, skip=streams_weights, modules=walked["all"])

    def replaying(on: bool) -> None:
        store.replaying = on
    previous = transformer_options.get(OVERRIDE)
    transformer_options[OVERRIDE] = family.step_attention(previous, efficient_attention_on_cuda)
    # in `low` each captured layer's maps are computed inside its recomputed module
    store.immediate, store.batched = mode == "low", batched
    try:
        per_operation = ((lambda m: True) if copy_everywhere
                         else lambda m: holds_inference_weights(walked["inside"].get(m) or [m]))
        with family.autograd_context(inner_model.diffusion_model), weights_frozen(inner_model, walked["all"]), \
                recomputing(units, snapshot=family.snapshot_call, replaying=replaying, per_operation=per_operation):
            yield
    finally:
        store.immediate = store.batched = False
        if previous is None:
            transformer_options.pop(OVERRIDE, None)
        else:
            transformer_options[OVERRIDE] = previous


def _walked(store: CaptureStore, family: ModelFamily, inner_model) -> dict:
    """The model's module lists a guided step needs, walked once per run (the tree does not
    change during a run; what its weights are is checked on every step)."""
    key = ("modules", id(inner_model))
    if key not in store.cache:
        network = inner_model.diffusion_model
        units = family.recompute_units(network, store.layers)
        store.cache[key] = {"all": list(inner_model.modules()), "graph": family.graph_modules(network, store.layers),
                            "units": units, "inside": {m: list(m.modules()) for m in units}}
    return store.cache[key]


def holds_inference_weights(modules) -> bool:
    """Does a recomputed module (its modules, itself included) compute with weights that may
    be inference tensors (fetched per call, or left so)? Then each of its operations gets
    normal copies (recompute.py); else only its call arguments do."""
    return any(streams_weights(m) or any(p is not None and p.is_inference() for p in m._parameters.values())
               for m in modules)


def efficient_attention_on_cuda(previous=None, wants=lambda q: q.device.type == "cuda"):
    """optimized_attention_override: with autograd on and a CUDA tensor, PyTorch's
    scaled_dot_product_attention (flash / memory-efficient kernels, which keep no n x n
    weights and have a backward pass); otherwise another pack's override, or ComfyUI's."""
    def override(func, *args, **kwargs):
        if args and torch.is_grad_enabled() and wants(args[0]):
            return attention.attention_pytorch(*args, **kwargs)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)
    return override


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of the device or the host (CUDA, other accelerators, CPU)."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    probe = getattr(mm, "is_oom", None)  # ComfyUI 0.33 knows its accelerators' own errors
    if probe is not None and getattr(mm, "OOM_EXCEPTION", Exception) is not Exception and probe(e):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_after_oom() -> None:
    """Give back what a failed step left: Python's references, then the device cache."""
    import gc
    gc.collect()
    mm.soft_empty_cache(True)


def step_with_fallback(plan: MemoryPlan, mode: str, guided, unguided, size: str):
    """`guided(mode)` -> (denoised, StepReport). On an out-of-memory error, or autograd
    refusing an inference-tensor weight: free what the step held, retry in `low` (which
    keeps less, and gives each operation normal copies of such weights); if that fails too,
    `unguided(reason)`. Each fallback warns once per run and sticks for the rest of it."""
    failed: list[tuple[str, str]] = []  # (mode, first line of the error)
    refused = False
    for attempt in ([] if mode == "unguided" else [mode] if mode == "low" else [mode, "low"]):
        try:
            denoised, report = guided(attempt)
        except Exception as e:  # noqa: BLE001  (only out-of-memory and refused-autograd errors are handled)
            refused = INFERENCE_REFUSED in str(e)
            if not (refused or is_oom(e)):
                raise
            failed.append((attempt, (str(e).splitlines() or [type(e).__name__])[0][:160]))
            plan.copy_everywhere = plan.copy_everywhere or refused
        else:
            report.memory_mode = attempt
            if failed:
                _warn_once(plan, f"InfSplign {_trouble(refused)} in a guided step at {size} in {failed[0][0]} mode "
                                 f"({failed[0][1]}); it ran in low memory mode, as will the rest of this run.")
            return denoised, report
        release_after_oom()  # outside the except block: the error no longer holds the step's tensors
        plan.fallback = "low"
    plan.fallback = "unguided"
    modes = " and ".join(m for m, _ in failed)
    if refused:
        _warn_once(plan, f"InfSplign could not take the gradient at {size} in {modes} mode ({failed[-1][1]}): a weight "
                         "is an inference tensor that autograd refuses (it may come from ComfyUI's dynamic VRAM). "
                         "This run is sampled unguided; start ComfyUI with --disable-dynamic-vram to guide it.")
    elif failed:
        _warn_once(plan, f"InfSplign ran out of memory in a guided step at {size} in {modes} mode "
                         f"({failed[-1][1]}); this step and the rest of the run are sampled unguided. "
                         "Use a smaller image or batch, or free VRAM (close other models, --lowvram).")
    denoised, report = unguided(f"{_trouble(refused)} in {modes or 'an earlier step'}")
    report.memory_mode = "unguided"
    return denoised, report


def _trouble(refused: bool) -> str:
    return "hit a weight autograd refuses" if refused else "ran out of memory"


def _warn_once(plan: MemoryPlan, message: str) -> None:
    if plan.warned != message:
        plan.warned = message
        log.warning(message)
