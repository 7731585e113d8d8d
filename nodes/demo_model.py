"""InfSplign Demo Model: the pack's bundled shapes-world model as MODEL, CLIP and VAE."""
from __future__ import annotations

import torch

from ..demo_world import model as demo

DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DemoModelLoader:
    DESCRIPTION = ("A small text-to-image model that ships with the pack (128 x 128 px, one to three "
                   "coloured shapes on black, e.g. 'a red circle to the left of a blue square'). Trained on "
                   "captions that never say where things are, so without InfSplign it places objects "
                   "at random: a quick, offline way to see the guidance work. Use it with the standard "
                   "nodes: CLIPTextEncode, EmptyLatentImage 128 x 128, KSampler, VAEDecode.")
    CATEGORY = "loaders/InfSplign"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"weight_dtype": (list(DTYPES), {
            "default": "default", "tooltip": "UNet weight dtype; default lets ComfyUI choose for the device."})}}

    def load(self, weight_dtype: str = "default"):
        if weight_dtype not in DTYPES:
            raise ValueError(f'weight_dtype "{weight_dtype}" is not one of {", ".join(DTYPES)}.')
        return demo.load(dtype=DTYPES[weight_dtype])
