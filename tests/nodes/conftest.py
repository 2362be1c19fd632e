"""Fixtures for tests that need REAL ComfyUI (everything under tests/nodes/).

ComfyUI is found through ``COMFYUI_PATH`` (default /opt/ComfyUI). Without it every test here is
skipped with a loud reason, and the terminal summary ends with a red banner saying so.

Fixtures:
- ``harness`` (session): the tests/comfy_harness.py module (also importable as ``comfy_harness``);
- ``comfy`` (session): ComfyUI imported in-process for CPU (``comfy_harness.ComfyModules``);
- ``pack`` (session): this repo imported as a ComfyUI custom node package (``comfyui_anystory``);
- ``tiny_model``: a fresh tiny SDXL-architecture ModelPatcher (seed 0, fp32);
- ``model_files`` (session): ``{part: file name}`` of the random models the server sees
  (checkpoint, clip_vision, ipadapter, anystory, refnet, and the FLUX set flux_unet, flux_vae, clip_l,
  siglip, redux, anystory_flux; names relative to their models/ folder);
- ``server_models_dir`` (session): a temp ComfyUI base directory whose ``models/`` holds those files;
- ``comfy_server`` (session): a ``comfy_harness.ComfyServer`` running over that base directory.

Don't import ``comfy``/``nodes``/``folder_paths`` at module level in test files: use these fixtures
(collection would fail where ComfyUI is absent).

The random model files are cached between sessions (they take ~1 min to make): the checkpoint and
CLIP vision files under ``$ANYSTORY_TEST_CACHE`` (default ~/.cache/comfyui-anystory/test-models)
keyed by a hash of scripts/make_models.py + the ComfyUI version; the AnyStory files keyed by that and
the core package's sources. Cache folders of other versions unused for 30 min are removed. The base directory's model folders are
real folders of per-file symlinks, so a test may add files there without touching the cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load_harness():
    name = "comfy_harness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "comfy_harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


H = _load_harness()
_AVAILABLE, _WHY = H.comfy_available()
_SKIP_REASON = (f"{_WHY}: set COMFYUI_PATH to a ComfyUI checkout (docs/DEVELOPMENT.md says how) — ComfyUI "
                "tests skipped" if not _AVAILABLE else "")
_SKIPPED_HERE = []


def in_dir(item, folder: Path) -> bool:
    """Whether a collected test item lives below ``folder`` (conftest hooks see every item of the run)."""
    try:
        return Path(str(item.path)).resolve().is_relative_to(folder)
    except (AttributeError, ValueError):
        return False


def _in_this_dir(item) -> bool:
    return in_dir(item, HERE)


def pytest_collection_modifyitems(config, items):
    if _AVAILABLE:
        return
    mark = pytest.mark.skip(reason=_SKIP_REASON)
    for item in items:
        if _in_this_dir(item):
            item.add_marker(mark)
            _SKIPPED_HERE.append(item.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _AVAILABLE:
        return
    n = len(_SKIPPED_HERE)
    tr = terminalreporter
    tr.write_sep("!", "REAL ComfyUI NOT FOUND", red=True, bold=True)
    tr.write_line(f"WARNING: {_SKIP_REASON}.", red=True, bold=True)
    tr.write_line(f"WARNING: {n} test(s) under tests/nodes/ did NOT run (ComfyUI {os.environ.get('COMFYUI_PATH', '/opt/ComfyUI')} "
                  "missing). The nodes are UNTESTED in this run.", red=True, bold=True)
    tr.write_sep("!", "", red=True, bold=True)


# ------------------------------------------------------------------------------------------------
# in-process fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def harness():
    return H


@pytest.fixture(scope="session")
def comfy():
    if not _AVAILABLE:
        pytest.skip(_SKIP_REASON)
    return H.import_comfy()


@pytest.fixture(scope="session")
def pack(comfy):
    return H.load_pack()


@pytest.fixture
def tiny_model(comfy):
    return H.tiny_sdxl(seed=0)


# ------------------------------------------------------------------------------------------------
# models on disk + server
# ------------------------------------------------------------------------------------------------
def _digest(paths, extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(REPO)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _comfy_version() -> str:
    vf = H.comfyui_path() / "comfyui_version.py"
    return vf.read_text() if vf.is_file() else "?"


def _prune(root: Path, prefix: str, keep: Path, min_age_s: float = 1800.0) -> None:
    """Remove cache folders of other versions not used for ``min_age_s`` (another pytest session running
    other sources at the same time may still use a recent one)."""
    now = time.time()
    for d in root.glob(prefix + "*"):
        if d.is_dir() and d.resolve() != keep.resolve() and now - d.stat().st_mtime > min_age_s:
            shutil.rmtree(d, ignore_errors=True)


def _link_files(src_models: Path, dst_models: Path, relpaths) -> None:
    for rel in relpaths:
        src, dst = src_models / rel, dst_models / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)


@pytest.fixture(scope="session")
def _model_cache(comfy):
    """(base cache models dir, anystory cache models dir, {part: relpath}) — made on first use."""
    mm = H.load_make_models()
    root = Path(os.environ.get("ANYSTORY_TEST_CACHE", "~/.cache/comfyui-anystory/test-models")).expanduser()
    script = REPO / "scripts" / "make_models.py"
    base_key = _digest([script], _comfy_version())
    core_key = _digest([script] + list((REPO / "anystory").glob("*.py")), _comfy_version())
    base = root / f"base-{base_key}"
    anys = root / f"anystory-{core_key}"
    root.mkdir(parents=True, exist_ok=True)
    _prune(root, "base-", base)
    _prune(root, "anystory-", anys)
    logs = []
    base_parts = ("checkpoint", "clip_vision") + tuple(p for p in mm.FLUX_PARTS if p != "anystory_flux")
    files = mm.make_models(base, parts=base_parts, log=logs.append)
    files.update(mm.make_models(anys, parts=("ipadapter", "anystory", "refnet", "anystory_flux"),
                                unet_checkpoint=files["checkpoint"], log=logs.append))
    for d in (base, anys):
        os.utime(d)  # mark as in use (see _prune)
    rel = {k: Path(v).relative_to(base if k in base_parts else anys) for k, v in files.items()}
    return base, anys, rel


@pytest.fixture(scope="session")
def model_files(_model_cache):
    """{part: file name as ComfyUI lists it}, e.g. {"checkpoint": "anystory-demo-sdxl-small.safetensors"}."""
    _, _, rel = _model_cache
    return {k: Path(*v.parts[1:]).as_posix() for k, v in rel.items()}


@pytest.fixture(scope="session")
def server_models_dir(_model_cache, tmp_path_factory):
    """A fresh ComfyUI base directory (models/, input/, output/, custom_nodes/, user/, temp/) whose
    models/ has the small random models (per-file symlinks into the cache)."""
    base_cache, anys_cache, rel = _model_cache
    d = tmp_path_factory.mktemp("comfy-base")
    models = d / "models"
    in_base = [v for k, v in rel.items() if (base_cache / v).exists()]
    _link_files(base_cache, models, in_base)
    _link_files(anys_cache, models, [v for v in rel.values() if v not in in_base])
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (d / sub).mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def comfy_server(server_models_dir):
    with H.ComfyServer(base_dir=server_models_dir) as srv:
        yield srv
