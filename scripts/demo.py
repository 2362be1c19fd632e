#!/usr/bin/env python3
"""The main job: render a shipped AnyStory workflow through a real ComfyUI server.

    bash scripts/demo.sh            # = setup_env.sh, then this script with the env's python

1. makes random-weight models (an SDXL-family checkpoint ComfyUI's real loaders accept, a CLIP-H
   vision model, native AnyStory + ReferenceNet files, an IP-Adapter Plus file; for the FLUX workflows a
   1 + 1 block FLUX.1-dev-shaped transformer, the FLUX VAE, CLIP-L, SigLIP-384, FLUX.1 Redux and an
   anystory_flux.bin, see scripts/make_models.py) in a demo base directory (default run/demo/), unless they
   are there already;
2. copies the two example subjects (RGBA cut-outs, assets/subjects/) into its input/ folder;
3. starts ComfyUI (COMFYUI_PATH, default /opt/ComfyUI) on 127.0.0.1 with this pack installed;
4. queues example_workflows/api/<workflow>.json through POST /prompt (file names mapped to the demo files,
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
    """The shipped example subjects (assets/subjects/*.png, RGBA cut-outs drawn by scripts/make_examples.py)
    copied into ``input_dir`` where missing — what the pack does for ComfyUI's input/ when a server loads it."""
    import shutil

    input_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for src in sorted((REPO / "assets" / "subjects").glob("*.png")):
        dst = input_dir / src.name
        if not dst.exists():
            shutil.copyfile(src, dst)
        out[src.name] = dst
    return out


def demo_workflow(name: str, files: dict, size: int, steps: int) -> dict:
    """example_workflows/api/<name>.json with the user-facing file names mapped to the demo files."""
    sys.path.insert(0, str(REPO / "scripts"))
    import build_workflows as W

    wf = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    names = {W.CKPT: "checkpoint", W.CLIP_VISION: "clip_vision", W.ANYSTORY: "anystory", W.REFNET: "refnet",
             W.ROUTER: "anystory",  # a trained router file is a native AnyStory file with a router
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
    ap.add_argument("--workflow", default="02_anystory_sdxl_two_subjects",
                    help="an example_workflows/api/*.json name (default: two subjects with routing preview on "
                         "the public SDXL files; 05_anystory_flux_two_subjects: the same on FLUX.1-dev)")
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
        print(f"[demo] server at {server.url}; queueing example_workflows/api/{args.workflow}.json "
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
