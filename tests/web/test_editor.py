"""The web extension and the shipped workflows in the REAL ComfyUI editor (the comfyui-frontend-package
that ComfyUI serves), driven in headless Chromium by tests/web/editor_check.mjs (playwright-core):

- without the extension the editor starts and every template loads (the pack does not need it);
- with it, it registers and logs no errors, serves/uses the core palette, every template in
  example_workflows/ loads with all node types known and no missing-node warning, subject colours follow
  the encode chain;
- templates: the server lists the pack's templates with a .jpg thumbnail each; each one, as shipped, queued
  with the Run button passes ComfyUI's validation against random-weight stand-ins with the public files'
  names (scripts/make_models.py PUBLIC_NAMES) and the example subject images the pack copied into input/
  itself; in the editor no node box overlaps another (title bar and badge included), no widget text or title
  is cut, no node is smaller than its content, each node wears at most one badge;
- the two-subject template queued with the Run button shows live routing maps on the Apply node (and
  on the Preview node) while it samples, then the Preview node's grid, drawn at a readable scale, and the
  loader's info; still no overlaps after the nodes grew.

Screenshots go to test-artifacts/web/. ``ANYSTORY_WEB_SIZE`` / ``ANYSTORY_WEB_STEPS`` change the
render (default 64 px, 3 steps: quick on a CPU). The README screenshots (docs/screenshots/) and the
templates' thumbnails (example_workflows/<name>.jpg) are made with

    ANYSTORY_WEB_SIZE=128 ANYSTORY_WEB_STEPS=4 ANYSTORY_SCREENSHOTS_TO=docs/screenshots \
        bash scripts/test.sh tests/web/test_editor.py

(``ANYSTORY_SCREENSHOTS_TO`` writes 256-colour copies of the chosen screenshots there, each < 300 KB, and
the thumbnails next to the templates).
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
from comfy_harness import PACK_DIR_NAME

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "web"
SCRIPT = Path(__file__).with_name("editor_check.mjs")
EXTENSION = "anystory.editor"
TEMPLATE_DIR = REPO / "example_workflows"
WORKFLOWS = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))
RUN = "02_anystory_sdxl_two_subjects"
IDS = {"loader": 3, "encode": [12, 15], "apply": 30, "preview": 50, "sampler": 40}
GRID_CELL = 48  # the templates' cell_size
# the editor fixture runs every phase once (templates queued, a render): minutes on a busy CPU, more than the
# default per-test limit (pyproject.toml) allows the first test that uses it
pytestmark = pytest.mark.timeout(2700)


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


def run_ui_workflow(name: str, size: int, steps: int) -> dict:
    """example_workflows/<name>.json as shipped (the stand-ins have the public names), with a small size and
    few steps for a CPU, and the Routing Preview showing every layer (a tall grid, like a full SDXL run's)."""
    wf = json.loads((TEMPLATE_DIR / f"{name}.json").read_text())
    for node in wf["nodes"]:
        vals = node.get("widgets_values")
        if node["type"] == "EmptyLatentImage":
            vals[0] = vals[1] = size
        if node["type"] == "KSampler":
            vals[2] = steps  # seed, control_after_generate, steps, …
        if node["type"] == "AnyStoryRoutingPreview":
            vals[0] = "all"  # layers
    return wf


@pytest.fixture(scope="module")
def editor(web_server, public_files, browser_setup):
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
        "workflows": {n: json.loads((TEMPLATE_DIR / f"{n}.json").read_text()) for n in WORKFLOWS},
        "templates": {"module": PACK_DIR_NAME, "names": WORKFLOWS, "timeout_s": 180},
        "run": {"name": RUN, "graph": run_ui_workflow(RUN, size, steps), "ids": IDS,
                "steps": steps, "size": size, "timeout_s": 900,
                "focus": [IDS["apply"], IDS["preview"], *IDS["encode"]]},
    }
    cfg_path = ARTIFACTS / "config.json"
    res_path = ARTIFACTS / "result.json"
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.monotonic()
    proc = subprocess.run(["node", str(SCRIPT), str(cfg_path), str(res_path)], cwd=str(REPO), capture_output=True,
                          text=True, timeout=2400)
    (ARTIFACTS / "node.log").write_text(proc.stdout + proc.stderr)
    assert res_path.is_file(), f"editor_check.mjs wrote no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(res_path.read_text())
    result["_wall_s"] = time.monotonic() - t0
    result["_cfg"] = cfg
    (ARTIFACTS / "comfyui.log").write_text(web_server.log_text())
    dest = os.environ.get("ANYSTORY_SCREENSHOTS_TO")
    if dest and not result.get("fatal"):
        export_screenshots(REPO / dest)
        export_thumbnails()
    return result


README_SHOTS = {  # test-artifacts/web/<key>.png → docs/screenshots/<value>.png
    f"editor_{RUN}": "editor_two_subjects",
    "live_first_map": "routing_live",
    "after_run_routing": "routing_after_run",
    "after_run_editor": "after_run_two_subjects",
}


