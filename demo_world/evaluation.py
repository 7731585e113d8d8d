"""Relation prompts for the demo model, and VISOR evaluation through ComfyUI's executor.

Prompt sets are drawn from fixed seeds: the tuning set and the evaluation set never share
a prompt, and they use different sampling seeds. Prompts without a relation, for presence: demo_world/presence_evaluation.py.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from . import scorer, world

PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
TUNING_PROMPT_SEED, EVAL_PROMPT_SEED = 101, 202
TUNING_NOISE_SEED, EVAL_NOISE_SEED = 1000, 7


@dataclass(frozen=True)
class RelationPrompt:
    a: tuple[str, str]  # (colour, shape)
    relation: str
    b: tuple[str, str]

    @property
    def text(self) -> str:
        return f"a {self.a[0]} {self.a[1]} {PHRASE[self.relation]} a {self.b[0]} {self.b[1]}"


def all_prompts() -> list[RelationPrompt]:
    out = []
    for ca in world.COLORS:
        for cb in world.COLORS:
            for sa in world.SHAPES:
                for sb in world.SHAPES:
                    if ca != cb and sa != sb:
                        out += [RelationPrompt((ca, sa), r, (cb, sb)) for r in PHRASE]
    return out


def prompt_sets(n_eval: int, n_tune: int) -> tuple[list[RelationPrompt], list[RelationPrompt]]:
    """(evaluation, tuning) prompts: disjoint, each balanced over the four relations."""
    pool = all_prompts()
    random.Random(EVAL_PROMPT_SEED).shuffle(pool)
    by_rel = {r: [p for p in pool if p.relation == r] for r in PHRASE}
    evaluation = [by_rel[r][i] for i in range(n_eval // 4 + 1) for r in PHRASE][:n_eval]
    rest = [p for p in pool if p not in set(evaluation)]
    random.Random(TUNING_PROMPT_SEED).shuffle(rest)
    by_rel = {r: [p for p in rest if p.relation == r] for r in PHRASE}
    tuning = [by_rel[r][i] for i in range(n_tune // 4 + 1) for r in PHRASE][:n_tune]
    return evaluation, tuning


def score_images(prompt: RelationPrompt, images) -> list[scorer.Score]:
    """One Score per image (H, W, 3) in [0, 1]."""
    return [scorer.score(img, prompt.a, prompt.relation, prompt.b) for img in images]


def table(unguided: list[list[scorer.Score]], guided: list[list[scorer.Score]]) -> str:
    """VISOR table: unguided, guided, and the paired per-seed difference with its 95% CI."""
    u, g = scorer.visor(unguided), scorer.visor(guided)
    rows = [f"{'metric':<14}{'unguided':>10}{'guided':>10}{'diff':>9}   95% CI (paired over seeds)"]
    for metric in u:
        mean, lo, hi = scorer.paired_seed_interval(unguided, guided, metric) if metric in (
            "OA", "VISOR_uncond", "VISOR_cond") else (g[metric] - u[metric], float("nan"), float("nan"))
        ci = f"[{lo:+.1f}, {hi:+.1f}]" if lo == lo else ""
        rows.append(f"{metric:<14}{u[metric]:>10.1f}{g[metric]:>10.1f}{mean:>+9.1f}   {ci}")
    n = sum(len(r) for r in unguided)
    rows.append(f"({len(unguided)} prompts x {len(unguided[0])} seeds = {n} prompt-seed pairs per arm)")
    return "\n".join(rows)

