"""VISOR evaluation of InfSplign on the demo model, through ComfyUI's real executor.

    .venv/bin/python demo/evaluate.py                 # 52 evaluation prompts x 4 seeds, both arms
    .venv/bin/python demo/evaluate.py --tune          # the tuning grid, on the tuning prompts
    .venv/bin/python demo/evaluate.py --prompts 8     # a quick look
    .venv/bin/python demo/evaluate.py --tune --steps 50 --scheduler beta --temperature 4   # other sampling
    .venv/bin/python demo/evaluate.py --presence 9    # 9 three-object prompts x 4 seeds, unguided: all drawn?
    .venv/bin/python demo/evaluate.py --weights /tmp/w.safetensors   # other demo weights than the shipped

--presence N samples N prompts naming --presence-objects objects (3: "a green circle, a
yellow square and a purple triangle", no relation) with workflow d's unguided KSampler
(20 euler steps, normal scheduler, cfg 5; noise seed EVAL_NOISE_SEED) and counts the images
in which every named object is detected (scorer.detect, by colour and shape).

Each prompt runs the example workflow d (unguided and guided KSampler from the same seed,
batch of 4: the four seeds of a prompt are the batch's four initial noises) in-process with
execution.PromptExecutor, as a server does. Images are scored by the shapes-world detector
(demo_world/scorer.py). The unguided samples are also probed for localisation: each sample
is noised again (sigma 1 and 3) and the UNet's word attention (decoder output blocks 3-8)
is read; an object (the largest blob of its colour) counts when its words' attention
centroid is nearer its own centre than the other object's. Both arms also get the shape
fidelity of demo_world/shape_fidelity.py: the share of named objects drawn whole (the blob
of the colour fits its named shape) and of images whose two objects touch or merged.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "host")]

import comfy_host  # noqa: E402
import ui_workflow as wf  # noqa: E402

WORKFLOW = ROOT / "example_workflows" / "d - Demo model, unguided vs InfSplign.json"
TEXT, LATENT, APPLY, PLAIN, GUIDED, SAVE = "2", "6", "7", "8", "9", "13"
SETTING_NAMES = ("strength", "loss", "alpha", "margin", "orthogonal", "presence_weight", "temperature",
                 "balance_weight", "start_percent", "end_percent")
TUNING_GRID = {"temperature": (1.0, 4.0, 8.0), "strength": (0.0, 20.0, 50.0, 100.0)}  # strength 0: unguided


class Evaluator:
    def __init__(self, out: Path):
        comfy_host.boot()
        comfy_host.set_output_directory(out)
        from testkit.pack import module
        self.evaluation = module("demo_world.evaluation")
        self.presence = module("demo_world.presence_evaluation")
        self.scorer = module("demo_world.scorer")
        self.shapes = module("demo_world.shape_fidelity")
        self.training = module("demo_world.training")
        self.demo = module("demo_world.model")
        self.world = module("demo_world.world")
        self.session = comfy_host.Session()
        self.api = wf.to_api(wf.load(WORKFLOW), wf.local_object_info())
        self.out = out
        self._model = None

    def run(self, prompt, seed: int, settings: dict, guided_only: bool = False, cfg: float | None = None,
            sampling: dict | None = None, unguided_only: bool = False):
        """(unguided images, guided images) of one prompt, 4 seeds each, (H, W, 3) in [0, 1].
        `sampling` overrides KSampler inputs of both arms (steps, sampler_name, scheduler).
        guided_only / unguided_only: run that arm alone (the other is None)."""
        api = json.loads(json.dumps(self.api))
        api[TEXT]["inputs"]["value"] = prompt.text
        api[PLAIN]["inputs"]["seed"] = api[GUIDED]["inputs"]["seed"] = seed
        if cfg is not None:
            api[PLAIN]["inputs"]["cfg"] = api[GUIDED]["inputs"]["cfg"] = cfg
        for node in (PLAIN, GUIDED):
            api[node]["inputs"].update(sampling or {})
        api[APPLY]["inputs"].update(settings)
        if guided_only:  # no unguided branch: decode and save the guided images only
            api["13"]["inputs"]["images"] = ["11", 0]
            for node in ("8", "10", "12", "14"):
                api.pop(node)
        if unguided_only:  # no guidance: decode and save the unguided images only
            api["13"]["inputs"]["images"] = ["10", 0]
            for node in ("5", "7", "9", "11", "12", "14"):
                api.pop(node)
        run = self.session.execute(api)
        if not run.success:
            raise RuntimeError(f"{prompt.text!r}: {run.error()}")
        images = [np.asarray(Image.open(self.out / im["subfolder"] / im["filename"]).convert("RGB")) / 255.0
                  for im in run.outputs[SAVE]["images"]]
        if guided_only:
            return None, images
        if unguided_only:
            return images, None
        half = (images[0].shape[1] - 8) // 2
        return [im[:, :half] for im in images], [im[:, -half:] for im in images]

    def localisation(self, prompt, images) -> list[bool]:
        """Per detected object of each unguided image: is its word-attention centroid nearer
        its own centre than the other object's? (sigma 1 and 3, decoder blocks 3-8)."""
        import torch
        if self._model is None:
            model, clip, vae = self.demo.load(dtype=torch.float32)
            self._model = (model.model, clip, vae)
        base, clip, vae = self._model
        results = []
        ids = self.training.token_ids(clip, prompt.text)
        groups = (self.training.positions(ids, clip, " ".join(prompt.a)),
                  self.training.positions(ids, clip, " ".join(prompt.b)))
        with torch.no_grad():
            context = self.training.encode(clip, [ids])
            for img in images:
                dets = self.scorer.detect(img)
                # located by colour (the prompt's two colours differ), so a shape drawn
                # imperfectly still counts as the object it is meant to be
                da, db = self.scorer.find_by_color(dets, prompt.a[0]), self.scorer.find_by_color(dets, prompt.b[0])
                if da is None or db is None:
                    continue
                size = img.shape[0]
                centres = torch.tensor([[[da.cx / size, da.cy / size], [db.cx / size, db.cy / size]]])
                x0 = self.world.latent_signal(torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None])
                for sigma in (1.0, 3.0):
                    g = torch.Generator().manual_seed(0)
                    x = x0 + torch.randn(x0.shape, generator=g) * sigma
                    probs = self.training.attention_probs(base, x, torch.tensor([sigma]), context)
                    cents = self.training.word_centroids(probs, [groups])
                    results += self.training.nearer_own(cents, centres)[0].tolist()
        return results


