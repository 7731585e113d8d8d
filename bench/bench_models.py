"""The models bench/run_bench.py times, and how it measures peak memory: full-width SD1.5 and
SDXL UNets with random weights (conditioning tensors stand in for CLIP) and the narrow SDXL
test model. Imported by run_bench.py after it has set ComfyUI up (CPU or GPU)."""
from __future__ import annotations

import threading

import psutil
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
from testkit import models


class PeakMemory:
    """Peak resident memory (CPU) or peak allocated device memory (GPU) during a block."""

    def __init__(self, device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def poll():
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, proc.memory_info().rss)
            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def _random_unet(cfg, dtype) -> comfy.model_patcher.ModelPatcher:
    """The UNet of a supported-model config with random weights, built under inference mode
    as ComfyUI's loader does, in a ModelPatcher on the torch device. On a GPU the weights are
    drawn there (a minute faster per SDXL model than on the CPU); the same statistics as the
    test models' (fan-in scaled matrices, norm gains near 1)."""
    cfg.set_inference_dtype(dtype, None)
    device = comfy.model_management.get_torch_device()
    with torch.inference_mode():
        base = cfg.get_model({})
        if device.type == "cpu":
            for name, tensor in base.diffusion_model.state_dict().items():
                models._fill(name, tensor, 0)
        else:
            base = base.to(device)
            g = torch.Generator(device).manual_seed(0)
            for name, t in base.diffusion_model.state_dict().items():
                if t.ndim == 0 or not t.is_floating_point():
                    continue
                r = torch.randn(t.shape, generator=g, device=device, dtype=torch.float32)
                r = r / float(t[0].numel()) ** 0.5 if t.ndim >= 2 else (1.0 + 0.1 * r if name.endswith("weight")
                                                                          else 0.02 * r)
                t.copy_(r.to(t.dtype))
        base = base.to(device)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))


def full_sd15(dtype):
    """The full-width SD1.5 UNet (860 M parameters), random weights; conditioning tensors
    stand in for CLIP."""
    patcher = _random_unet(comfy.supported_models.SD15(
        {**models.TOPOLOGIES["sd1"].unet, "model_channels": 320, "context_dim": 768}), dtype)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    return patcher, positive, negative


def full_sdxl(dtype):
    """The full-width SDXL UNet (2.6 B parameters), random weights; conditioning tensors
    (2048-d context, 2816-d adm) stand in for the two CLIPs."""
    patcher = _random_unet(comfy.supported_models.SDXL(
        {**models.TOPOLOGIES["sdxl"].unet, "model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816}),
        dtype)
    g = torch.Generator().manual_seed(0)
    cond = lambda: [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]  # noqa: E731
    return patcher, cond(), cond()


def test_sdxl(text: str):
    """The narrow SDXL test model with its CLIP's conditioning of `text` and of ""."""
    model, clip, _ = models.load("sdxl")
    encode = lambda t: clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)  # noqa: E731
    (c, pc), (u, pu) = encode(text), encode("")
    return model, [[c, {"pooled_output": pc}]], [[u, {"pooled_output": pu}]]
