"""The shipped templates (example_workflows/, from scripts/build_workflows.py) as a user meets them before
anything runs: they name only files a user can download (the one that needs a trained router says so in
its title and comes last), every SDXL prompt marks the subjects' words (the public path's attention router
needs them), and the layout has no overlapping nodes — title bar, badge and what a run adds included."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / "example_workflows"


def _builder():
    spec = importlib.util.spec_from_file_location("anystory_build_workflows", ROOT / "scripts" / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _builder()
NAMES = sorted(p.stem for p in DIR.glob("*.json"))
FILE_WIDGETS = {"ckpt_name", "clip_name", "model_name", "refnet_name", "unet_name", "clip_name1", "clip_name2",
                "vae_name", "style_model_name", "image"}


def _ui(name):
    return json.loads((DIR / f"{name}.json").read_text())


def _api(name):
    return json.loads((DIR / "api" / f"{name}.json").read_text())


def test_templates_are_the_builders_and_numbered_runnable_first(tmp_path):
    assert NAMES == list(W.TEMPLATES), "example_workflows/ differs from scripts/build_workflows.py TEMPLATES"
    for p in W.write(tmp_path):
        rel = p.relative_to(tmp_path)
        assert (DIR / rel).read_text() == p.read_text(), f"example_workflows/{rel} is stale: run build_workflows.py"
    public = [W.TEMPLATES[n].public for n in NAMES]
    assert public == sorted(public, reverse=True), "templates that need more than the public files come last"
    assert all(n[:2].isdigit() and n[2] == "_" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_template_names_only_files_a_user_can_get(name):
    public = {f for files in W.PUBLIC_FILES.values() for f in files} | {W.SUBJECT_A, W.SUBJECT_B, "none"}
    used = {v for node in _api(name).values() for k, v in node["inputs"].items()
            if k in FILE_WIDGETS and isinstance(v, str)}
    assert W.ANYSTORY not in used and W.REFNET not in used, "AnyStory's own SDXL files are not public"
    if W.TEMPLATES[name].public:
        assert used <= public, used - public
    else:
        assert used - public == {W.ROUTER}
        title = _ui(name)["extra"]["anystory"]["title"]
        assert "trained router" in title and "train_router.py" in title


@pytest.mark.parametrize("name", [n for n in NAMES if "sdxl" in n])
def test_sdxl_prompts_mark_the_subjects_words(name):
    """IP-Adapter Plus has no learned router: the attention router finds each subject by its label words,
    which only AnyStory Text Encode marks (a plain CLIPTextEncode fails at the sampler)."""
    api = _api(name)
    labels = [n["inputs"]["label"] for n in api.values() if n["class_type"] == "AnyStorySubjectEncode"]
    samplers = [n for n in api.values() if n["class_type"] == "KSampler"]
    assert samplers and labels
    for ks in samplers:
        pos = api[ks["inputs"]["positive"][0]]
        assert pos["class_type"] == "AnyStoryTextEncode"
        assert all(label in pos["inputs"]["text"] for label in labels), (pos["inputs"]["text"], labels)


@pytest.mark.parametrize("name", NAMES)
def test_no_overlapping_nodes(name):
    """Rectangles from the UI JSON as the editor draws them: the body at pos, the 30 px title bar and the
    badge above it, and the room the web extension takes after a run (loader info, routing grid)."""
    ui = _ui(name)
    boxes = W.ui_boxes(ui)
    for n in ui["nodes"]:
        x, y, _, _ = boxes[n["id"]]
        w, h = W.reserved_size(n["type"], list(n["size"]))
        boxes[n["id"]] = (x, y, w, h + W.TITLE_H + W.BADGE_H)
    assert W.overlapping(boxes) == []
    assert min(b[0] for b in boxes.values()) >= 0 and min(b[1] for b in boxes.values()) >= 0


@pytest.mark.parametrize("name", NAMES)
def test_widgets_fit_their_node(name):
    """Every widget's label and value fit the node's width (no "mo…" for model_name)."""
    for n in _ui(name)["nodes"]:
        widgets = [w for w in W.WIDGETS[n["type"]][0]]
        for wname, value in zip(widgets, n["widgets_values"]):
            if wname in W.UI_ONLY_WIDGETS or (isinstance(value, str) and n["type"] in W.MULTILINE):
                continue
            text = f"{value:.2f}" if isinstance(value, float) else str(value)
            need = W.WIDGET_PAD + W.CHAR_W * (len(wname) + len(text))
            assert n["size"][0] >= need, (n["type"], wname, value, n["size"])


def test_the_routing_preview_shows_its_grid_large():
    """cell_size 48: the grid of a full SDXL run (11 layers × 8 steps ≈ 470 × 610 px) shows at full scale in
    the room the layout keeps for it."""
    for name in NAMES:
        for n in _api(name).values():
            if n["class_type"] == "AnyStoryRoutingPreview":
                assert n["inputs"]["cell_size"] == 48
    assert W.PREVIEW_GRID_W >= 70 + 8 * 50 and W.PREVIEW_GRID_H >= 22 + 11 * 50 + 40


@pytest.mark.parametrize("name", NAMES)
def test_every_template_has_a_thumbnail(name):
    """The template browser shows <name>.jpg next to <name>.json (comfyui-frontend-package 1.27:
    mediaSubtype "jpg" for custom nodes' templates)."""
    thumb = DIR / f"{name}.jpg"
    assert thumb.is_file(), f"{thumb.name} missing: made by tests/web/test_editor.py (ANYSTORY_SCREENSHOTS_TO)"
    assert thumb.read_bytes()[:3] == b"\xff\xd8\xff" and thumb.stat().st_size < 200_000
