"""InfSplign Attention Preview: the objects' attention maps and the loss of a finished run.

The run comes along the graph's edges (engine/recorded_runs.py finds it from the MODEL or
GUIDER and the LATENT); the drawing (PIL and torch only) lives in preview/: maps.py (the
maps image) and plot.py (the loss plot).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..engine.recorded_runs import recorded_run
from ..guidance.trace import choose_steps
from ..preview.maps import render_maps
from ..preview.plot import render_loss


def to_image(picture: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


class AttentionPreview:
    DESCRIPTION = ("Shows a finished run's attention: per object, its cross-attention map at chosen steps "
                   "with its centroid, the other objects' centroids and the wanted relation (an arrow from B "
                   "to where A belongs, dotted: the line A must cross), and a plot of the loss per step with "
                   "the guidance window shaded. Works after InfSplign (KSampler) / InfSplign Guider and after "
                   "a capture-only run (Attention Capture Patch without guidance), which records without "
                   "changing the image. Rows: per image of the batch (the first 8).")
    CATEGORY = "sampling/InfSplign"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("maps", "loss_plot")
    OUTPUT_TOOLTIPS = ("Attention maps: rows per image and object, columns per step.",
                       "Per step, one line per image: each term that guided the run (relations, boxes, presence, "
                       "separation) with its settings, their sum, and the relations' spatial term.")
    FUNCTION = "preview"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("LATENT", {"tooltip": "The LATENT the sampler produced with this model or guider: it "
                                      "picks the run to show and makes the preview run after sampling."}),
                "steps": ("STRING", {"default": "auto", "tooltip":
                          'Which steps to show: "auto" = about 6 evenly spaced steps, or step numbers '
                          'such as "0, 2, 4" (0 = the first step, as KSamplerAdvanced counts).'}),
                "size": ("INT", {"default": 128, "min": 48, "max": 512, "step": 8, "tooltip":
                         "Width of one map cell in pixels (the loss plot grows with it)."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "The MODEL the sampler used: the output of InfSplign (KSampler) or "
                                    "Attention Capture Patch (or a later node's output)."}),
                "guider": ("GUIDER", {"tooltip": "The GUIDER that sampled (InfSplign Guider), for "
                                      "SamplerCustomAdvanced."}),
            },
        }

    def preview(self, latent, steps="auto", size=128, model=None, guider=None):
        import nodes  # ComfyUI's: PreviewImage saves to the temp folder and says so to the browser
        run = recorded_run(latent, model, guider)
        recorded = sorted(run.steps)
        if not recorded:
            raise ValueError("This run recorded no attention maps (its conditionings covered only part of the "
                             "latent, or the sampler skipped every step)." +
                             (f" Recording failed: {run.failed}" if run.failed else ""))
        shown = choose_steps(steps, recorded)
        maps = to_image(render_maps(run, shown, size))
        plot = to_image(render_loss(run, size))
        saver = nodes.PreviewImage()
        ui = saver.save_images(maps, "InfSplign_attention")["ui"]["images"]
        ui += saver.save_images(plot, "InfSplign_loss")["ui"]["images"]
        return {"ui": {"images": ui}, "result": (maps, plot)}
