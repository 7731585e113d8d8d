"""The ComfyUI host, and a real HTTP server of it (main.py --cpu on loopback) with this pack.

Used by the tests (tiers 2 to 4), `bench/` and `make demo`. Only loopback addresses are used.

Which host: by default the development host that `make setup` builds (`.host/ComfyUI`, run
by `.venv/bin/python`, this pack linked into its custom_nodes/). `make test COMFYUI=...
PYTHON=...` (host/external.sh) sets the environment variables below instead: another
ComfyUI tree, the Python that runs it, and a base directory of the harness's own
(`--base-directory`: custom_nodes/ with this pack and the test kit, models, input, output,
user), so the tree itself is never written to.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("INFSPLIGN_COMFYUI") or ROOT / ".host" / "ComfyUI").resolve()
PYTHON = Path(os.environ.get("INFSPLIGN_PYTHON") or ROOT / ".venv" / "bin" / "python")
# ComfyUI's --base-directory for custom_nodes/, models, input, output and user data; None:
# the tree's own folders (the development host, where host/setup.sh linked the pack).
BASE = Path(os.environ["INFSPLIGN_COMFY_BASE"]).resolve() if os.environ.get("INFSPLIGN_COMFY_BASE") else None


def version() -> str:
    """The host's ComfyUI version, read from its comfyui_version.py (nothing is imported)."""
    text = (COMFY / "comfyui_version.py").read_text()
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return match.group(1) if match else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`main.py --cpu` on a loopback port, with this pack in custom_nodes/."""

    def __init__(self, workdir: Path, checkpoints: Path | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        self.output = workdir / "output"
        args = [str(PYTHON), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--output-directory", str(self.output), "--disable-auto-launch"]
        if BASE is not None:  # and the database with it, not in the tree's user/ folder
            args += ["--base-directory", str(BASE), "--database-url", f"sqlite:///{BASE / 'user' / 'comfyui.db'}"]
        if checkpoints is not None:
            cfg = workdir / "extra_model_paths.yaml"
            cfg.write_text(json.dumps({"infsplign_tests": {"base_path": str(checkpoints),
                                                           "checkpoints": "."}}))
            args += ["--extra-model-paths-config", str(cfg)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=COMFY, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """POST /prompt, poll /history until done; returns the history entry."""
        queued = self.post("/prompt", {"prompt": prompt, "client_id": "tests"})
        pid = queued["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{pid}")
            if pid in history and history[pid].get("status", {}).get("completed") is not None:
                if history[pid]["status"].get("status_str") in ("success", "error"):
                    return history[pid]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} not done after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()

