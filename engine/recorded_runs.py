"""The runs the capture recorded, found for InfSplign Attention Preview along the graph's edges.

The MODEL (or the GUIDER's model) carries the capture wrapper, whose trace keeps the last
finished runs (guidance/trace.py); the LATENT says which of them (the run whose output it
is) and makes the preview run after the sampler.
"""
from __future__ import annotations

import torch

from comfy.patcher_extension import WrappersMP

from ..guidance.trace import MAX_RUNS, RunTrace
from .hooks import CAPTURE_KEY


def traces_of(model=None, guider=None) -> list:
    """The capture traces on the connected MODEL and/or the GUIDER's model."""
    if model is None and guider is None:
        raise ValueError("InfSplign Attention Preview needs the MODEL the sampler used (the output of InfSplign "
                         "(KSampler) or Attention Capture Patch) or the GUIDER (InfSplign Guider) that sampled: "
                         "connect `model` or `guider`.")
    found, named = [], []
    for name, patcher in (("MODEL", model), ("GUIDER", getattr(guider, "model_patcher", None) if guider else None)):
        if name == "GUIDER" and guider is not None and patcher is None:
            raise ValueError("The connected GUIDER has no model: connect InfSplign Guider (or a CFGGuider whose "
                             "model went through Attention Capture Patch).")
        if patcher is None:
            continue
        named.append(name)
        for wrapper in patcher.get_wrappers(WrappersMP.OUTER_SAMPLE, CAPTURE_KEY):
            trace = getattr(wrapper, "trace", None)
            if trace is not None and all(trace is not t for t in found):
                found.append(trace)
    if not found:
        raise ValueError(f"The connected {' and '.join(named)} carries no InfSplign attention capture: connect the "
                         "MODEL that InfSplign (KSampler) or Attention Capture Patch outputs (the one the sampler "
                         "uses), or the InfSplign Guider.")
    return found


def find_run(traces: list, latent: dict) -> RunTrace:
    """The run among these traces whose output is the LATENT's samples."""
    samples = latent["samples"] if isinstance(latent, dict) else latent
    if not isinstance(samples, torch.Tensor) or getattr(samples, "is_nested", False):
        raise ValueError("InfSplign Attention Preview reads image latents (one tensor); this LATENT is not one.")
    runs = [run for trace in traces for run in trace.runs]
    if not runs:
        raise ValueError("This model has not finished a sampling run yet (an interrupted run is not kept). "
                         "Connect the LATENT that this model's sampler produced, so the preview runs after it.")
    for trace in traces:
        run = trace.find(samples)
        if run is not None:
            return run
    raise ValueError(f"None of the last {len(runs)} sampling runs of this model produced the connected LATENT "
                     f"(a model keeps its last {MAX_RUNS}). Connect the LATENT that this model's sampler produced "
                     "(the sampler's own output, not a copy changed by another node).")


def recorded_run(latent: dict, model=None, guider=None) -> RunTrace:
    """The run of the connected MODEL / GUIDER whose output is `latent`."""
    return find_run(traces_of(model, guider), latent)
