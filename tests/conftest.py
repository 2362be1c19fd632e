"""Test set-up shared by every test.

The repo root is deliberately NOT put on sys.path: the pack has a ``nodes/`` folder and ComfyUI has a
top-level ``nodes`` module, so the root on sys.path would shadow ComfyUI's. The core package is
registered under its own name instead, so ``import anystory`` works in core tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _register(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_register("anystory", ROOT / "anystory")
