"""The web extension and the shipped workflows in the REAL ComfyUI editor (the comfyui-frontend-package
that ComfyUI serves), driven in headless Chromium by tests/web/editor_check.mjs (playwright-core):

- without the extension the editor starts and every workflow loads (the pack does not need it);
- with it, it registers and logs no errors, serves/uses the core palette, every workflow in workflows/
  loads with all node types known and no missing-node warning, subject colours follow the encode chain;
- the two-subject workflow queued with the Run button shows live routing maps on the Apply node (and
  on the Preview node) while it samples, then the Preview node's grid and the loader's info.

Screenshots go to test-artifacts/web/. ``ANYSTORY_WEB_SIZE`` / ``ANYSTORY_WEB_STEPS`` change the
render (default 64 px, 3 steps: quick on a CPU). The README screenshots (docs/screenshots/) were made
with

    ANYSTORY_WEB_SIZE=256 ANYSTORY_WEB_STEPS=6 ANYSTORY_SCREENSHOTS_TO=docs/screenshots \
        bash scripts/test.sh tests/web/test_editor.py

(``ANYSTORY_SCREENSHOTS_TO`` writes 256-colour copies of the chosen screenshots there, each < 300 KB).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "web"
SCRIPT = Path(__file__).with_name("editor_check.mjs")
EXTENSION = "anystory.editor"
WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
RUN = "anystory_two_subjects"
IDS = {"loader": 3, "encode": [12, 15], "apply": 30, "preview": 50, "sampler": 40}


def _palette(pack):
    import importlib
    return importlib.import_module(f"{pack.__name__}.anystory.preview")


def _build_workflows():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_workflows as W
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return W


def mapped_ui_workflow(name: str, files: dict, size: int, steps: int) -> dict:
    """workflows/<name>.json (UI format) with the public file names replaced by the test models' and a
    small size / few steps — what a user does in the loaders before pressing Run."""
    W = _build_workflows()
    wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    mapping = {W.CKPT: files["checkpoint"], W.CLIP_VISION: files["clip_vision"], W.ANYSTORY: files["anystory"],
               W.REFNET: files["refnet"], W.IPADAPTER: files["ipadapter"]}
    for node in wf["nodes"]:
        vals = node.get("widgets_values")
        if not isinstance(vals, list):
            continue
        node["widgets_values"] = [mapping.get(v, v) if isinstance(v, str) else v for v in vals]
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][0] = node["widgets_values"][1] = size
        if node["type"] == "KSampler":
            node["widgets_values"][2] = steps  # seed, control_after_generate, steps, …
    return wf


@pytest.fixture(scope="module")
def editor(web_server, model_files, browser_setup):
    """Runs editor_check.mjs once against the server; returns what it saw (JSON)."""
    size = int(os.environ.get("ANYSTORY_WEB_SIZE", "64"))
    steps = int(os.environ.get("ANYSTORY_WEB_STEPS", "3"))
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    cfg = {
        "url": web_server.url,
        "chromium": browser_setup["chromium"],
        "extension": EXTENSION,
        "artifacts": str(ARTIFACTS),
        "settings": browser_setup["settings"],
        "viewport": [1600, 900],
        "workflows": {n: json.loads((REPO / "workflows" / f"{n}.json").read_text()) for n in WORKFLOWS},
        "run": {"name": RUN, "graph": mapped_ui_workflow(RUN, model_files, size, steps), "ids": IDS,
                "steps": steps, "size": size, "timeout_s": 300,
                "focus": [IDS["apply"], IDS["preview"], *IDS["encode"]]},
    }
    cfg_path = ARTIFACTS / "config.json"
    res_path = ARTIFACTS / "result.json"
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.monotonic()
    proc = subprocess.run(["node", str(SCRIPT), str(cfg_path), str(res_path)], cwd=str(REPO), capture_output=True,
                          text=True, timeout=480)
    (ARTIFACTS / "node.log").write_text(proc.stdout + proc.stderr)
    assert res_path.is_file(), f"editor_check.mjs wrote no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(res_path.read_text())
    result["_wall_s"] = time.monotonic() - t0
    result["_cfg"] = cfg
    (ARTIFACTS / "comfyui.log").write_text(web_server.log_text())
    dest = os.environ.get("ANYSTORY_SCREENSHOTS_TO")
    if dest and not result.get("fatal"):
        export_screenshots(REPO / dest)
    return result


README_SHOTS = {  # test-artifacts/web/<key>.png → docs/screenshots/<value>.png
    f"editor_{RUN}": "editor_two_subjects",
    "live_first_map": "routing_live",
    "after_run_routing": "routing_after_run",
}


def export_screenshots(dest: Path, max_bytes: int = 300_000) -> list[Path]:
    """256-colour copies of the README screenshots (small PNGs for the repository)."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src, name in README_SHOTS.items():
        img = Image.open(ARTIFACTS / f"{src}.png").convert("RGB")
        scale = 1.0
        while True:
            im = img if scale == 1.0 else img.resize((round(img.width * scale), round(img.height * scale)),
                                                     Image.LANCZOS)
            q = im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            path = dest / f"{name}.png"
            q.save(path, optimize=True)
            if path.stat().st_size < max_bytes or scale < 0.3:
                break
            scale *= 0.85
        out.append(path)
    return out


