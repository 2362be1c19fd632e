#!/usr/bin/env python3
"""Render every shipped API workflow through one real ComfyUI server on the demo's random models and
write the SHA-256 of every image it returns — a bit-identity check for changes that must not alter
the output (a restructuring, a speed change):

    PY=$(bash scripts/setup_env.sh | tail -n 1)
    $PY scripts/render_workflows.py --out run/before.json      # on the old code
    $PY scripts/render_workflows.py --out run/after.json --compare run/before.json

Same models (scripts/make_models.py, made once in --base-dir), same seeds, CPU, reduced size/steps
as the demo uses. --compare exits 1 when any image differs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import comfy_harness as H  # noqa: E402
import demo  # noqa: E402


def render_all(base: Path, names: list, size: int, steps: int, timeout: float) -> dict:
    mm = H.load_make_models()
    flux = tuple(mm.FLUX_PARTS) if any("flux" in n for n in names) else ()
    mm.make_models(base / "models", full=False, parts=tuple(mm.PARTS) + flux, log=lambda *a: print("[render]", *a))
    files = {part: str(Path(rel).relative_to(Path(rel).parts[0])) for part, rel in mm.file_names(full=False).items()}
    demo.draw_subjects(base / "input")
    out = {}
    with H.ComfyServer(base_dir=base, startup_timeout=300, cpu=True) as server:
        errors = server.pack_import_errors()
        if errors:
            raise SystemExit("\n".join(errors))
        for name in names:
            t0 = time.time()
            wf = demo.demo_workflow(name, files, size, steps)
            entry = server.wait(server.queue_prompt(wf), timeout=timeout)
            err = H.execution_error(entry)
            if err:
                raise SystemExit(f"{name} failed: {json.dumps(err)[:2000]}\n{server.log_tail(40)}")
            digests = {}
            for nid, res in sorted(entry.get("outputs", {}).items()):
                for i, img in enumerate(res.get("images", [])):
                    folder = base / ("output" if img.get("type") == "output" else "temp")
                    data = (folder / img.get("subfolder", "") / img["filename"]).read_bytes()
                    digests[f"{nid}:{i}:{wf[nid]['class_type']}"] = hashlib.sha256(data).hexdigest()
            out[name] = digests
            print(f"[render] {name}: {len(digests)} images in {time.time() - t0:.0f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", default=str(REPO / "run" / "render"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="a JSON written by an earlier run: exit 1 when any image differs")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("workflows", nargs="*", help="example_workflows/api names (default: all)")
    args = ap.parse_args(argv)
    names = args.workflows or sorted(p.stem for p in (REPO / "example_workflows" / "api").glob("*.json"))
    res = render_all(Path(args.base_dir).resolve(), names, args.size, args.steps, args.timeout)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, sort_keys=True))
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        diff = [f"{w} {k}" for w in names for k in sorted(set(old.get(w, {})) | set(res.get(w, {})))
                if old.get(w, {}).get(k) != res.get(w, {}).get(k)]
        print(f"[render] {sum(len(v) for v in res.values())} images; {len(diff)} differ from {args.compare}")
        for d in diff:
            print("  differs:", d)
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