def export_thumbnails(size=(480, 270), max_bytes: int = 60_000) -> list[Path]:
    """example_workflows/<name>.jpg: each template as the editor shows it after loading (fit to view)."""
    from PIL import Image

    out = []
    for name in WORKFLOWS:
        img = Image.open(ARTIFACTS / f"template_{name}.png").convert("RGB")
        img.thumbnail((size[0] * 2, size[1] * 2), Image.LANCZOS)
        canvas = Image.new("RGB", (size[0] * 2, size[1] * 2), (32, 32, 32))
        canvas.paste(img, ((canvas.width - img.width) // 2, (canvas.height - img.height) // 2))
        thumb = canvas.resize(size, Image.LANCZOS)
        path = TEMPLATE_DIR / f"{name}.jpg"
        quality = 85
        while True:
            thumb.save(path, "JPEG", quality=quality, optimize=True)
            if path.stat().st_size < max_bytes or quality < 40:
                break
            quality -= 10
        out.append(path)
    return out


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
    story = _phase(editor, "enabled")["workflows"]["03_anystory_sdxl_story_4_images"]["subjects"]
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
    assert run["applySize"][1] >= saved[1], "the Apply node shrank"
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
    assert run["loaderInfo"] and "public IP-Adapter Plus" in run["loaderInfo"]
    saved = next(n for n in editor["_cfg"]["run"]["graph"]["nodes"] if n["id"] == IDS["loader"])["size"]
    assert run["loaderSize"][1] > saved[1] + 20, "the loader did not make room for its info text"
    pal = _palette(pack).PALETTE_HEX
    subs = {s["id"]: s["subject"] for s in run["encodeSubjects"]}
    assert subs[IDS["encode"][0]]["index"] == 0 and subs[IDS["encode"][0]]["color"] == pal[0]
    assert subs[IDS["encode"][1]]["index"] == 1 and subs[IDS["encode"][1]]["color"] == pal[1]


# ------------------------------------------------------------------------------------------------
# templates (issue 18: the first hour of a user)
# ------------------------------------------------------------------------------------------------
@pytest.mark.browser
def test_templates_are_served_with_thumbnails(editor):
    """GET /api/workflow_templates lists every template of example_workflows/ under the pack's folder name, in
    their numbered order (the ones that run on public files first), and the template browser's URLs give the
    graph and its .jpg thumbnail."""
    ph = _phase(editor, "templates")
    assert ph["list"].get(PACK_DIR_NAME) == WORKFLOWS, ph["list"]
    for name, item in ph["items"].items():
        assert item["jsonStatus"] == 200, (name, item)
        assert item["thumbStatus"] == 200 and item["thumbType"] == "image/jpeg", (name, item)
        assert item["thumbBytes"] > 2000, (name, item)


@pytest.mark.browser
@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_runs_from_the_run_button_without_validation_errors(editor, web_base, name):
    """As shipped (no edit): the editor's Run button queues it and ComfyUI's validation accepts it — every
    file name exists (random stand-ins with the public names) and the example subject images are in input/,
    put there by the pack itself when the server loaded it (the test base directory had none)."""
    item = _phase(editor, "templates")["items"][name]
    q = item["queue"]
    assert q["ok"], f"{name}: the prompt was refused: {q.get('error')} {json.dumps(q.get('nodeErrors'))[:3000]}"
    assert q["nodeErrors"] == {} and not q["lastNodeErrors"], q
    assert q["queuedWith"] == "Run button"
    assert q.get("started") and not q.get("stuck"), q
    assert item["load"]["missing"] == [] and item["load"]["dialogs"] == []
    for image in ("anystory_subject_fox.png", "anystory_subject_robot.png"):
        assert (web_base / "input" / image).is_file(), f"the pack did not copy {image} into input/"


@pytest.mark.browser
@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_layout_in_the_editor(editor, name):
    """In the real editor: no two node boxes overlap (title bar and badge included), every widget's label and
    value and every title fit the node's width, no node is smaller than its content, one badge at most."""
    lay = _phase(editor, "templates")["items"][name]["layout"]
    saved = {n["id"]: n["size"] for n in editor["_cfg"]["workflows"][name]["nodes"]}
    assert lay["overlaps"] == [], lay["overlaps"]
    for n in lay["nodes"]:
        assert n["clipped"] == [], (n["type"], n["clipped"])
        fits = saved[n["id"]][0] >= n["min"][0] - 1 and saved[n["id"]][1] >= n["min"][1] - 1
        assert fits, (n["type"], "saved", saved[n["id"]], "content needs", n["min"])
        assert n["badges"] <= 1, (n["type"], n["badges"])
        if n["type"].startswith("AnyStory"):
            assert n["badgeEntries"] == 1, n  # the editor's badge and ours merged into one
            assert n["badges"] == 1, n


@pytest.mark.browser
def test_routing_grid_is_readable_in_its_node(editor):
    """The Routing Preview's grid (every layer: a tall grid) is drawn at full scale in its node — each
    48 px map cell at least 40 px on the canvas — and the grown nodes still overlap nothing."""
    run = _phase(editor, "run")
    g = run["grid"]
    assert g and g["h"] > 300, g  # a grid of several layers, taller than the node was saved
    assert g["scale"] >= 0.99 or (g["w"] > 560 or g["h"] > 720) and g["scale"] >= 0.5, g
    assert GRID_CELL * g["scale"] >= 40, g
    saved = next(n for n in editor["_cfg"]["run"]["graph"]["nodes"] if n["id"] == IDS["preview"])["size"]
    assert g["size"][1] > saved[1], "the Preview node did not grow for its grid"
    assert run["layoutAfter"]["overlaps"] == [], run["layoutAfter"]["overlaps"]
