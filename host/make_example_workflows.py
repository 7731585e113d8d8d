"""Writes example workflows a, b, c, e, f, g and h (UI format, as the ComfyUI frontend saves
them), and the saved view of all eight.

    .venv/bin/python host/make_example_workflows.py        # rewrite example_workflows/{a,b,c,e,f,g,h} - *.json
    .venv/bin/python host/make_example_workflows.py --check  # exit 1 if a committed file differs

Workflow d (the demo model) is edited by hand; only its saved view is written here. Each
node's sockets and widgets are in host/workflow_schema.py; tests/tier3/test_example_workflows.py
checks every file against a real server's /object_info and runs it. Layout: columns left to
right, in the order data flows. File names are the titles ComfyUI's Templates dialog shows;
host/make_thumbnails.py draws the thumbnail it shows beside each. The graph and its saved
view: host/workflow_graph.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workflow_graph import FREE, MINIMAP, TITLE, Workflow, template_view, view  # noqa: E402,F401

# The pack's guidance settings at their INPUT_TYPES defaults (nodes/guidance_nodes.py).
GUIDANCE_DEFAULTS = [1000.0, "sigmoid", 8.0, 0.0, "auto", 1.0, 1.0, 0.0, 0.25, False, 1.0, "auto"]
PARSE_DEFAULTS = ["", "from text", "", ""]  # object_a, relation, object_b: read from the text; no objects list
# InfSplign Layout Boxes at its defaults (nodes/layout_node.DEFAULTS): injection .. box_end_percent, and its
# optional box_margin, placing_iterations, placing_percent (after the optional width and height).
LAYOUT_DEFAULTS = [6.0, 0.1, "peak_centre", 1.5, 0.2]
LAYOUT_OPTIONAL = [0.2, 20, 0.05]
# InfSplign Refine at its defaults (nodes/refine_node.DEFAULTS, then its optional inputs' defaults).
REFINE_DEFAULTS = [1.0, 0.5, 0.0, 0.4, 50, 0.05, False, 30.0, 0.5, 1.0, "auto"]
# Workflow d's guidance settings for the demo model (its maps read at temperature 8).
DEMO_GUIDANCE = [30.0, "gelu", 2.0, 0.25, "auto", 1.0, 1.0, 0.0, 0.5, False, 8.0, "auto"]
# Workflow e's: the same with the maps read at temperature 32 (tuned with the layout defaults).
LAYOUT_GUIDANCE = DEMO_GUIDANCE[:10] + [32.0, "auto"]


# Columns (x) and node sizes shared by the three workflows.
X = [40, 420, 800, 1180, 1560, 1820]
NEGATIVE = "blurry, low quality, deformed, watermark, text"


def prompt_and_parse(w: Workflow, clip: tuple[int, int], text: str, x: int, y0: int) -> dict:
    """Prompt (one text for both) in the first column at y0, positive and negative
    CLIPTextEncode and Spatial Relation Parse in the column at x."""
    ids = {
        "prompt": w.node("PrimitiveStringMultiline", (X[0], y0), (320, 150), [text], title="Prompt"),
        "pos": w.node("CLIPTextEncode", (x, 80), (320, 90), [text], title="Positive"),
        "neg": w.node("CLIPTextEncode", (x, 220), (320, 130), [NEGATIVE], title="Negative"),
        "parse": w.node("InfSplignRelationParse", (x, 400), (320, 220), [text, *PARSE_DEFAULTS]),
    }
    for node in ("pos", "neg", "parse"):
        w.link(*clip, ids[node], "clip")
    w.link(ids["prompt"], 0, ids["pos"], "text")
    w.link(ids["prompt"], 0, ids["parse"], "text")
    return ids


def ksampler_workflow(info: str, ckpt_name: str, note: str, note_height: int, latent_type: str, size: int,
                      cfg: float, scheduler: str, prefix: str, flux_guidance: float | None = None) -> dict:
    """InfSplign (KSampler) between a checkpoint and KSampler; with `flux_guidance`, FluxGuidance
    on the positive prompt (Flux.1-dev at cfg 1)."""
    w = Workflow(info)
    ckpt = w.node("CheckpointLoaderSimple", (X[0], 80), (320, 100), [ckpt_name])
    t = prompt_and_parse(w, (ckpt, 1), "a cat to the left of a dog", X[1], 230)
    w.note((X[0], 440), (320, note_height), note)
    latent = w.node(latent_type, (X[1], 670), (320, 110), [size, size, 1])
    apply = w.node("InfSplignApply", (X[2], 80), (320, 310), list(GUIDANCE_DEFAULTS))
    sampler = w.node("KSampler", (X[3], 80), (320, 270), [42, "fixed", 20, cfg, "euler", scheduler, 1.0])
    decode = w.node("VAEDecode", (X[4], 80), (210, 50))
    save = w.node("SaveImage", (X[5], 80), (420, 460), [prefix])
    positive = (t["pos"], 0)
    if flux_guidance is not None:
        flux = w.node("FluxGuidance", (X[2], 430), (320, 60), [flux_guidance])
        w.link(t["pos"], 0, flux, "conditioning")
        positive = (flux, 0)
    w.link(ckpt, 0, apply, "model")
    w.link(t["parse"], 0, apply, "relations")
    w.link(apply, 0, sampler, "model")
    w.link(*positive, sampler, "positive")
    w.link(t["neg"], 0, sampler, "negative")
    w.link(latent, 0, sampler, "latent_image")
    w.link(sampler, 0, decode, "samples")
    w.link(ckpt, 2, decode, "vae")
    w.link(decode, 0, save, "images")
    return w.to_json()


def sd15_ksampler() -> dict:
    return ksampler_workflow(
        "InfSplign on SD1.5 with KSampler: the relation in the prompt guides where the objects go.",
        "v1-5-pruned-emaonly.safetensors",
        "**InfSplign, SD1.5 + KSampler**\n\nNeeds `models/checkpoints/v1-5-pruned-emaonly.safetensors` "
        "(any SD1.x checkpoint works).\n\nWrite the prompt once in *Prompt*: it feeds the positive "
        "encoder and *Spatial Relation Parse*. *InfSplign (KSampler)* patches the model for the "
        "first 25 % of the steps. To compare, feed KSampler the checkpoint's MODEL at the same seed.",
        240, "EmptyLatentImage", 512, 7.0, "normal", "infsplign/sd15")


def guider_custom_sampler(info: str, ckpt_name: str, text: str, note: str, latent_type: str, cfg: float,
                          scheduler: str, steps: int, prefix: str) -> dict:
    """InfSplign Guider with SamplerCustomAdvanced (RandomNoise, KSamplerSelect, BasicScheduler)."""
    w = Workflow(info)
    ckpt = w.node("CheckpointLoaderSimple", (X[0], 80), (320, 100), [ckpt_name])
    t = prompt_and_parse(w, (ckpt, 1), text, X[1], 230)
    w.note((X[0], 440), (320, 240 if latent_type == "EmptyLatentImage" else 260), note)
    latent = w.node(latent_type, (X[1], 670), (320, 110), [1024, 1024, 1])
    guider = w.node("InfSplignGuider", (X[2], 80), (320, 340), [cfg, *GUIDANCE_DEFAULTS])
    noise = w.node("RandomNoise", (X[2], 470), (320, 90), [42, "fixed"])
    select = w.node("KSamplerSelect", (X[2], 610), (320, 60), ["euler"])
    sigmas = w.node("BasicScheduler", (X[2], 720), (320, 110), [scheduler, steps, 1.0])
    sampler = w.node("SamplerCustomAdvanced", (X[3], 80), (320, 330), [])
    decode = w.node("VAEDecode", (X[4], 80), (210, 50))
    save = w.node("SaveImage", (X[5], 80), (420, 460), [prefix])
    w.link(ckpt, 0, guider, "model")
    w.link(t["pos"], 0, guider, "positive")
    w.link(t["neg"], 0, guider, "negative")
    w.link(t["parse"], 0, guider, "relations")
    w.link(ckpt, 0, sigmas, "model")
    w.link(noise, 0, sampler, "noise")
    w.link(guider, 0, sampler, "guider")
    w.link(select, 0, sampler, "sampler")
    w.link(sigmas, 0, sampler, "sigmas")
    w.link(latent, 0, sampler, "latent_image")
    w.link(sampler, 0, decode, "samples")
    w.link(ckpt, 2, decode, "vae")
    w.link(decode, 0, save, "images")
    return w.to_json()


def sdxl_guider_custom_sampler() -> dict:
    return guider_custom_sampler(
        "InfSplign on SDXL with InfSplign Guider and SamplerCustomAdvanced.", "sd_xl_base_1.0.safetensors",
        "a red apple to the right of a blue cup",
        "**InfSplign, SDXL + SamplerCustomAdvanced**\n\nNeeds `models/checkpoints/sd_xl_base_1.0.safetensors` "
        "(any SDXL checkpoint works).\n\n*InfSplign Guider* is a CFG guider (cfg is set on it) that "
        "also applies the spatial guidance; plug it into any sampler and sigmas. orthogonal = auto "
        "is off on SDXL.", "EmptyLatentImage", 7.0, "normal", 20, "infsplign/sdxl")


def sd15_lora_controlnet() -> dict:
    w = Workflow("InfSplign on SD1.5 next to a LoRA and a canny ControlNet.")
    x = [40, 400, 760, 1120, 1480, 1840, 2090]
    ckpt = w.node("CheckpointLoaderSimple", (x[0], 80), (320, 100), ["v1-5-pruned-emaonly.safetensors"])
    lora = w.node("LoraLoader", (x[1], 80), (320, 130), ["your_sd15_lora.safetensors", 1.0, 1.0])
    t = prompt_and_parse(w, (lora, 1), "a cat to the left of a dog", x[2], 230)
    cn_load = w.node("ControlNetLoader", (x[0], 430), (320, 60), ["control_v11p_sd15_canny_fp16.safetensors"])
    image = w.node("LoadImage", (x[0], 540), (320, 320), ["example.png", "image"])
    w.note((x[0], 910), (320, 260),
           "**InfSplign next to a LoRA and a ControlNet (SD1.5)**\n\nNeeds `models/checkpoints/"
           "v1-5-pruned-emaonly.safetensors`, an SD1.5 LoRA in `models/loras/` (pick yours in *Load "
           "LoRA*) and `models/controlnet/control_v11p_sd15_canny_fp16.safetensors`.\n\n*Load Image* "
           "gives the control picture, *Canny* its edges. Its layout should agree with the relation "
           "in the prompt, or the two pull against each other.")
    canny = w.node("Canny", (x[1], 540), (320, 90), [0.4, 0.8])
    latent = w.node("EmptyLatentImage", (x[2], 670), (320, 110), [512, 512, 1])
    cn_apply = w.node("ControlNetApplyAdvanced", (x[3], 80), (320, 190), [1.0, 0.0, 1.0])
    apply = w.node("InfSplignApply", (x[3], 330), (320, 310), list(GUIDANCE_DEFAULTS))
    sampler = w.node("KSampler", (x[4], 80), (320, 270), [42, "fixed", 20, 7.0, "euler", "normal", 1.0])
    decode = w.node("VAEDecode", (x[5], 80), (210, 50))
    save = w.node("SaveImage", (x[6], 80), (300, 460), ["infsplign/sd15_lora_controlnet"])
    w.link(ckpt, 0, lora, "model")
    w.link(ckpt, 1, lora, "clip")
    w.link(image, 0, canny, "image")
    w.link(t["pos"], 0, cn_apply, "positive")
    w.link(t["neg"], 0, cn_apply, "negative")
    w.link(cn_load, 0, cn_apply, "control_net")
    w.link(canny, 0, cn_apply, "image")
    w.link(lora, 0, apply, "model")
    w.link(t["parse"], 0, apply, "relations")
    w.link(apply, 0, sampler, "model")
    w.link(cn_apply, 0, sampler, "positive")
    w.link(cn_apply, 1, sampler, "negative")
    w.link(latent, 0, sampler, "latent_image")
    w.link(sampler, 0, decode, "samples")
    w.link(ckpt, 2, decode, "vae")
    w.link(decode, 0, save, "images")
    return w.to_json()


def demo_model_layout_boxes() -> dict:
    w = Workflow("InfSplign Layout Boxes on the bundled demo model: each object drawn in its box. Runs offline.")
    text = "a red circle and a blue square"
    boxes = json.dumps([{"object": "red circle", "box": [0.06, 0.08, 0.4, 0.42]},
                        {"object": "blue square", "box": [0.58, 0.55, 0.92, 0.89]}])
    x = [40, 370, 700, 1090, 1420, 1750, 1980]  # narrower columns: the graph fits a window at zoom 0.65
    model = w.node("InfSplignDemoModelLoader", (x[0], 80), (300, 100), ["default"])
    prompt = w.node("PrimitiveStringMultiline", (x[0], 230), (300, 130), [text], title="Prompt")
    w.note((x[0], 410), (300, 310),
           "**Layout boxes on the demo model**\n\nNeeds no model file. Draw a box per object on "
           "*InfSplign Layout Boxes* (drag on the frame; pick the object above it; drag a box to move it, "
           "its corner to resize, double-click to delete): the boxes go into its `boxes` text as JSON. "
           "Early steps bias each object's attention toward its box (injection), a burst of optimisation at "
           "the second step moves each object into its box before its shape forms (placing), and the next "
           "steps keep it there with the box loss. The preview draws the boxes over the maps.")
    pos = w.node("CLIPTextEncode", (x[1], 80), (300, 90), [text], title="Positive")
    neg = w.node("CLIPTextEncode", (x[1], 220), (300, 90), [""], title="Negative")
    latent = w.node("EmptyLatentImage", (x[1], 360), (300, 110), [128, 128, 4])
    layout = w.node("InfSplignLayout", (x[2], 80), (360, 640), [text, boxes, *LAYOUT_DEFAULTS, 128, 128, *LAYOUT_OPTIONAL])
    apply = w.node("InfSplignApply", (x[3], 80), (300, 310), list(LAYOUT_GUIDANCE))
    sampler = w.node("KSampler", (x[4], 80), (300, 270), [7, "fixed", 20, 5.0, "euler", "normal", 1.0])
    decode = w.node("VAEDecode", (x[5], 80), (200, 50))
    save = w.node("SaveImage", (x[6], 80), (250, 250), ["infsplign_demo/layout_boxes"])
    preview = w.node("InfSplignAttentionPreview", (x[5], 380), (480, 340), ["auto", 128],
                     title="Attention preview (boxes drawn)")
    for node in (pos, neg, layout):
        w.link(model, 1, node, "clip")
    w.link(prompt, 0, pos, "text")
    w.link(prompt, 0, layout, "text")
    w.link(model, 0, apply, "model")
    w.link(layout, 0, apply, "relations")
    w.link(apply, 0, sampler, "model")
    w.link(pos, 0, sampler, "positive")
    w.link(neg, 0, sampler, "negative")
    w.link(latent, 0, sampler, "latent_image")
    w.link(sampler, 0, decode, "samples")
    w.link(model, 2, decode, "vae")
    w.link(decode, 0, save, "images")
    w.link(sampler, 0, preview, "latent")
    w.link(apply, 0, preview, "model")
    return w.to_json()


def demo_model_refine() -> dict:
    w = Workflow("InfSplign Refine (GSN) on the bundled demo model: three objects, unrefined vs refined. "
                 "Runs offline.")
    text = "a green circle, a yellow square and a purple triangle"
    model = w.node("InfSplignDemoModelLoader", (X[0], 80), (320, 100), ["default"])
    prompt = w.node("PrimitiveStringMultiline", (X[0], 230), (320, 130), [text], title="Prompt")
    w.note((X[0], 410), (320, 300),
           "**Missing objects: InfSplign Refine**\n\nNeeds no model file. The prompt names three objects "
           "and no relation, so *Spatial Relation Parse* gets them as its `objects` list. At one step "
           "(`refine_percent`) *InfSplign Refine* optimises the latent so every object has a strong attention "
           "peak (presence) and the objects stay apart (separation); sampling goes on from there. Left: "
           "the same seeds unrefined. The preview's loss plot shows the refinement's loss per iteration.")
    pos = w.node("CLIPTextEncode", (X[1], 80), (320, 90), [text], title="Positive")
    neg = w.node("CLIPTextEncode", (X[1], 220), (320, 90), [""], title="Negative")
    latent = w.node("EmptyLatentImage", (X[1], 360), (320, 110), [128, 128, 4])
    parse = w.node("InfSplignRelationParse", (X[1], 520), (320, 260),
                   [text, "", "from text", "", "green circle, yellow square, purple triangle"])
    refine = w.node("InfSplignRefine", (X[2], 80), (340, 400), list(REFINE_DEFAULTS))
    plain = w.node("KSampler", (X[3], 80), (320, 270), [7, "fixed", 20, 5.0, "euler", "normal", 1.0],
                   title="KSampler (unrefined)")
    refined = w.node("KSampler", (X[3], 420), (320, 270), [7, "fixed", 20, 5.0, "euler", "normal", 1.0],
                     title="KSampler (refined)")
    decode_plain = w.node("VAEDecode", (1540, 80), (210, 50))
    decode_refined = w.node("VAEDecode", (1540, 420), (210, 50))
    save_plain = w.node("SaveImage", (1790, 80), (420, 300), ["infsplign_demo/unrefined"])
    save_refined = w.node("SaveImage", (1790, 420), (420, 300), ["infsplign_demo/refined"])
    preview = w.node("InfSplignAttentionPreview", (1540, 770), (650, 560), ["auto", 128],
                     title="Attention preview (refined run)")
    for node in (pos, neg, parse):
        w.link(model, 1, node, "clip")
    w.link(prompt, 0, pos, "text")
    w.link(prompt, 0, parse, "text")
    w.link(model, 0, refine, "model")
    w.link(parse, 0, refine, "relations")
    for sampler, m, decode, save in ((plain, (model, 0), decode_plain, save_plain),
                                     (refined, (refine, 0), decode_refined, save_refined)):
        w.link(*m, sampler, "model")
        w.link(pos, 0, sampler, "positive")
        w.link(neg, 0, sampler, "negative")
        w.link(latent, 0, sampler, "latent_image")
        w.link(sampler, 0, decode, "samples")
        w.link(model, 2, decode, "vae")
        w.link(decode, 0, save, "images")
    w.link(refined, 0, preview, "latent")
    w.link(refine, 0, preview, "model")
    return w.to_json()


def flux_dev_ksampler() -> dict:
    return ksampler_workflow(
        "InfSplign on Flux.1-dev with KSampler: cfg 1, the guidance value set by FluxGuidance.",
        "flux1-dev-fp8.safetensors",
        "**InfSplign, Flux.1-dev + KSampler**\n\nNeeds `models/checkpoints/flux1-dev-fp8.safetensors` "
        "(the checkpoint with its CLIP-L, T5 and VAE inside).\n\nFlux.1-dev samples at cfg 1 with "
        "*FluxGuidance* on the positive prompt; the negative is not used. *Spatial Relation Parse* "
        "reads the prompt's T5 tokens. The defaults are the UNet's numbers, not yet tuned on Flux.",
        260, "EmptySD3LatentImage", 1024, 1.0, "simple", "infsplign/flux", flux_guidance=3.5)


def sd35_guider_custom_sampler() -> dict:
    return guider_custom_sampler(
        "InfSplign on SD3.5 Medium with InfSplign Guider and SamplerCustomAdvanced.",
        "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors", "a red apple to the right of a blue cup",
        "**InfSplign, SD3.5 + SamplerCustomAdvanced**\n\nNeeds "
        "`models/checkpoints/sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors` (SD3.5 Large works "
        "too).\n\n*Spatial Relation Parse* reads the prompt's CLIP-L, CLIP-G and T5 tokens. The "
        "defaults are the UNet's numbers, not yet tuned on SD3.5.", "EmptySD3LatentImage", 4.5, "sgm_uniform", 30,
        "infsplign/sd35")


WORKFLOWS = {
    "a - InfSplign on SD1.5 with KSampler.json": sd15_ksampler,
    "b - InfSplign Guider on SDXL, custom sampler.json": sdxl_guider_custom_sampler,
    "c - InfSplign with a LoRA and a ControlNet.json": sd15_lora_controlnet,
    "e - Demo model, layout boxes.json": demo_model_layout_boxes,
    "f - Demo model, InfSplign Refine.json": demo_model_refine,
    "g - InfSplign on Flux.1-dev with KSampler.json": flux_dev_ksampler,
    "h - InfSplign Guider on SD3.5, custom sampler.json": sd35_guider_custom_sampler,
}
HAND_EDITED = "d - Demo model, unguided vs InfSplign.json"  # only its saved view is written here


def with_view(workflow: dict) -> dict:
    """The hand-edited workflow with its saved view set by view()."""
    workflow = json.loads(json.dumps(workflow))
    workflow.setdefault("extra", {})["ds"] = view(workflow["nodes"])
    return workflow


def render(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def outputs() -> dict[str, str]:
    """File name -> the text it must hold."""
    texts = {name: render(build()) for name, build in WORKFLOWS.items()}
    texts[HAND_EDITED] = render(with_view(json.loads((OUT / HAND_EDITED).read_text())))
    return texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for name, text in outputs().items():
        path = OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        elif not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run host/make_example_workflows.py):", ", ".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
