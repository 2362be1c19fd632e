#!/usr/bin/env python3
"""Draw the example subject images the shipped workflows name (assets/subjects/*.png).

    python scripts/make_examples.py            # rewrite assets/subjects/*.png
    python scripts/make_examples.py --check    # exit 1 when the shipped files differ from the drawings

Two RGBA cut-outs drawn here from shapes (so they are this project's own): an orange fox-like figure and
a grey robot; alpha = 255 on the subject, 0 on the background (what ComfyUI's LoadImage turns into a
MASK, inverted by the workflows' InvertMask so that white = subject). The pack copies them into
ComfyUI's input/ folder when it loads and they are missing there (nodes/examples.py), so the templates'
LoadImage nodes find them on the first Run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "assets" / "subjects"
FOX = "anystory_subject_fox.png"
ROBOT = "anystory_subject_robot.png"


def draw_fox():
    from PIL import Image, ImageDraw

    fox = Image.new("RGBA", (384, 448), (0, 0, 0, 0))
    d = ImageDraw.Draw(fox)
    d.ellipse([92, 210, 292, 430], fill=(226, 120, 40, 255))                  # body
    d.ellipse([112, 70, 272, 230], fill=(236, 132, 48, 255))                  # head
    d.polygon([(120, 110), (140, 20), (180, 90)], fill=(210, 100, 30, 255))   # ears
    d.polygon([(264, 110), (244, 20), (204, 90)], fill=(210, 100, 30, 255))
    d.ellipse([150, 130, 172, 152], fill=(20, 20, 20, 255))                   # eyes, nose
    d.ellipse([212, 130, 234, 152], fill=(20, 20, 20, 255))
    d.ellipse([180, 170, 204, 190], fill=(40, 20, 10, 255))
    d.ellipse([150, 300, 234, 420], fill=(250, 235, 215, 255))                # chest
    return fox


def draw_robot():
    from PIL import Image, ImageDraw

    robot = Image.new("RGBA", (320, 480), (0, 0, 0, 0))
    d = ImageDraw.Draw(robot)
    d.rectangle([60, 170, 260, 400], fill=(150, 158, 170, 255))               # body
    d.rectangle([90, 50, 230, 160], fill=(175, 182, 192, 255))                # head
    d.rectangle([115, 85, 145, 115], fill=(40, 200, 255, 255))                # eyes
    d.rectangle([175, 85, 205, 115], fill=(40, 200, 255, 255))
    d.line([160, 50, 160, 15], fill=(120, 120, 130, 255), width=6)            # antenna
    d.ellipse([150, 5, 170, 25], fill=(255, 60, 60, 255))
    d.rectangle([20, 190, 55, 340], fill=(130, 138, 150, 255))                # arms
    d.rectangle([265, 190, 300, 340], fill=(130, 138, 150, 255))
    d.rectangle([90, 400, 140, 470], fill=(110, 118, 130, 255))               # legs
    d.rectangle([180, 400, 230, 470], fill=(110, 118, 130, 255))
    d.rectangle([120, 230, 200, 300], fill=(255, 200, 40, 255))               # chest panel
    return robot


DRAWINGS = {FOX: draw_fox, ROBOT: draw_robot}


def drawings() -> dict:
    """{file name: PIL RGBA image}."""
    return {name: draw() for name, draw in DRAWINGS.items()}


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in drawings().items():
        img.save(out_dir / name, optimize=True)
        paths.append(out_dir / name)
    return paths


def differing(out_dir: Path = OUT_DIR) -> list[str]:
    """Names whose shipped file is missing or whose pixels differ from the drawing."""
    import numpy as np
    from PIL import Image

    bad = []
    for name, img in drawings().items():
        path = out_dir / name
        if not path.is_file():
            bad.append(name)
            continue
        with Image.open(path) as shipped:
            if shipped.mode != "RGBA" or not np.array_equal(np.asarray(shipped), np.asarray(img)):
                bad.append(name)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    if args.check:
        bad = differing()
        print("\n".join(f"differs: {n}" for n in bad) or "assets/subjects is up to date")
        return 1 if bad else 0
    for p in write():
        print(p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
