#!/usr/bin/env python3
"""The main job: render a shipped AnyStory workflow through a real ComfyUI server.

    bash scripts/demo.sh            # = setup_env.sh, then this script with the env's python

1. makes random-weight models (an SDXL-family checkpoint ComfyUI's real loaders accept, a CLIP-H
   vision model, native AnyStory + ReferenceNet files, an IP-Adapter Plus file; for the FLUX workflows a
   1 + 1 block FLUX.1-dev-shaped transformer, the FLUX VAE, CLIP-L, SigLIP-384, FLUX.1 Redux and an
   anystory_flux.bin, see scripts/make_models.py) in a demo base directory (default run/demo/), unless they
   are there already;
2. draws two example subjects (RGBA cut-outs) into its input/ folder;
3. starts ComfyUI (COMFYUI_PATH, default /opt/ComfyUI) on 127.0.0.1 with this pack installed;
4. queues workflows/api/<workflow>.json through POST /prompt (file names mapped to the demo files,
   size/steps reduced for a CPU; on FLUX the DualCLIPLoader of CLIP-L + T5-XXL becomes a CLIPLoader of the
   random CLIP-L with type "sd3", which gives FLUX its 4096-wide context — a random T5-XXL is a 9.4 GB file),
   waits through /history and prints where the images are.

The weights are random, so the images are noise-like: the point is that the whole graph runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server wrapper lives beside the tests (standard library only)

import comfy_harness as H  # noqa: E402

COMFYUI_GIT = "https://github.com/comfyanonymous/ComfyUI"
COMFYUI_TAG = "v0.3.64"


def ensure_comfyui() -> Path:
    root = H.comfyui_path()
    ok, why = H.comfy_available()
    if ok:
        return root
    print(f"[demo] {why}; trying: git clone --depth 1 --branch {COMFYUI_TAG} {COMFYUI_GIT} {root}")
    try:
        subprocess.run(["git", "clone", "--depth", "1", "--branch", COMFYUI_TAG, COMFYUI_GIT, str(root)], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"[demo] ComfyUI is needed and could not be fetched ({e}). Put a ComfyUI checkout at {root} "
                 "or point COMFYUI_PATH at one, then run again (scripts/setup_env.sh installs its requirements).")
    return root


def draw_subjects(input_dir: Path) -> dict:
    """Two RGBA cut-outs: an orange fox-like figure and a grey robot (alpha = subject)."""
    from PIL import Image, ImageDraw

    input_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    fox = Image.new("RGBA", (384, 448), (0, 0, 0, 0))
    d = ImageDraw.Draw(fox)
    d.ellipse([92, 210, 292, 430], fill=(226, 120, 40, 255))                  # body
    d.ellipse([112, 70, 272, 230], fill=(236, 132, 48, 255))                  # head
    d.polygon([(120, 110), (140, 20), (180, 90)], fill=(210, 100, 30, 255))   # ears
    d.polygon([(264, 110), (244, 20), (204, 90)], fill=(210, 100, 30, 255))
    d.ellipse([150, 130, 172, 152], fill=(20, 20, 20, 255))
    d.ellipse([212, 130, 234, 152], fill=(20, 20, 20, 255))
    d.ellipse([180, 170, 204, 190], fill=(40, 20, 10, 255))
    d.ellipse([150, 300, 234, 420], fill=(250, 235, 215, 255))                # chest
    out["anystory_subject_fox.png"] = fox
    robot = Image.new("RGBA", (320, 480), (0, 0, 0, 0))
    d = ImageDraw.Draw(robot)
    d.rectangle([60, 170, 260, 400], fill=(150, 158, 170, 255))               # body
    d.rectangle([90, 50, 230, 160], fill=(175, 182, 192, 255))                # head
    d.rectangle([115, 85, 145, 115], fill=(40, 200, 255, 255))                # eyes
    d.rectangle([175, 85, 205, 115], fill=(40, 200, 255, 255))
    d.line([160, 50, 160, 15], fill=(120, 120, 130, 255), width=6)
    d.ellipse([150, 5, 170, 25], fill=(255, 60, 60, 255))
    d.rectangle([20, 190, 55, 340], fill=(130, 138, 150, 255))                # arms
    d.rectangle([265, 190, 300, 340], fill=(130, 138, 150, 255))
    d.rectangle([90, 400, 140, 470], fill=(110, 118, 130, 255))               # legs
    d.rectangle([180, 400, 230, 470], fill=(110, 118, 130, 255))
    d.rectangle([120, 230, 200, 300], fill=(255, 200, 40, 255))               # chest panel
    out["anystory_subject_robot.png"] = robot
    for name, img in out.items():
        path = input_dir / name
        if not path.exists():
            img.save(path)
    return {name: input_dir / name for name in out}


def demo_workflow(name: str, files: dict, size: int, steps: int) -> dict:
    """workflows/api/<name>.json with the user-facing file names mapped to the demo files."""
    sys.path.insert(0, str(REPO / "scripts"))
    import build_workflows as W

    wf = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    names = {W.CKPT: "checkpoint", W.CLIP_VISION: "clip_vision", W.ANYSTORY: "anystory", W.REFNET: "refnet",
             W.IPADAPTER: "ipadapter", W.FLUX_UNET: "flux_unet", W.FLUX_VAE: "flux_vae", W.CLIP_L: "clip_l",
             W.SIGLIP: "siglip", W.REDUX: "redux", W.ANYSTORY_FLUX: "anystory_flux"}
    mapping = {user: files[part] for user, part in names.items() if part in files}
    for node in wf.values():
        ins = node["inputs"]
        if node["class_type"] == "DualCLIPLoader" and ins.get("type") == "flux" and "clip_l" in files:
            node["class_type"] = "CLIPLoader"  # CLIP-L alone, zero-padded to FLUX's 4096 (no 9.4 GB T5-XXL)
            node["inputs"] = ins = {"clip_name": files["clip_l"], "type": "sd3", "device": "default"}
        for k, v in list(ins.items()):
            if isinstance(v, str) and v in mapping:
                ins[k] = mapping[v]
        if node["class_type"] in ("EmptyLatentImage", "ModelSamplingFlux"):
            ins["width"] = ins["height"] = size
        if node["class_type"] == "KSampler":
            ins["steps"] = steps
    return wf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", default=str(REPO / "run" / "demo"), help="ComfyUI base directory for the demo")
    ap.add_argument("--workflow", default="anystory_two_subjects",
                    help="a workflows/api/*.json name (default: two subjects with routing preview; "
                         "anystory_flux_two_subjects: the same on FLUX.1-dev)")
    ap.add_argument("--size", type=int, default=512, help="image size (the shipped graph says 1024)")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps (the shipped graph says 20)")
    ap.add_argument("--full", action="store_true", help="full SDXL-shaped random models (for a GPU machine)")
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default --cpu)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)

    t0 = time.time()
    ensure_comfyui()
    base = Path(args.base_dir).resolve()
    mm = H.load_make_models()
    print(f"[demo] models in {base / 'models'} (random weights; made once)")
    flux = "flux" in args.workflow
    mm.make_models(base / "models", full=args.full, parts=mm.FLUX_PARTS if flux else None,
                   log=lambda *a: print("[demo]", *a))
    names = mm.file_names(full=args.full)
    files = {part: str(Path(rel).relative_to(Path(rel).parts[0])) for part, rel in names.items()}
    draw_subjects(base / "input")
    wf = demo_workflow(args.workflow, files, args.size, args.steps)
    server = H.ComfyServer(base_dir=base, startup_timeout=300, cpu=not args.gpu)
    print(f"[demo] starting ComfyUI {H.comfy_available()[1]} on 127.0.0.1 (log: {base / 'comfyui.log'})")
    with server:
        errors = server.pack_import_errors()
        if errors:
            print("\n".join(errors))
            return 1
        print(f"[demo] server at {server.url}; queueing workflows/api/{args.workflow}.json "
              f"({args.size}x{args.size}, {args.steps} steps) through /prompt")
        pid = server.queue_prompt(wf)
        entry = server.wait(pid, timeout=args.timeout)
        err = H.execution_error(entry)
        if err:
            print(f"[demo] FAILED: {json.dumps(err, indent=1)[:3000]}\n{server.log_tail(60)}")
            return 1
        outputs = entry.get("outputs", {})
        lines = []
        for nid, out in outputs.items():
            title = wf.get(nid, {}).get("_meta", {}).get("title") or wf.get(nid, {}).get("class_type", nid)
            for img in out.get("images", []):
                folder = base / ("output" if img.get("type") == "output" else "temp")
                lines.append(f"  {title:32s} {folder / img.get('subfolder', '') / img['filename']}")
        print(f"[demo] done in {time.time() - t0:.0f} s — images:")
        print("\n".join(lines))
        (base / "last_result.json").write_text(json.dumps({"prompt_id": pid, "outputs": outputs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
