"""Test tiers: 1 = pure math/text (no ComfyUI import), 2 = glue against the real `comfy`
package, 3 = whole workflows through the real executor and HTTP server.

Tier 1 imports the pack's modules as `infsplign.guidance...` (see testkit/pack.py); tiers
2 and 3 boot the host in-process through the `host` fixture.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# One CPU thread per torch op unless the caller says otherwise (before torch is imported;
# the server and benchmark subprocesses inherit it). The test models are narrow, so a
# second thread gains little, and on a machine whose other cores are busy (a training job)
# OpenMP threads that wait for a descheduled sibling made runs 30-90x slower here.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# testkit/pack.py by path: importing the testkit package itself would import ComfyUI.
_spec = importlib.util.spec_from_file_location("infsplign_packimport", TESTS / "testkit" / "pack.py")
_packimport = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_packimport)
_packimport.module("guidance")


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The real ComfyUI, booted in this process with every node pack loaded; files that
    executed prompts write go to a temporary folder, not the host's output/."""
    import comfy_host
    comfy_host.boot()
    comfy_host.set_output_directory(tmp_path_factory.mktemp("comfy_output"))
    return comfy_host


@pytest.fixture(scope="session")
def checkpoints(host, tmp_path_factory):
    """A folder of test checkpoints (.safetensors), known to ComfyUI's folder_paths."""
    from testkit import models
    folder = tmp_path_factory.mktemp("checkpoints")
    for topology in models.TOPOLOGIES:
        models.save_checkpoint(str(folder / f"infsplign_test_{topology}.safetensors"), topology)
    host.add_checkpoint_folder(folder)
    return folder


@pytest.fixture(scope="session")
def mmdit_files(host, tmp_path_factory):
    """Test MMDiT model files known to ComfyUI's folder_paths: a checkpoint per topology
    (infsplign_test_<topology>.safetensors, for CheckpointLoaderSimple) and each diffusion
    model alone (infsplign_test_<topology>_dm.safetensors, for UNETLoader)."""
    from testkit import mmdit_models
    checkpoints = tmp_path_factory.mktemp("mmdit_checkpoints")
    diffusion = tmp_path_factory.mktemp("mmdit_diffusion_models")
    for topology in mmdit_models.TOPOLOGIES:
        mmdit_models.save_checkpoint(str(checkpoints / f"infsplign_test_{topology}.safetensors"), topology)
        mmdit_models.save_diffusion_model(str(diffusion / f"infsplign_test_{topology}_dm.safetensors"), topology)
    host.add_checkpoint_folder(checkpoints)
    host.add_model_folder("diffusion_models", diffusion)
    return {"checkpoints": checkpoints, "diffusion_models": diffusion}
