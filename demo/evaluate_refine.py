"""InfSplign Refine (GSN) on the demo model, through ComfyUI's real executor.

    .venv/bin/python demo/evaluate_refine.py              # three-object prompts: unguided vs refined
    .venv/bin/python demo/evaluate_refine.py --sweep      # the refine step sweep, on the tuning prompts
    .venv/bin/python demo/evaluate_refine.py --relations  # relation prompts: InfSplign, Refine, both

Graph: InfSplign Demo Model -> CLIPTextEncode, Spatial Relation Parse (`objects` = the named
objects) -> [InfSplign (KSampler), workflow d's settings] -> [InfSplign Refine] -> KSampler (20
euler steps, cfg 5, 128 px, batch 4: a prompt's four seeds are the batch's four initial
noises, the same in every arm) -> VAEDecode. Images are scored by the shapes-world detector.
Presence prompts name three objects and no relation (demo_world/presence_evaluation.py); the
sweep runs only on its tuning prompts and seeds, the evaluation on others. `--relations` uses
demo/evaluate.py's 52 evaluation prompts and seeds. Every arm also gets the shape fidelity of
demo_world/shape_fidelity.py: the share of named objects drawn whole and of images in which
two named objects touch or merged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "host")]

import comfy_host  # noqa: E402
from evaluate_boxes import demo_graph  # noqa: E402  (demo/ is the script's folder)

# Workflow d's InfSplign (KSampler) settings (tuned for relations, demo_world/tuning_log.txt).
RELATION_SETTINGS = {"strength": 30.0, "loss": "gelu", "alpha": 2.0, "margin": 0.25, "orthogonal": "auto",
                     "presence_weight": 1.0, "balance_weight": 1.0, "start_percent": 0.0, "end_percent": 0.5,
                     "threshold": False, "temperature": 8.0, "memory": "auto"}
SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


class RefineEvaluator:
    def __init__(self, out: Path):
        comfy_host.boot()
        comfy_host.set_output_directory(out)
        from testkit.pack import module
        self.presence = module("demo_world.presence_evaluation")
        self.evaluation = module("demo_world.evaluation")
        self.scorer = module("demo_world.scorer")
        self.shapes = module("demo_world.shape_fidelity")
        self.defaults = dict(module("nodes.refine_node").DEFAULTS)
        self.session = comfy_host.Session()
        self.seconds = 0.0
        self.images_made = 0

    def graph(self, text: str, seed: int, objects: str, guidance: dict | None, refine: dict | None) -> dict:
        g = demo_graph(text, seed)
        if guidance is None and refine is None:
            return g
        g["parse"] = {"class_type": "InfSplignRelationParse", "inputs": {"clip": ["model", 1], "text": text,
                                                                           "objects": objects}}
        model = ["model", 0]
        if guidance is not None:
            g["apply"] = {"class_type": "InfSplignApply", "inputs": {"model": model, "relations": ["parse", 0],
                                                                     **guidance}}
            model = ["apply", 0]
        if refine is not None:
            g["refine"] = {"class_type": "InfSplignRefine", "inputs": {"model": model, "relations": ["parse", 0],
                                                                       **refine}}
            model = ["refine", 0]
        g["sample"]["inputs"]["model"] = model
        return g

    def images(self, graph: dict) -> list[np.ndarray]:
        t = time.monotonic()
        run = self.session.execute(graph)
        if not run.success:
            raise RuntimeError(run.error())
        out = [im.numpy() for im in self.session.cached("decode").outputs[0][0]]
        self.seconds += time.monotonic() - t
        self.images_made += len(out)
        return out

    def presence_arm(self, prompts, seed: int, refine: dict | None, shapes: list | None = None):
        """Scores[prompt][seed]; `shapes`: the images' shape fidelity is appended there."""
        scores = []
        for p in prompts:
            images = self.images(self.graph(p.text, seed, p.objects_list, None, refine))
            scores.append([self.presence.score_image(p.objects, im) for im in images])
            if shapes is not None:
                shapes += [self.shapes.image_shapes(im, p.objects) for im in images]
        return scores

    def timed(self, fn):
        self.seconds, self.images_made = 0.0, 0
        result = fn()
        return result, self.seconds / max(self.images_made, 1)


def fidelity(shapes: list) -> tuple[float, float]:
    """(% of named objects shape-intact, % of images with two named objects touching or merged)."""
    objects = [o for s in shapes for o in s.objects]
    return (100.0 * sum(o.intact for o in objects) / len(objects), 100.0 * sum(s.touching for s in shapes) / len(shapes))