def _phase(editor, name):
    assert not editor.get("fatal"), f"the browser run failed: {editor['fatal']}\n(see {ARTIFACTS}/)"
    assert name in editor["phases"], f"phase {name!r} did not run; phases: {list(editor['phases'])}"
    return editor["phases"][name]


def _ours(entry: dict) -> bool:
    blob = " ".join(str(entry.get(k, "")) for k in ("text", "url", "message", "stack")).lower()
    return "anystory" in blob and "anystory.test.probe" not in blob


# ------------------------------------------------------------------------------------------------
def test_palette_route_serves_the_core_palette(web_server, pack):
    """GET /anystory/palette (nodes/live.py) is anystory/preview.py's palette: one source of truth."""
    with urllib.request.urlopen(web_server.url + "/anystory/palette", timeout=30) as r:
        body = json.loads(r.read())
    core = _palette(pack)
    assert body["subjects"] == core.PALETTE_HEX
    assert body["background"] == core.BACKGROUND_HEX
    assert body["max_subjects"] == core.MAX_SUBJECTS
    assert web_server.pack_import_errors() == []


@pytest.mark.browser
def test_editor_works_without_the_extension(editor):
    """Extension disabled in the editor: no AnyStory global, every shipped workflow still loads with all
    node types known (the nodes come from the server, not from web/)."""
    ph = _phase(editor, "disabled")
    assert ph["anystoryGlobal"] == "undefined", "the disabled extension still ran its setup"
    assert set(ph["workflows"]) == set(WORKFLOWS)
    for name, r in ph["workflows"].items():
        assert r["missing"] == [] and r["unknown"] == [], (name, r)
        assert r["count"] > 0, name


@pytest.mark.browser
def test_extension_registers_without_console_errors(editor, pack):
    ph = _phase(editor, "enabled")
    assert ph["registered"], f"extension {EXTENSION} not registered"
    files = [f for f in editor["extensionFiles"] if f["phase"] == "enabled"]
    assert any(f["url"].endswith("/extensions/comfyui-anystory/anystory.js") and f["status"] == 200 for f in files), files
    assert ph["palette"] == _palette(pack).PALETTE_HEX, "the editor did not load GET /anystory/palette"
    ours = [e for e in editor["console"] if e["type"] == "error" and _ours(e)]
    ours += [e for e in editor["pageErrors"] if _ours(e)]
    assert ours == [], f"console errors from the AnyStory extension: {json.dumps(ours, indent=1)[:4000]}"
    warnings = [e for e in editor["console"] if e["type"] == "warning" and "[AnyStory]" in e["text"]]
    assert warnings == [], warnings


@pytest.mark.browser
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_without_missing_nodes(editor, name):
    r = _phase(editor, "enabled")["workflows"][name]
    graph = editor["_cfg"]["workflows"][name]
    assert r["missing"] == [], f"{name}: missing node types {r['missing']}"
    assert r["unknown"] == [], f"{name}: node types unknown to the editor {r['unknown']}"
    assert r["dialogs"] == [], f"{name}: a dialog opened on load: {r['dialogs']}"
    assert r["count"] == len(graph["nodes"])
    assert {n["type"] for n in r["nodes"]} == {n["type"] for n in graph["nodes"]}
    saved = {n["id"]: n["size"] for n in graph["nodes"]}
    for n in r["nodes"]:  # the extension leaves the saved layout alone on load
        if n["type"].startswith("AnyStory"):
            assert [round(v) for v in n["size"]] == saved[n["id"]], (n, saved[n["id"]])
    shot = ARTIFACTS / f"editor_{name}.png"
    assert shot.is_file() and shot.stat().st_size > 10_000


