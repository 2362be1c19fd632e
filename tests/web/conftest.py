"""Fixtures for the editor-extension tests (tests/web/).

Reuses tests/nodes/conftest.py (loaded by location): ``harness``, ``comfy``, ``pack``, ``_model_cache``,
``model_files`` — REAL ComfyUI at ``COMFYUI_PATH`` and the cached random-weight models.

The browser tests (marked ``browser``) also need:
- Chromium: ``$ANYSTORY_CHROMIUM`` or /usr/bin/chromium (Debian packages chromium + chromium-driver;
  scripts/setup_env.sh installs them with apt when missing and it runs as root);
- Node.js and playwright-core in the repo's node_modules (``npm ci``; scripts/setup_env.sh does it).
Without them those tests are SKIPPED with a red banner at the end of the run, like the ComfyUI tests.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load_nodes_conftest():
    name = "anystory_nodes_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "nodes" / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


_N = _load_nodes_conftest()
H = _N.H
harness = _N.harness
comfy = _N.comfy
pack = _N.pack
_model_cache = _N._model_cache
model_files = _N.model_files

_COMFY_OK, _COMFY_WHY = H.comfy_available()


def chromium_path() -> str:
    return os.environ.get("ANYSTORY_CHROMIUM", "/usr/bin/chromium")


def browser_available() -> tuple[bool, str]:
    chrome = chromium_path()
    if not (os.path.isfile(chrome) and os.access(chrome, os.X_OK)):
        return False, (f"CHROMIUM NOT FOUND at {chrome} (apt-get install chromium chromium-driver, or set "
                       "ANYSTORY_CHROMIUM)")
    node = shutil.which("node")
    if node is None:
        return False, "NODE.JS NOT FOUND (node is needed to drive Chromium with playwright-core)"
    if not (REPO / "node_modules" / "playwright-core" / "package.json").is_file():
        return False, "playwright-core NOT INSTALLED in node_modules/ (run `npm ci` in the repo, or scripts/setup_env.sh)"
    try:
        v = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        major = int(v.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return False, f"node --version failed: {e}"
    if major < 18:
        return False, f"Node.js {v} is too old for playwright-core (needs 18+)"
    return True, f"Chromium at {chrome}, Node.js {v}"


_BROWSER_OK, _BROWSER_WHY = browser_available()
_SKIPPED = []


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives the ComfyUI editor in headless Chromium (tests/web)")


def _in_this_dir(item) -> bool:
    return _N.in_dir(item, HERE)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not _in_this_dir(item):
            continue
        if not _COMFY_OK:
            item.add_marker(pytest.mark.skip(reason=f"{_COMFY_WHY}: editor tests skipped"))
            _SKIPPED.append((item.nodeid, _COMFY_WHY))
        elif item.get_closest_marker("browser") and not _BROWSER_OK:
            item.add_marker(pytest.mark.skip(reason=f"{_BROWSER_WHY}: browser test skipped"))
            _SKIPPED.append((item.nodeid, _BROWSER_WHY))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _SKIPPED:
        return
    tr = terminalreporter
    reasons = sorted({why for _, why in _SKIPPED})
    tr.write_sep("!", "EDITOR (BROWSER) TESTS NOT RUN", red=True, bold=True)
    for why in reasons:
        tr.write_line(f"WARNING: {why}.", red=True, bold=True)
    tr.write_line(f"WARNING: {len(_SKIPPED)} test(s) under tests/web/ did NOT run: the web extension and the "
                  "shipped workflows in the real editor are UNTESTED in this run.", red=True, bold=True)
    tr.write_sep("!", "", red=True, bold=True)


# ------------------------------------------------------------------------------------------------
# a server for the editor
# ------------------------------------------------------------------------------------------------
EDITOR_SETTINGS = {
    "Comfy.TutorialCompleted": True,   # no template browser on the first start
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # full node detail in zoomed-out screenshots
}


@pytest.fixture(scope="session")
def web_base(_model_cache, tmp_path_factory):
    """A ComfyUI base directory for the editor tests: the random models linked under the PUBLIC files' names
    (scripts/make_models.py link_public_names: the templates load with no edit), an EMPTY input/ folder (the
    pack copies its example subject images there when the server loads it), editor settings that skip the
    first-start template browser."""
    base_cache, anys_cache, rel = _model_cache
    mm = H.load_make_models()
    files = {part: (base_cache / r if (base_cache / r).exists() else anys_cache / r) for part, r in rel.items()}
    d = tmp_path_factory.mktemp("comfy-web")
    mm.link_public_names(files, d / "models")
    for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "user" / "default" / "comfy.settings.json").write_text(json.dumps(EDITOR_SETTINGS, indent=1))
    return d


@pytest.fixture(scope="session")
def public_files(web_base):
    """{relative path under models/: target file name} of the stand-ins."""
    models = web_base / "models"
    return {p.relative_to(models).as_posix(): p.resolve().name for p in models.rglob("*") if p.is_symlink()}


@pytest.fixture(scope="session")
def browser_setup():
    """What tests/web/editor_check.mjs needs besides the server: the Chromium binary and editor settings."""
    return {"chromium": chromium_path(), "settings": dict(EDITOR_SETTINGS)}


@pytest.fixture(scope="session")
def web_server(web_base):
    with H.ComfyServer(base_dir=web_base) as srv:
        yield srv