def use_weights(path: Path) -> None:
    """Point every loaded copy of demo_world.model (the loader node's and ours) at `path`."""
    if not path.is_file():
        raise FileNotFoundError(path)
    for name, mod in list(sys.modules.items()):
        if name.endswith("demo_world.model") and hasattr(mod, "WEIGHTS"):
            mod.WEIGHTS = path.resolve()


def presence(ev: Evaluator, prompts, sampling: dict, cfg: float | None) -> None:
    """Unguided presence: the share of images in which every named object is detected."""
    t0 = time.monotonic()
    scores = []
    for p in prompts:
        images, _ = ev.run(p, ev.evaluation.EVAL_NOISE_SEED, {}, cfg=cfg, sampling=sampling, unguided_only=True)
        scores.append([ev.presence.score_image(p.objects, im) for im in images])
        print(f"  {p.text!r}: all objects in {sum(s.all_present for s in scores[-1])} of {len(images)} images, "
              f"objects found per image {[s.found for s in scores[-1]]} ({time.monotonic() - t0:.0f} s)", flush=True)
    flat = [s for row in scores for s in row]
    print(f"\npresence (unguided, {len(prompts)} prompts x 4 seeds = {len(flat)} images, noise seed "
          f"{ev.evaluation.EVAL_NOISE_SEED}): all named objects detected in {ev.presence.share(scores):.1f}% of "
          f"images; {100 * sum(s.found for s in flat) / sum(s.named for s in flat):.1f}% of named objects detected")


