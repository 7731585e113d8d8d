"""Layout boxes on the demo model, through ComfyUI's real executor: are the objects in their boxes?

    .venv/bin/python demo/evaluate_boxes.py               # 48 box prompts x 4 seeds, five arms
    .venv/bin/python demo/evaluate_boxes.py --tune        # the tuning grid, on the tuning prompts
    .venv/bin/python demo/evaluate_boxes.py --relations   # relation prompts: boxes planned vs centroid loss

Each box prompt ("a red circle and a blue square") gets two random non-overlapping boxes of
about the objects' size (demo_world/box_evaluation.py); its four seeds are the batch's four
initial noises, from the same noise seed in every arm. Arms: unguided; injection only
(iLGD's attention injection, no loss); box loss only (ilgd, maalign); both (the node's
shipped defaults). Graph: InfSplign Demo Model -> CLIPTextEncode, InfSplign Layout Boxes ->
InfSplign (KSampler) (workflow e's settings: workflow d's gelu, alpha 2, margin 0.25,
strength 30, with the maps read at temperature 32) -> KSampler (20 euler steps, cfg 5,
128 px) -> VAEDecode.
`--relations` runs demo/evaluate.py's evaluation prompts and seeds twice: InfSplign's
centroid loss (workflow d) and the same relations planned into boxes (Layout Boxes with
no boxes and the relations connected, the node's defaults, workflow e's guidance settings),
VISOR and OA of both.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "host")]

import comfy_host  # noqa: E402

RELATION_SETTINGS = {"strength": 30.0, "loss": "gelu", "alpha": 2.0, "margin": 0.25, "orthogonal": "auto",
                     "presence_weight": 1.0, "balance_weight": 1.0, "start_percent": 0.0, "end_percent": 0.5,
                     "threshold": False, "temperature": 8.0, "memory": "auto"}
# Workflow e's InfSplign (KSampler) settings: workflow d's with the maps read at temperature 32.
BOX_SETTINGS = {**RELATION_SETTINGS, "temperature": 32.0}
OFF = {"injection": 0.0, "injection_end_percent": 0.0, "box_loss": "none", "box_weight": 0.0, "box_end_percent": 0.0}
# The first grid of the tuning (demo_world/tuning_log.txt has it and the later, narrower ones).
TUNING_GRID = {"injection": (0.0, 0.75, 2.0), "box_loss": ("ilgd", "maalign"), "box_weight": (1.0, 4.0, 16.0)}


def demo_graph(text: str, seed: int) -> dict:
    """The unguided API prompt of the demo evaluations: InfSplign Demo Model -> CLIPTextEncode
    -> KSampler (20 euler steps, cfg 5, 128 px, batch 4) "sample" -> VAEDecode "decode"."""
    return {
        "model": {"class_type": "InfSplignDemoModelLoader", "inputs": {"weight_dtype": "default"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["model", 1], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["model", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 4}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["model", 2]}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


class BoxEvaluator:
    def __init__(self, out: Path):
        comfy_host.boot()
        comfy_host.set_output_directory(out)
        from testkit.pack import module
        self.boxes = module("demo_world.box_evaluation")
        self.evaluation = module("demo_world.evaluation")
        self.scorer = module("demo_world.scorer")
        self.defaults = module("nodes.layout_node").DEFAULTS
        self.session = comfy_host.Session()

    def graph(self, text: str, seed: int, layout: dict | None, guidance: dict | None,
              boxes: str = "[]", parse: bool = False) -> dict:
        """The API prompt: unguided when `guidance` is None; `layout` None: relations only."""
        g = demo_graph(text, seed)
        if guidance is None:
            return g
        relations = None
        if parse:
            g["parse"] = {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["model", 1], "text": text}}
            relations = ["parse", 0]
        if layout is not None:
            g["layout"] = {"class_type": "InfSplignLayout", "inputs": {
                "clip": ["model", 1], "text": text, "boxes": boxes, **layout,
                **({"relations": relations} if relations else {})}}
            relations = ["layout", 0]
        g["apply"] = {"class_type": "InfSplignApply", "inputs": {"model": ["model", 0], "relations": relations,
                                                                 **guidance}}
        g["sample"]["inputs"]["model"] = ["apply", 0]
        return g

    def images(self, graph: dict) -> list[np.ndarray]:
        run = self.session.execute(graph)
        if not run.success:
            raise RuntimeError(run.error())
        return [im.numpy() for im in self.session.cached("decode").outputs[0][0]]

    def box_arm(self, prompts, seed: int, layout: dict | None, strength: float | None) -> dict:
        scores = []
        for p in prompts:
            guidance = None if layout is None else {**BOX_SETTINGS, "strength": strength}
            for img in self.images(self.graph(p.text, seed, layout, guidance, p.boxes_json)):
                scores.append(self.boxes.score_image(p, img))
        return self.boxes.summary(scores)


def arms(defaults: dict) -> dict[str, tuple[dict | None, float | None]]:
    d = defaults
    return {
        "unguided": (None, None),
        "injection only": ({**OFF, "injection": d["injection"], "injection_end_percent": d["injection_end_percent"]}, 0.0),
        "box loss only (ilgd)": ({**d, "injection": 0.0, "box_loss": "ilgd"}, RELATION_SETTINGS["strength"]),
        "box loss only (maalign)": ({**d, "injection": 0.0, "box_loss": "maalign"}, RELATION_SETTINGS["strength"]),
        "both (defaults)": (dict(d), RELATION_SETTINGS["strength"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-prompts", type=int, default=48)
    ap.add_argument("--grid", type=json.loads, default=TUNING_GRID)
    ap.add_argument("--layout", type=json.loads, default={}, help="layout settings over the node's defaults")
    ap.add_argument("--strength", type=float, default=RELATION_SETTINGS["strength"])
    ap.add_argument("--guidance", type=json.loads, default={},
                    help="InfSplign (KSampler) settings of the box arms over workflow e's, e.g. '{\"temperature\": 8}'")
    ap.add_argument("--relations", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "output" / "evaluate_boxes")
    a = ap.parse_args()
    BOX_SETTINGS.update(a.guidance)
    a.out.mkdir(parents=True, exist_ok=True)
    ev = BoxEvaluator(a.out)
    t0 = time.monotonic()
    evaluation, tuning = ev.boxes.prompt_sets(a.prompts, a.tune_prompts)
    defaults = {**ev.defaults, **a.layout}

    if a.tune:
        print(f"tuning on {len(tuning)} tuning box prompts x 4 seeds (noise seed {ev.boxes.TUNING_NOISE_SEED})")
        base = ev.box_arm(tuning, ev.boxes.TUNING_NOISE_SEED, None, None)
        print(f"unguided: {base}", flush=True)
        for values in itertools.product(*a.grid.values()):
            layout = {**defaults, **dict(zip(a.grid, values))}
            m = ev.box_arm(tuning, ev.boxes.TUNING_NOISE_SEED, layout, a.strength)
            print(f"{layout} strength {a.strength}: inside {m['inside']:.1f}  IoU {m['IoU']:.1f}  OA {m['OA']:.1f}  "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
        return 0

    if a.relations:
        prompts = ev.evaluation.prompt_sets(52, 12)[0]
        seed = ev.evaluation.EVAL_NOISE_SEED
        results = {}
        for name, layout, settings in (("centroid loss (workflow d)", None, RELATION_SETTINGS),
                                       ("relations planned into boxes (workflow e)", defaults, BOX_SETTINGS)):
            scores = []
            for p in prompts:
                imgs = ev.images(ev.graph(p.text, seed, layout, {**settings, "strength": a.strength}, parse=True))
                scores.append(ev.evaluation.score_images(p, imgs))
            results[name] = ev.scorer.visor(scores)
            print(f"{name}: {results[name]} ({time.monotonic() - t0:.0f} s)", flush=True)
        print(f"\n{len(prompts)} relation prompts x 4 seeds (noise seed {seed}), the evaluation set of "
              "demo/evaluate.py")
        print("| guidance | OA | VISOR_uncond | VISOR_cond |\n|---|---|---|---|")
        for name, m in results.items():
            print(f"| {name} | {m['OA']:.1f} | {m['VISOR_uncond']:.1f} | {m['VISOR_cond']:.1f} |")
        return 0

    print(f"evaluating {len(evaluation)} box prompts x 4 seeds (noise seed {ev.boxes.EVAL_NOISE_SEED}); "
          f"defaults {defaults}", flush=True)
    rows = {}
    for name, (layout, strength) in arms(defaults).items():
        rows[name] = ev.box_arm(evaluation, ev.boxes.EVAL_NOISE_SEED, layout, strength)
        print(f"{name}: {rows[name]} ({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\n{len(evaluation)} box prompts x 4 seeds = {4 * len(evaluation)} prompt-seed pairs per arm, "
          f"{8 * len(evaluation)} objects")
    print("| arm | centre in its box (% of objects) | mean IoU (%) | OA (%) |\n|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['inside']:.1f} | {m['IoU']:.1f} | {m['OA']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
