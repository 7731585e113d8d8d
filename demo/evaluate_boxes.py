"""Layout boxes on the demo model, through ComfyUI's real executor: are the objects in their boxes?

    .venv/bin/python demo/evaluate_boxes.py               # 48 box prompts x 4 seeds, 3 layout sets, five arms
    .venv/bin/python demo/evaluate_boxes.py --layouts near  # one layout set
    .venv/bin/python demo/evaluate_boxes.py --tune        # the tuning grid, on the tuning prompts
    .venv/bin/python demo/evaluate_boxes.py --relations   # relation prompts: boxes planned vs centroid loss
    .venv/bin/python demo/evaluate_boxes.py --save output/boxes_failures   # and sheets of the failures

Each box prompt ("a red circle and a blue square") gets two non-overlapping boxes, drawn by
a layout set (demo_world/box_evaluation.py): "object-sized" (30 to 44 px of 128, as the
world places objects), "wide" (0.24 to 0.40 of the side, anywhere), "near" (as wide, at most
0.05 of the side apart). Its four seeds are the batch's four initial noises, from the same
noise seed in every arm. Scores: centre in its box, IoU, OA, and shape fidelity (the share
of objects drawn whole, of objects in their box and whole, and of images whose two objects
touch or merged; demo_world/shape_fidelity.py). Arms: unguided; injection only
(iLGD's attention injection, no loss); box loss only (with its placing burst); the previous
defaults (ilgd weight 12, injection 6 until 0.4, no margin, no placing burst); both without
the placing burst; both (the node's shipped defaults). Graph: InfSplign Demo Model ->
CLIPTextEncode, InfSplign Layout Boxes -> InfSplign (KSampler) (workflow e's settings:
workflow d's gelu, alpha 2, margin 0.25, strength 30, with the maps read at temperature 32)
-> KSampler (20 euler steps, cfg 5, 128 px) -> VAEDecode.
`--tune` runs a grid of layout settings on the tuning prompts of each layout set, pooled over
three tuning noise seeds (`--tune-seeds`), and says whether a row meets the tuning rule
(meets_rule); `--calibrate` prints the figures of the shape-fidelity thresholds (unguided
tuning images).
`--relations` runs demo/evaluate.py's evaluation prompts and seeds twice: InfSplign's
centroid loss (workflow d) and the same relations planned into boxes (Layout Boxes with
no boxes and the relations connected, the node's defaults, workflow e's guidance settings),
VISOR, OA and shape fidelity of both.
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
# A grid around the shipped defaults (demo_world/tuning_log.txt has every row tried).
TUNING_GRID = {"placing_iterations": (10, 20), "placing_percent": (0.05, 0.1)}


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
        self.shapes = module("demo_world.shape_fidelity")
        self.defaults = module("nodes.layout_node").DEFAULTS
        self.session = comfy_host.Session()
        self._unguided: dict[tuple[str, int], list[np.ndarray]] = {}

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

    def prompt_images(self, p, seed: int, layout: dict | None, strength: float | None) -> list[np.ndarray]:
        """A box prompt's four images; unguided ones do not depend on the boxes, so the layout
        sets (the same object pairs) share them."""
        if layout is None:
            key = (p.text, seed)
            if key not in self._unguided:
                self._unguided[key] = self.images(self.graph(p.text, seed, None, None))
            return self._unguided[key]
        return self.images(self.graph(p.text, seed, layout, {**BOX_SETTINGS, "strength": strength}, p.boxes_json))

    def box_arm(self, prompts, seed: int, layout: dict | None, strength: float | None, sheet: Path | None = None):
        """(summary, per-image scores) of one arm; `sheet`: save its failures there."""
        scores, failures = [], []
        for p in prompts:
            for img in self.prompt_images(p, seed, layout, strength):
                scores.append(self.boxes.score_image(p, img))
                if sheet is not None and failed(scores[-1]):
                    failures.append((p, img, scores[-1]))
        if sheet is not None:
            save_sheet(sheet, failures, self.boxes.world.COLORS)
        return self.boxes.summary(scores), scores


def failed(score) -> bool:
    """An image with an object not drawn whole, or the two objects touching or merged."""
    return score.touching or not (score.a.intact and score.b.intact)


def save_sheet(path: Path, failures, colours: dict, per_row: int = 8, scale: int = 2) -> None:
    """Failures side by side at `scale`, each object's box outlined in its colour, the named
    objects' shape IoU and T (touching) written under each."""
    from PIL import Image, ImageDraw
    if not failures:
        return
    cell, text_h = 128 * scale, 14
    rows = (len(failures) + per_row - 1) // per_row
    sheet = Image.new("RGB", (per_row * cell, rows * (cell + text_h)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, (p, img, sc) in enumerate(failures):
        x, y = (i % per_row) * cell, (i // per_row) * (cell + text_h)
        tile = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, (x, y))
        for thing, box in ((p.a, p.box_a), (p.b, p.box_b)):
            colour = tuple(int(255 * c) for c in colours[thing[0]])
            draw.rectangle([x + box[0] * cell, y + box[1] * cell, x + box[2] * cell - 1, y + box[3] * cell - 1],
                           outline=tuple(max(c, 90) for c in colour))
        label = f"{p.a[1][:3]} {sc.a.shape_iou:.2f} {p.b[1][:3]} {sc.b.shape_iou:.2f}{' T' if sc.touching else ''}"
        draw.text((x + 2, y + cell), label, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


COLUMNS = ("inside", "IoU", "OA", "intact", "placed_intact", "touching")
HEADER = ("| arm | centre in its box (% of objects) | mean IoU (%) | OA (%) | shape intact (% of objects) | "
          "in its box and intact (% of objects) | touching or merged (% of images) |\n|---|---|---|---|---|---|---|")


def row(name: str, m: dict) -> str:
    return f"| {name} | " + " | ".join(f"{m[c]:.1f}" for c in COLUMNS) + " |"


def brief(m: dict) -> str:
    return (f"inside {m['inside']:.1f}  IoU {m['IoU']:.1f}  OA {m['OA']:.1f}  intact {m['intact']:.1f}  "
            f"placed+intact {m['placed_intact']:.1f}  touching {m['touching']:.1f}")


# The defaults before shape fidelity was measured (tuned for centre-in-box with OA alone).
PREVIOUS_DEFAULTS = {"injection": 6.0, "injection_end_percent": 0.4, "box_loss": "ilgd", "box_weight": 12.0,
                     "box_end_percent": 0.5, "box_margin": 0.0, "placing_iterations": 0}


def arms(defaults: dict) -> dict[str, tuple[dict | None, float | None]]:
    d = defaults
    return {
        "unguided": (None, None),
        "injection only": ({**OFF, "injection": d["injection"], "injection_end_percent": d["injection_end_percent"]}, 0.0),
        "box loss only": ({**d, "injection": 0.0}, RELATION_SETTINGS["strength"]),
        "previous defaults (ilgd 12, injection 6 until 0.4)": (dict(PREVIOUS_DEFAULTS), RELATION_SETTINGS["strength"]),
        "both, no placing burst": ({**d, "placing_iterations": 0}, RELATION_SETTINGS["strength"]),
        "both (defaults)": (dict(d), RELATION_SETTINGS["strength"]),
    }


def meets_rule(row_sets: dict, base_sets: dict, limit: float = 3.0) -> bool:
    """The tuning rule's condition, on every layout set and every noise seed (and pooled):
    shape-intact objects at most `limit` points below unguided, touching or merged images at
    most `limit` points above. Sets map to a list of summaries, the pooled one first, then
    one per seed: pooled figures alone let the easy noises hide shapes broken on a hard one."""
    return all(row["intact"] >= base["intact"] - limit and row["touching"] <= base["touching"] + limit
               for k in row_sets for row, base in zip(row_sets[k], base_sets[k]))


def relation_fidelity(ev: BoxEvaluator, p, images) -> list:
    return [ev.shapes.image_shapes(im, (p.a, p.b)) for im in images]


def fidelity_summary(shapes: list) -> tuple[float, float]:
    """(% of objects intact, % of images touching or merged)."""
    objects = [o for s in shapes for o in s.objects]
    return (100 * sum(o.intact for o in objects) / len(objects), 100 * sum(s.touching for s in shapes) / len(shapes))


CALIBRATION_QUANTILE = 0.05  # the rule: each shape's threshold passes 95 % of its unguided objects


def calibrate(ev: BoxEvaluator, prompts, save: Path | None) -> None:
    """Per named shape, the quantiles of the named-shape IoU of unguided objects (tuning
    prompts and noise seed) and the threshold the rule gives; `save`: the lowest ones."""
    seed = ev.boxes.TUNING_NOISE_SEED
    by_shape: dict[str, list] = {}
    missing = 0
    for p in prompts:
        for img in ev.prompt_images(p, seed, None, None):
            shapes = ev.shapes.image_shapes(img, (p.a, p.b))
            for thing, o in zip((p.a, p.b), shapes.objects):
                if o.found:
                    by_shape.setdefault(thing[1], []).append((o.iou, p, img))
                else:
                    missing += 1
    print(f"unguided, {len(prompts)} tuning box prompts x 4 seeds (noise seed {seed}); objects without a blob of "
          f"their colour: {missing}")
    for shape, found in sorted(by_shape.items()):
        ious = sorted(v for v, _, _ in found)
        q = lambda f: ious[min(int(f * len(ious)), len(ious) - 1)]  # noqa: E731
        print(f"  {shape} ({len(ious)} objects): IoU quantiles 1/2.5/5/10/25/50 %: "
              + " / ".join(f"{q(f):.3f}" for f in (0.01, 0.025, 0.05, 0.1, 0.25, 0.5))
              + f"; threshold by the rule ({CALIBRATION_QUANTILE:.0%} quantile, 2 decimals down): "
              + f"{int(q(CALIBRATION_QUANTILE) * 100) / 100:.2f}; now {ev.shapes.SHAPE_IOU_THRESHOLDS[shape]}")
        if save is not None:
            lowest = sorted(found, key=lambda t: t[0])[:16]
            failures = [(p, img, ev.boxes.score_image(p, img)) for _, p, img in lowest]
            save_sheet(save / f"calibrate_{shape}_lowest.png", failures, ev.boxes.world.COLORS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--layouts", default="object-sized,wide,near", help="layout sets, comma-separated")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-prompts", type=int, default=48)
    ap.add_argument("--tune-seeds", default="",
                    help="noise seeds of the tuning runs, comma-separated (each gives the batch's four noises); "
                         "default demo_world/box_evaluation.py's TUNING_NOISE_SEEDS")
    ap.add_argument("--grid", type=json.loads, default=TUNING_GRID)
    ap.add_argument("--layout", type=json.loads, default={}, help="layout settings over the node's defaults")
    ap.add_argument("--strength", type=float, default=RELATION_SETTINGS["strength"])
    ap.add_argument("--guidance", type=json.loads, default={},
                    help="InfSplign (KSampler) settings of the box arms over workflow e's, e.g. '{\"temperature\": 8}'")
    ap.add_argument("--arms", default="", help="only these arms (comma-separated names), e.g. 'unguided,both (defaults)'")
    ap.add_argument("--relations", action="store_true")
    ap.add_argument("--calibrate", action="store_true",
                    help="the shape-fidelity thresholds' figures: unguided tuning images, per shape")
    ap.add_argument("--save", type=Path, default=None, help="save sheets of each arm's failed images in this folder")
    ap.add_argument("--out", type=Path, default=ROOT / "output" / "evaluate_boxes")
    a = ap.parse_args()
    BOX_SETTINGS.update(a.guidance)
    a.out.mkdir(parents=True, exist_ok=True)
    ev = BoxEvaluator(a.out)
    t0 = time.monotonic()
    layouts = [name.strip() for name in a.layouts.split(",") if name.strip()]
    sets = {name: ev.boxes.prompt_sets(a.prompts, a.tune_prompts, name) for name in layouts}
    defaults = {**ev.defaults, **a.layout}
    sheet = (lambda *parts: a.save / ("_".join(parts).replace(" ", "_").replace("(", "").replace(")", "") + ".png")
             ) if a.save else (lambda *parts: None)

    if a.calibrate:
        calibrate(ev, sets[layouts[0]][1], a.save)
        return 0

    if a.tune:
        seeds = [int(v) for v in a.tune_seeds.split(",") if v.strip()] or list(ev.boxes.TUNING_NOISE_SEEDS)
        print(f"tuning on {a.tune_prompts} tuning box prompts x 4 seeds x noise seeds {seeds} per layout set "
              f"({', '.join(layouts)}); strength {a.strength}, guidance {BOX_SETTINGS}", flush=True)

        def tuning_arm(name: str, layout: dict | None, strength: float | None, tag: str) -> list[dict]:
            """One arm on a layout set's tuning prompts: its figures pooled over the noise seeds,
            then each seed's (printed too)."""
            pooled, per_seed = [], []
            for seed in seeds:
                m, scores = ev.box_arm(sets[name][1], seed, layout, strength, sheet("tune", name, tag, str(seed)))
                pooled += scores
                per_seed.append(m)
                if len(seeds) > 1:
                    print(f"    {name}, noise seed {seed}: {brief(m)}", flush=True)
            return [ev.boxes.summary(pooled), *per_seed]

        base = {}
        for name in layouts:
            base[name] = tuning_arm(name, None, None, "unguided")
            print(f"  unguided, {name}: {brief(base[name][0])}", flush=True)
        for values in itertools.product(*a.grid.values()):
            layout = {**defaults, **dict(zip(a.grid, values))}
            tag = "_".join(f"{k}{v}" for k, v in zip(a.grid, values))
            results = {name: tuning_arm(name, layout, a.strength, tag) for name in layouts}
            mean = sum(r[0]["placed_intact"] for r in results.values()) / len(results)
            print(f"{layout}: placed+intact mean {mean:.1f}, rule {'met' if meets_rule(results, base) else 'NOT met'} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
            for name, m in results.items():
                print(f"  {name}: {brief(m[0])}", flush=True)
        return 0

    if a.relations:
        prompts = ev.evaluation.prompt_sets(52, 12)[0]
        seed = ev.evaluation.EVAL_NOISE_SEED
        results = {}
        for name, layout, settings in (("centroid loss (workflow d)", None, RELATION_SETTINGS),
                                       ("relations planned into boxes (workflow e)", defaults, BOX_SETTINGS)):
            scores, shapes = [], []
            for p in prompts:
                imgs = ev.images(ev.graph(p.text, seed, layout, {**settings, "strength": a.strength}, parse=True))
                scores.append(ev.evaluation.score_images(p, imgs))
                shapes += relation_fidelity(ev, p, imgs)
            results[name] = (ev.scorer.visor(scores), *fidelity_summary(shapes))
            print(f"{name}: {results[name]} ({time.monotonic() - t0:.0f} s)", flush=True)
        print(f"\n{len(prompts)} relation prompts x 4 seeds (noise seed {seed}), the evaluation set of "
              "demo/evaluate.py")
        print("| guidance | OA | VISOR_uncond | VISOR_cond | shape intact (% of objects) | "
              "touching or merged (% of images) |\n|---|---|---|---|---|---|")
        for name, (m, intact, touching) in results.items():
            print(f"| {name} | {m['OA']:.1f} | {m['VISOR_uncond']:.1f} | {m['VISOR_cond']:.1f} | {intact:.1f} | "
                  f"{touching:.1f} |")
        return 0

    chosen = arms(defaults)
    if a.arms:
        chosen = {k: v for k, v in chosen.items() if k in {n.strip() for n in a.arms.split(",")}}
    print(f"evaluating {a.prompts} box prompts x 4 seeds per layout set (noise seed {ev.boxes.EVAL_NOISE_SEED}); "
          f"defaults {defaults}", flush=True)
    tables = {}
    for name in layouts:
        rows = {}
        for arm, (layout, strength) in chosen.items():
            rows[arm], _ = ev.box_arm(sets[name][0], ev.boxes.EVAL_NOISE_SEED, layout, strength, sheet(name, arm))
            print(f"{name}, {arm}: {brief(rows[arm])} ({time.monotonic() - t0:.0f} s)", flush=True)
        tables[name] = rows
    for name, rows in tables.items():
        print(f"\nlayout set \"{name}\": {a.prompts} box prompts x 4 seeds = {4 * a.prompts} prompt-seed pairs per "
              f"arm, {8 * a.prompts} objects")
        print(HEADER)
        for arm, m in rows.items():
            print(row(arm, m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