def refine_settings(defaults: dict, **over) -> dict:
    return {**defaults, "continuous": False, **over}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tune-prompts", type=int, default=10)
    ap.add_argument("--points", type=json.loads, default=list(SWEEP))
    ap.add_argument("--refine", type=json.loads, default={}, help="InfSplign Refine settings over the node's defaults")
    ap.add_argument("--relations", action="store_true")
    ap.add_argument("--relation-prompts", type=int, default=52)
    ap.add_argument("--out", type=Path, default=ROOT / "output" / "evaluate_refine")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    ev = RefineEvaluator(a.out)
    P = ev.presence
    defaults = {**ev.defaults, **a.refine}
    t0 = time.monotonic()

    if a.sweep:
        tuning = P.prompt_sets(a.prompts, a.tune_prompts)[1]
        print(f"refine step sweep on {len(tuning)} tuning presence prompts x 4 seeds (noise seed "
              f"{P.TUNING_NOISE_SEED}); settings {defaults}", flush=True)
        base = ev.presence_arm(tuning, P.TUNING_NOISE_SEED, None)
        print(f"unguided: all three {P.share(base):.1f} %", flush=True)
        for point in a.points:
            s = ev.presence_arm(tuning, P.TUNING_NOISE_SEED, refine_settings(defaults, refine_percent=point))
            print(f"refine_percent {point:.2f}: all three {P.share(s):.1f} %  fused {P.share(s, lambda x: x.fused):.1f} %"
                  f"  ({time.monotonic() - t0:.0f} s)", flush=True)
        return 0

    if a.relations:
        prompts = ev.evaluation.prompt_sets(a.relation_prompts, 12)[0]
        seed = ev.evaluation.EVAL_NOISE_SEED
        refine_all = refine_settings(defaults, spatial=max(defaults["spatial"], 1.0),
                                     temperature=RELATION_SETTINGS["temperature"])
        arms = {
            "InfSplign alone (workflow d)": (RELATION_SETTINGS, None),
            "Refine alone (spatial + presence + separation)": (None, refine_all),
            "both": (RELATION_SETTINGS, refine_all),
            "both, no separation": (RELATION_SETTINGS, {**refine_all, "separation": 0.0}),
        }
        rows = {}
        for name, (guidance, refine) in arms.items():
            def arm():
                scores, fused, shapes = [], [], []
                for p in prompts:
                    imgs = ev.images(ev.graph(p.text, seed, "", guidance, refine))
                    scores.append(ev.evaluation.score_images(p, imgs))
                    fused += [P.fused(ev.scorer.detect(im), (p.a, p.b)) for im in imgs]
                    shapes += [ev.shapes.image_shapes(im, (p.a, p.b)) for im in imgs]
                return ev.scorer.visor(scores), 100.0 * sum(fused) / len(fused), fidelity(shapes)
            (m, fused_share, fid), per_image = ev.timed(arm)
            rows[name] = (m, fused_share, fid, per_image)
            print(f"{name}: {m} fused {fused_share:.1f} %, intact {fid[0]:.1f} %, touching {fid[1]:.1f} %, "
                  f"{per_image:.2f} s/image ({time.monotonic() - t0:.0f} s)", flush=True)
        print(f"\n{len(prompts)} relation prompts x 4 seeds (noise seed {seed}), the evaluation set of demo/evaluate.py")
        print("| arm | VISOR_cond | OA | fused (% of images) | shape intact (% of objects) | touching or merged "
              "(% of images) | s / image |\n|---|---|---|---|---|---|---|")
        for name, (m, f, fid, s) in rows.items():
            print(f"| {name} | {m['VISOR_cond']:.1f} | {m['OA']:.1f} | {f:.1f} | {fid[0]:.1f} | {fid[1]:.1f} | {s:.2f} |")
        return 0

    evaluation = P.prompt_sets(a.prompts, a.tune_prompts)[0]
    print(f"evaluating {len(evaluation)} presence prompts x 4 seeds (noise seed {P.EVAL_NOISE_SEED}); "
          f"refine settings {defaults}", flush=True)
    arms = {"unguided": None, "presence refinement (presence only)": refine_settings(defaults, separation=0.0),
            "refinement (node defaults)": refine_settings(defaults)}
    results, shapes = {}, {}
    for name, refine in arms.items():
        shapes[name] = []
        scores, per_image = ev.timed(lambda: ev.presence_arm(evaluation, P.EVAL_NOISE_SEED, refine, shapes[name]))
        results[name] = (scores, per_image)
        print(f"{name}: all three {P.share(scores):.1f} % ({time.monotonic() - t0:.0f} s)", flush=True)
    base = results["unguided"][0]
    n = sum(len(r) for r in base)
    print(f"\n{len(evaluation)} three-object prompts x 4 seeds = {n} prompt-seed pairs per arm")
    print("| arm | all three objects (%) | difference (95 % CI, paired bootstrap over prompts) | "
          "mean objects found | fused (%) | shape intact (% of objects) | touching or merged (% of images) | "
          "s / image |\n|---|---|---|---|---|---|---|---|")
    for name, (scores, per_image) in results.items():
        flat = [s for row in scores for s in row]
        diff = "" if name == "unguided" else "{:+.1f} [{:+.1f}, {:+.1f}]".format(*P.paired_interval(base, scores))
        print(f"| {name} | {P.share(scores):.1f} | {diff} | {sum(s.found for s in flat) / len(flat):.2f} | "
              f"{P.share(scores, lambda s: s.fused):.1f} | {fidelity(shapes[name])[0]:.1f} | "
              f"{fidelity(shapes[name])[1]:.1f} | {per_image:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
