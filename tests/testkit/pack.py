"""Import the pack's modules as `infsplign.<sub>` without running its root __init__.

The root __init__ registers nodes and needs ComfyUI; guidance/ must import without it.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAME = "infsplign"


def module(sub: str):
    if NAME not in sys.modules:
        pkg = types.ModuleType(NAME)
        pkg.__path__ = [str(ROOT)]
        sys.modules[NAME] = pkg
    return importlib.import_module(f"{NAME}.{sub}")