@pytest.mark.browser
def test_subject_colours_follow_the_encode_chain(editor, pack):
    """Subject i = position in the chain of AnyStorySubjectEncode nodes (walking `subjects` inputs),
    coloured PALETTE_HEX[i] — the same colour the preview grid uses; badges and node colours set."""
    pal = _palette(pack).PALETTE_HEX
    r = _phase(editor, "enabled")["workflows"][RUN]
    a, b = (str(i) for i in IDS["encode"])
    assert r["subjects"][a] == {"index": 0, "color": pal[0], "chain": [IDS["encode"][0]]}
    assert r["subjects"][b] == {"index": 1, "color": pal[1], "chain": IDS["encode"]}
    assert r["applyPreviews"] == {str(IDS["apply"]): [IDS["preview"]]}
    assert any("1 · the fox" in t for t in r["badges"][a]), r["badges"]
    assert any("2 · the robot" in t for t in r["badges"][b]), r["badges"]
    assert all(c for c in r["colors"].values()), r["colors"]
    story = _phase(editor, "enabled")["workflows"]["anystory_story_4_images"]["subjects"]
    assert sorted(v["index"] for v in story.values()) == list(range(len(story)))


@pytest.mark.browser
def test_live_routing_preview_updates_while_sampling(editor, pack):
    """Queued with the Run button: one 'anystory.routing' message per step reaches the page before the
    run ends, each drawn on the Apply node; the Preview node shows the live maps until its grid comes."""
    run = _phase(editor, "run")
    steps = editor["_cfg"]["run"]["steps"]
    assert run["queuedWith"] == "Run button"
    evs = run["events"]
    routing = [e for e in evs if e["ev"] == "anystory.routing"]
    end = next(i for i, e in enumerate(evs) if e["ev"] in ("execution_success", "execution_error"))
    assert evs[end]["ev"] == "execution_success", f"the run failed; see {ARTIFACTS}/comfyui.log"
    assert len(routing) >= 2, f"expected live maps while sampling, got {routing}"
    assert [e["step"] for e in routing] == list(range(steps)), routing
    assert all(e["steps"] == steps and e["node"] == str(IDS["apply"]) for e in routing)
    assert [e["final"] for e in routing] == [False] * (steps - 1) + [True]
    assert all(0 < e["bytes"] < 40_000 for e in routing)  # small data URLs
    first_end = evs.index(next(e for e in evs if e["ev"] == "executed" and e["node"] == str(IDS["preview"])))
    assert sum(1 for e in evs[:first_end] if e["ev"] == "anystory.routing") >= 2, "maps came only after the run"
    st = run["stats"]
    assert st["events"] >= 2 and st["images"] >= 2 and st["errors"] == 0, st
    assert st["byNode"][str(IDS["apply"])] >= 2
    assert st["previewUpdates"] >= 1, "the Preview node never showed a live map"
    live = run["applyLive"]
    assert live and live["img"] > 0 and live["final"] and live["step"] == steps - 1
    assert live["labels"] == ["the fox", "the robot"]
    assert live["colors"] == _palette(pack).PALETTE_HEX[:2]
    assert any(f"{steps}/{steps}" in t for t in run["applyBadge"]), run["applyBadge"]
    saved = next(n for n in editor["_cfg"]["run"]["graph"]["nodes"] if n["id"] == IDS["apply"])["size"]
    assert run["applySize"][1] > saved[1], "the Apply node did not make room for the routing panel"
    assert (ARTIFACTS / "live_first_map.png").is_file()


@pytest.mark.browser
def test_preview_node_ends_with_its_grid(editor):
    run = _phase(editor, "run")
    out = run["previewOutput"]
    assert out and out.get("images") and out["images"][0]["filename"].startswith("anystory_routing")
    imgs = run["previewImgs"]
    assert imgs and "anystory_routing" in imgs[0]["src"] and imgs[0]["w"] > 100, imgs
    shot = ARTIFACTS / "after_run_routing.png"
    assert shot.is_file() and shot.stat().st_size > 10_000


@pytest.mark.browser
def test_loader_info_and_subject_results_shown_after_the_run(editor, pack):
    run = _phase(editor, "run")
    assert run["loaderInfo"] and "native AnyStory" in run["loaderInfo"]
    saved = next(n for n in editor["_cfg"]["run"]["graph"]["nodes"] if n["id"] == IDS["loader"])["size"]
    assert run["loaderSize"][1] > saved[1] + 20, "the loader did not make room for its info text"
    pal = _palette(pack).PALETTE_HEX
    subs = {s["id"]: s["subject"] for s in run["encodeSubjects"]}
    assert subs[IDS["encode"][0]]["index"] == 0 and subs[IDS["encode"][0]]["color"] == pal[0]
    assert subs[IDS["encode"][1]]["index"] == 1 and subs[IDS["encode"][1]]["color"] == pal[1]