def settings_from(args) -> dict:
    return {k: getattr(args, k) for k in SETTING_NAMES if getattr(args, k) is not None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=52)
    ap.add_argument("--tune", action="store_true", help="run the tuning grid on the tuning prompts")
    ap.add_argument("--tune-prompts", type=int, default=12)
    ap.add_argument("--grid", type=json.loads, default=TUNING_GRID,
                    help='tuning grid as JSON, e.g. \'{"strength": [10, 30], "margin": [0, 0.1]}\'')
    ap.add_argument("--cfg", type=float, default=None, help="CFG of both KSamplers (workflow: 5)")
    ap.add_argument("--steps", type=int, default=None, help="steps of both KSamplers (workflow: 20)")
    ap.add_argument("--scheduler", default=None, help="scheduler of both KSamplers (workflow: normal)")
    ap.add_argument("--out", type=Path, default=ROOT / "output" / "evaluate")
    ap.add_argument("--weights", type=Path, default=None, help="demo weights file (default: the shipped one)")
    ap.add_argument("--presence", type=int, default=0, metavar="N",
                    help="instead: N object prompts without a relation, unguided; share with all objects drawn")
    ap.add_argument("--presence-objects", type=int, default=3, help="objects named by each --presence prompt")
    for name in SETTING_NAMES:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name,
                        type=str if name in ("loss", "orthogonal") else float, default=None)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(a.out)
    if a.weights is not None:
        use_weights(a.weights)
    print(f"demo weights: {ev.demo.WEIGHTS}", flush=True)
    sampling = {k: v for k, v in (("steps", a.steps), ("scheduler", a.scheduler)) if v is not None}
    sampling_text = f"cfg {a.cfg or 'workflow d'}" + "".join(f", {k} {v}" for k, v in sampling.items())
    if a.presence:
        presence(ev, ev.presence.object_prompts(a.presence, a.presence_objects), sampling, a.cfg)
        return 0
    evaluation_prompts, tuning_prompts = ev.evaluation.prompt_sets(a.prompts, a.tune_prompts)
    t0 = time.monotonic()

    if a.tune:
        print(f"tuning on {len(tuning_prompts)} tuning prompts x 4 seeds (noise seed "
              f"{ev.evaluation.TUNING_NOISE_SEED}), guided arm only", flush=True)
        for values in itertools.product(*a.grid.values()):
            settings = {**settings_from(a), **dict(zip(a.grid, values))}
            scores = [ev.evaluation.score_images(p, ev.run(p, ev.evaluation.TUNING_NOISE_SEED, settings, True, a.cfg, sampling)[1])
                      for p in tuning_prompts]
            m = ev.scorer.visor(scores)
            print(f"{settings} {sampling_text}: OA {m['OA']:.1f}  VISOR_cond {m['VISOR_cond']:.1f}  "
                  f"VISOR_uncond {m['VISOR_uncond']:.1f}  ({time.monotonic() - t0:.0f} s)", flush=True)
        return 0

    settings = settings_from(a)
    print(f"evaluating {len(evaluation_prompts)} prompts x 4 seeds (noise seed "
          f"{ev.evaluation.EVAL_NOISE_SEED}), settings {settings or 'workflow d'}, {sampling_text}",
          flush=True)
    unguided, guided, local = [], [], []
    shapes = {"unguided": [], "guided": []}
    for i, p in enumerate(evaluation_prompts, 1):
        u, g = ev.run(p, ev.evaluation.EVAL_NOISE_SEED, settings, cfg=a.cfg, sampling=sampling)
        unguided.append(ev.evaluation.score_images(p, u))
        guided.append(ev.evaluation.score_images(p, g))
        shapes["unguided"] += [ev.shapes.image_shapes(im, (p.a, p.b)) for im in u]
        shapes["guided"] += [ev.shapes.image_shapes(im, (p.a, p.b)) for im in g]
        local += ev.localisation(p, u)
        if i % 4 == 0 or i == len(evaluation_prompts):
            print(f"  {i}/{len(evaluation_prompts)} prompts ({time.monotonic() - t0:.0f} s)", flush=True)
    print()
    print(ev.evaluation.table(unguided, guided))
    print(f"\n{'shape fidelity':<34}{'unguided':>8}{'guided':>10}")
    for label, what in (("shape intact (% of objects)", lambda r: [o.intact for x in r for o in x.objects]),
                        ("touching or merged (% of images)", lambda r: [x.touching for x in r])):
        u_, g_ = (100 * sum(what(shapes[k])) / len(what(shapes[k])) for k in ("unguided", "guided"))
        print(f"{label:<34}{u_:>8.1f}{g_:>10.1f}")
    print(f"\nlocalisation (unguided samples with both colours present, re-noised to sigma 1 and 3): "
          f"{100 * sum(local) / max(len(local), 1):.1f}% of {len(local)} object probes have their words' "
          "attention centroid nearer their own object than the other")
    return 0


if __name__ == "__main__":
    sys.exit(main())
