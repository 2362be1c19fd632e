"""The example subject images the shipped workflows name: shipped, RGBA with a real alpha cut-out, and
exactly what scripts/make_examples.py draws (so they are this project's own and can be remade)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("anystory_make_examples", ROOT / "scripts" / "make_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_subject_images_are_the_scripts_drawings():
    mk = _script()
    assert mk.differing() == [], "assets/subjects differs from scripts/make_examples.py: run it"
    assert sorted(p.name for p in mk.OUT_DIR.glob("*.png")) == sorted(mk.DRAWINGS)


def test_subject_images_have_alpha_cut_outs():
    for path in sorted((ROOT / "assets" / "subjects").glob("*.png")):
        with Image.open(path) as im:
            assert im.mode == "RGBA", path
            a = np.asarray(im)[..., 3]
        covered = float((a > 127).mean())
        assert 0.2 < covered < 0.8, (path, covered)  # a subject on a transparent background
        assert a[0, 0] == 0 and a[-1, -1] == 0, path
        assert path.stat().st_size < 50_000, path


def test_every_image_a_shipped_workflow_loads_is_shipped():
    shipped = {p.name for p in (ROOT / "assets" / "subjects").glob("*.png")}
    names = set()
    for wf in sorted((ROOT / "example_workflows" / "api").glob("*.json")):
        for node in json.loads(wf.read_text()).values():
            if node["class_type"] == "LoadImage":
                names.add(node["inputs"]["image"])
    assert names and names <= shipped, names - shipped
