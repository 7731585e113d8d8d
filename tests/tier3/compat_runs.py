"""What the tier-3 workflow tests share (test_compat.py, test_compat_conditioning.py, and
test_memory, test_reference_latents, test_layout_boxes, test_refine): one executor session
per module whose graphs run once each (Runner, the `run` fixture), the LoRA and ControlNet
files for the SD1.x test model and the graph edits that add them, and the checks every
compatibility case makes."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import pytest
import torch

from graphs import Collect, cond_consumer, workflow

SD1 = "infsplign_test_sd1.safetensors"
LORA = "infsplign_test_sd1_lora.safetensors"
CONTROLNET = "infsplign_test_sd1_controlnet.safetensors"
PATHS = ["ksampler", "custom"]
STEPS = 3


@dataclass
class Result:
    reports: list
    latent: torch.Tensor
    warnings: list[str] = field(default_factory=list)


class Runner:
    """Executes graphs in one executor session (the checkpoint loads once, as on a server)
    and remembers each graph's result."""

    def __init__(self, host):
        self.host, self.session, self.cache = host, host.Session(), {}

    def __call__(self, graph: dict) -> Result:
        key = json.dumps(graph, sort_keys=True)
        if key not in self.cache:
            logger, collect = logging.getLogger("infsplign"), Collect()
            level = logger.level
            logger.addHandler(collect)
            logger.setLevel(logging.INFO)
            try:
                run = self.session.execute(graph)
            finally:
                logger.removeHandler(collect)
                logger.setLevel(level)
            assert run.success, run.error()
            self.cache[key] = Result(
                [r.infsplign for r in collect.records if hasattr(r, "infsplign")],
                self.host.saved_latents(run, "save_latent")[0],
                [r.getMessage() for r in collect.records if r.levelno >= logging.WARNING])
        return self.cache[key]


@pytest.fixture(scope="module")
def model_files(host, tmp_path_factory):
    """A LoRA and a ControlNet generated for the SD1.x test model, in folders that ComfyUI's
    folder_paths knows, so LoraLoader and ControlNetLoader list and load them."""
    import folder_paths
    from testkit import files
    loras, controlnets = tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("controlnet")
    files.save_lora(str(loras / LORA), "sd1")
    files.save_controlnet(str(controlnets / CONTROLNET), "sd1")
    folder_paths.add_model_folder_path("loras", str(loras))
    folder_paths.add_model_folder_path("controlnet", str(controlnets))
    return loras, controlnets


@pytest.fixture(scope="module")
def run(host, checkpoints, model_files):
    return Runner(host)


def assert_guided(res: Result, steps: int | None = STEPS):
    assert torch.isfinite(res.latent).all()
    assert res.reports, "no guided step was logged"
    if steps is not None:
        assert len(res.reports) == steps
    assert all(r.applied and r.grad_norm > 0 and not r.skipped for r in res.reports), res.reports
    assert all(r.maps_dtype == "float32" for r in res.reports)


def differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """a and b differ by more than rounding: max |a - b| > rel * max |b|."""
    return bool((a - b).abs().max() > rel * b.abs().max())


def base(run, path, **kw) -> Result:
    return run(workflow(SD1, path, steps=STEPS, **kw))


def positive(g: dict, node_id: str, node: dict) -> dict:
    """Feed `node` (built on the positive prompt "pos") to the sampler / guider as positive."""
    g[node_id] = node
    g[cond_consumer(g)]["inputs"]["positive"] = [node_id, 0]
    return g


def combine(g: dict, a, b, node_id: str = "combine") -> dict:
    return positive(g, node_id, {"class_type": "ConditioningCombine",
                                 "inputs": {"conditioning_1": list(a), "conditioning_2": list(b)}})


def with_lora(g: dict, strength: float = 1.0) -> dict:
    g["lora"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": LORA,
        "strength_model": strength, "strength_clip": strength}}
    for node in g.values():
        inputs = node["inputs"]
        if inputs.get("model") == ["ckpt", 0] and node["class_type"] != "BasicScheduler" and node is not g["lora"]:
            inputs["model"] = ["lora", 0]
        if inputs.get("clip") == ["ckpt", 1] and node is not g["lora"]:
            inputs["clip"] = ["lora", 1]
    return g


def with_controlnet(g: dict, color: int = 0xFFFFFF, strength: float = 1.0) -> dict:
    g["cn_load"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    g["cn_hint"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}}
    consumer = cond_consumer(g)
    g["cn_apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": g[consumer]["inputs"]["positive"], "negative": g[consumer]["inputs"]["negative"],
        "control_net": ["cn_load", 0], "image": ["cn_hint", 0], "strength": strength,
        "start_percent": 0.0, "end_percent": 1.0}}
    g[consumer]["inputs"]["positive"] = ["cn_apply", 0]
    g[consumer]["inputs"]["negative"] = ["cn_apply", 1]
    return g
