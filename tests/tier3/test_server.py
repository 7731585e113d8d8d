"""Tier 3: the real HTTP server (`main.py --cpu` on loopback) with the pack installed."""
import pytest

import comfy_host

from graphs import txt2img

pytestmark = [pytest.mark.host, pytest.mark.server]


@pytest.fixture(scope="module")
def server(host, checkpoints, tmp_path_factory):
    s = host.Server(tmp_path_factory.mktemp("server"), checkpoints=checkpoints)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
    assert s.proc.returncode is not None  # stopped by its PID


def test_object_info_lists_every_node_of_the_pack(server):
    from infsplign.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    info = server.get("/object_info")
    assert NODE_CLASS_MAPPINGS, "the pack registers no node"
    for node_id, display in NODE_DISPLAY_NAME_MAPPINGS.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        assert info[node_id]["display_name"] == display
        assert info[node_id]["python_module"].startswith("custom_nodes.infsplign")
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert "infsplign_test_sd1.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_prompt_runs_and_writes_an_image(server):
    graph = txt2img("infsplign_test_sd1.safetensors")
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "infsplign_test"}}
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (saved,) = entry["outputs"]["save"]["images"]
    assert (server.output / saved["subfolder"] / saved["filename"]).stat().st_size > 1000
    assert '"cat" left of "dog"' in entry["outputs"]["parse"]["text"][0]


def test_node_error_leaves_the_server_running(server):
    entry = server.run(txt2img("infsplign_test_sd1.safetensors", text="a cat behind a dog"))
    assert entry["status"]["status_str"] == "error"
    assert any("depth relation" in str(m) for m in entry["status"]["messages"])
    assert server.get("/system_stats")["system"]["comfyui_version"] == comfy_host.version()  # the tree the server runs
