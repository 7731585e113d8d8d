"""The real ComfyUI host for tests: in-process (tier 2 and 3) and as an HTTP server (tier 3).

In-process follows what main.py does: CPU mode, `utils.extra_config` before `nodes`,
`init_extra_nodes` (which loads custom_nodes/, where host/setup.sh linked this pack and
the test kit), then `execution.validate_prompt` and `execution.PromptExecutor`, which runs
every prompt under torch.inference_mode() exactly as a user's server does.
"""
from __future__ import annotations

import asyncio
import inspect
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
from comfy_server import BASE, COMFY, Server, version  # noqa: E402,F401  (the HTTP tier uses host.Server)

_booted = False


def boot() -> None:
    """Import ComfyUI in this process (CPU) and load all node packs, once."""
    global _booted
    if _booted:
        return
    if not (COMFY / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI host at {COMFY}: run `make setup` (make test does it).")
    sys.path.insert(0, str(COMFY))
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy.cli_args import args
    args.cpu = True
    if BASE is not None:  # another ComfyUI tree: custom_nodes/, models, output of the harness's own
        args.base_directory = str(BASE)
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import utils.extra_config  # noqa: F401  (must precede `nodes`, see COMFYUI.md)
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    _booted = True


class _Messages:
    """What PromptExecutor needs of the server: a sink for its progress messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class Run:
    success: bool
    outputs: dict
    messages: list = field(default_factory=list)

    def error(self) -> str:
        for event, data in self.messages:
            if event == "execution_error":
                return f"{data.get('exception_type')}: {data.get('exception_message')}"
        return ""


class Session:
    """One PromptExecutor for several prompts, keeping its node cache between them as a
    running server does (a later prompt reuses the earlier prompt's loaded MODEL)."""

    def __init__(self):
        boot()
        import execution
        self.sink = _Messages()
        # "ram_inactive": read by newer executors (0.33) next to "ram"; older ones ignore it
        self.executor = execution.PromptExecutor(self.sink, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    def execute(self, prompt: dict) -> Run:
        import execution
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0] or valid[3]:  # an output with node errors is silently dropped: refuse it
            raise AssertionError(f"prompt rejected by validate_prompt: {valid[1]} {valid[3]}")
        self.sink.messages = []
        self.executor.execute(prompt, prompt_id, {"client_id": "tests"}, valid[2])
        outputs = self.executor.history_result.get("outputs", {}) if self.executor.success else {}
        return Run(self.executor.success, outputs, list(self.sink.messages))

    def cached(self, node_id: str):
        """The executor's cached output entry of a node of the last prompt (the caches'
        `get` is a coroutine on newer ComfyUI, a plain call on older)."""
        entry = self.executor.caches.outputs.get(node_id)
        return asyncio.run(entry) if inspect.isawaitable(entry) else entry

    def output(self, node_id: str, index: int = 0):
        """Output `index` (first batch entry) of a node of the last prompt, from the cache."""
        return self.cached(node_id).outputs[index][0]


def execute(prompt: dict) -> Run:
    """Validate and run an API-format prompt through the real executor (fresh caches)."""
    return Session().execute(prompt)


def saved_latents(run: Run, node: str):
    """The tensors a SaveLatent node wrote to disk in this run."""
    import folder_paths
    import safetensors.torch
    out = []
    for item in run.outputs[node]["latents"]:
        path = Path(folder_paths.get_output_directory()) / item["subfolder"] / item["filename"]
        out.append(safetensors.torch.load_file(str(path))["latent_tensor"])
    return out


def set_output_directory(path: Path) -> None:
    boot()
    import folder_paths
    folder_paths.set_output_directory(str(path))


def add_checkpoint_folder(path: Path) -> None:
    boot()
    import folder_paths
    folder_paths.add_model_folder_path("checkpoints", str(path))


def add_model_folder(kind: str, path: Path) -> None:
    """Another folder for a kind of model file ("diffusion_models", "text_encoders", ...)."""
    boot()
    import folder_paths
    folder_paths.add_model_folder_path(kind, str(path))
