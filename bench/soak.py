#!/usr/bin/env python3
"""Soak test (issue #6): many prompts queued through a real ComfyUI server's /prompt on the random-weight
demo models — zero failures, no memory growth, no state left behind.

    python bench/soak.py                       # 200 prompts, CPU, base dir run/soak
    python bench/soak.py --prompts 50 --gpu    # on the GPU machine (also samples VRAM)

1. makes the demo models (scripts/make_models.py) in ``<base>/models`` unless they are there, draws three
   subjects and the region-mask strips into ``<base>/input``;
2. starts ComfyUI (``tests/comfy_harness.ComfyServer``) over ``<base>`` with this pack;
3. renders a plain txt2img (no AnyStory) and a reference two-subject AnyStory image;
4. runs one warm-up prompt per subject chain and router mode at the largest shapes (192², batch 2),
   then queues N prompts, varying: the subjects (1-3, chained in different orders, native AnyStory file or public
   IP-Adapter Plus weights), the router mode (auto / router / masks / mixed / attention), η, γ, the size
   (64-192 px, odd multiples of 8 included), batch 1-2, sampler and scheduler, steps, cfg (1 included), seed;
   after each prompt it samples the server process's RSS (psutil) and, with a GPU, the process's VRAM
   (nvidia-smi) and torch's reserved memory (ComfyUI's GET /system_stats);
5. renders the reference and the plain image again: both must be bit-identical to step 3;
6. prints and writes (``--out``, default ``<base>/soak_report.json``) warm-up RSS, final RSS, drift %, the
   slope over the post-warm-up prompts, failures, time. Exit status 1 on a failure, a changed image, or an
   RSS drift above ``--max-drift`` %.

Every prompt carries all subject chains as unconnected nodes, so ComfyUI's cache keeps each subject encoded
once (that is how a user's graph behaves when only the sampler settings change); the soak exercises the
patched sampling, not the CLIP/VAE encoders.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import comfy_harness as H  # noqa: E402

SAMPLERS = [("euler", "normal"), ("euler_ancestral", "karras"), ("dpmpp_2m", "karras"), ("dpmpp_2m_sde", "exponential"),
            ("ddim", "simple"), ("heun", "normal"), ("dpmpp_sde", "sgm_uniform"), ("lms", "karras"),
            ("uni_pc", "normal"), ("dpm_2", "beta"), ("euler", "ddim_uniform"), ("dpmpp_2s_ancestral", "normal")]
SIZES = list(range(64, 193, 8))
POSITIVE = "the fox and the robot and the ball playing chess in a park, sunny day, detailed illustration"


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def draw_inputs(input_dir: Path) -> None:
    import demo
    from PIL import Image, ImageDraw

    demo.draw_subjects(input_dir)
    ball = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    d = ImageDraw.Draw(ball)
    d.ellipse([28, 28, 228, 228], fill=(40, 90, 220, 255))
    d.arc([28, 28, 228, 228], 200, 340, fill=(250, 250, 250, 255), width=18)
    ball.save(input_dir / "soak_ball.png")
    for n in (1, 2, 3):  # vertical strips: mask k of n is white on the k-th strip
        for k in range(n):
            img = Image.new("RGB", (96, 64), (0, 0, 0))
            ImageDraw.Draw(img).rectangle([k * 96 // n, 0, (k + 1) * 96 // n - 1, 63], fill=(255, 255, 255))
            img.save(input_dir / f"soak_strip_{n}_{k}.png")


# ------------------------------------------------------------------------------------------------
# graphs
# ------------------------------------------------------------------------------------------------
def _encode(image, mask, loader, label, subjects=None):
    ins = {"anystory": [loader, 0], "clip_vision": ["2", 0], "vae": ["1", 2], "image": [image, 0],
           "mask": [mask, 0], "model": ["1", 0], "label": label, "strength": 1.0, "reference": "auto"}
    if subjects:
        ins["subjects"] = [subjects, 0]
    return {"class_type": "AnyStorySubjectEncode", "inputs": ins}


# chain name → (encode node id, number of subjects, public weights?)
CHAINS = {"fox": ("s1", 1, False), "fox+robot": ("s2", 2, False), "robot": ("s3", 1, False),
          "robot+fox": ("s4", 2, False), "fox+robot+ball": ("s5", 3, False),
          "pub:fox+robot": ("p2", 2, True), "pub:ball": ("p3", 1, True)}


def anchors(files: dict) -> dict:
    """Loaders, prompts, the subject images and every subject chain (encoded once, then cached)."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": files["checkpoint"]}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": files["clip_vision"]}},
        "3": {"class_type": "AnyStoryModelLoader", "inputs": {"model_name": files["anystory"],
                                                             "refnet_name": files["refnet"]}},
        "4": {"class_type": "AnyStoryModelLoader", "inputs": {"model_name": files["ipadapter"], "refnet_name": "none"}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, low quality"}},
        "t": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": POSITIVE}},
    }
    for name, img in (("fox", "anystory_subject_fox.png"), ("robot", "anystory_subject_robot.png"),
                      ("ball", "soak_ball.png")):
        g[f"i_{name}"] = {"class_type": "LoadImage", "inputs": {"image": img}}
        g[f"m_{name}"] = {"class_type": "InvertMask", "inputs": {"mask": [f"i_{name}", 1]}}
    g["s1"] = _encode("i_fox", "m_fox", "3", "the fox")
    g["s2"] = _encode("i_robot", "m_robot", "3", "the robot", "s1")
    g["s3"] = _encode("i_robot", "m_robot", "3", "the robot")
    g["s4"] = _encode("i_fox", "m_fox", "3", "the fox", "s3")
    g["s5"] = _encode("i_ball", "m_ball", "3", "the ball", "s2")
    g["p1"] = _encode("i_fox", "m_fox", "4", "the fox")
    g["p2"] = _encode("i_robot", "m_robot", "4", "the robot", "p1")
    g["p3"] = _encode("i_ball", "m_ball", "4", "the ball")
    for chain in ("p2", "p3"):
        g["a" + chain] = {"class_type": "AnyStoryTextEncode", "inputs": {"clip": ["1", 1], "text": POSITIVE,
                                                                        "subjects": [chain, 0]}}
    return g


def _masks(g: dict, n: int, black_last: bool) -> list:
    """MASK batch of n vertical strips (the last one all black when ``black_last``: the router decides there)."""
    prev = None
    for k in range(n):
        g[f"ms{k}"] = {"class_type": "LoadImage", "inputs": {"image": f"soak_strip_{n}_{k}.png"}}
        img = [f"ms{k}", 0]
        if black_last and k == n - 1:
            g["mblack"] = {"class_type": "ImageBlend", "inputs": {"image1": img, "image2": img, "blend_factor": 1.0,
                                                                 "blend_mode": "difference"}}
            img = ["mblack", 0]
        if prev is None:
            prev = img
        else:
            g[f"mb{k}"] = {"class_type": "ImageBatch", "inputs": {"image1": prev, "image2": img}}
            prev = [f"mb{k}", 0]
    g["mm"] = {"class_type": "ImageToMask", "inputs": {"image": prev, "channel": "red"}}
    return ["mm", 0]


def render(g: dict, model, positive, p: dict, prefix: str) -> None:
    g["L"] = {"class_type": "EmptyLatentImage", "inputs": {"width": p["w"], "height": p["h"], "batch_size": p["batch"]}}
    g["K"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": ["n", 0], "latent_image": ["L", 0], "seed": p["seed"],
        "steps": p["steps"], "cfg": p["cfg"], "sampler_name": p["sampler"], "scheduler": p["scheduler"],
        "denoise": 1.0}}
    g["D"] = {"class_type": "VAEDecode", "inputs": {"samples": ["K", 0], "vae": ["1", 2]}}
    g["S"] = {"class_type": "SaveImage", "inputs": {"images": ["D", 0], "filename_prefix": prefix}}


def anystory_graph(files: dict, p: dict, prefix: str = "soak") -> dict:
    g = anchors(files)
    node, n, public = CHAINS[p["chain"]]
    ins = {"model": ["1", 0], "anystory": ["4" if public else "3", 0], "subjects": [node, 0],
           "router_mode": p["mode"], "eta": p["eta"], "gamma": p["gamma"], "start_percent": p["start"],
           "end_percent": p["end"], "record_routing": p["record"], "feather": p["feather"], "warmup_steps": 1,
           "threshold": 0.35}
    if p["mode"] in ("masks", "mixed"):
        ins["region_masks"] = _masks(g, n, black_last=p["mode"] == "mixed" and n > 1)
    g["A"] = {"class_type": "AnyStoryApply", "inputs": ins}
    positive = ["a" + node, 0] if public else ["t", 0]
    render(g, ["A", 0], positive, p, prefix)
    if p["record"]:
        g["P"] = {"class_type": "AnyStoryRoutingPreview", "inputs": {
            "routing": ["A", 1], "latent": ["K", 0], "layers": "auto", "steps": "auto", "mask_steps": "last",
            "image_index": 0, "cell_size": 48}}
        g["PI"] = {"class_type": "PreviewImage", "inputs": {"images": ["P", 0]}}
    return g


def control_graph(files: dict, p: dict, prefix: str = "soak_control") -> dict:
    """The same graph and variation as :func:`anystory_graph` without AnyStory Apply: the sampler gets the
    unpatched MODEL (``--control``: what ComfyUI itself grows by under this workload)."""
    g = anchors(files)
    render(g, ["1", 0], ["t", 0], p, prefix)
    return g


def plain_graph(files: dict) -> dict:
    """The fixed plain image rendered before and after the soak (must not change)."""
    return control_graph(files, dict(w=64, h=64, batch=1, seed=11, steps=2, cfg=5.0, sampler="euler",
                                     scheduler="normal"), "soak_plain")


REFERENCE = dict(chain="fox+robot", mode="auto", eta=1.0, gamma=1.0, start=0.0, end=1.0, record=True, feather=0,
                 w=64, h=64, batch=1, seed=7, steps=2, cfg=6.0, sampler="euler", scheduler="normal")


def warmup_params() -> list:
    """The workload's largest shapes, once per subject chain and router mode (192×192, batch 2, two model calls
    per step): allocators reach their high-water mark here, so the drift measured afterwards is growth, not
    first use."""
    out = []
    for chain, (_, _, public) in CHAINS.items():
        for mode in (["attention", "masks"] if public else ["auto", "router", "masks", "mixed"]):
            out.append(dict(REFERENCE, chain=chain, mode=mode, w=192, h=192, batch=2, steps=2, sampler="dpmpp_sde",
                            scheduler="karras", feather=8, seed=len(out)))
    return out


def prompt_params(rng: random.Random, i: int) -> dict:
    chain = rng.choice(list(CHAINS))
    public = CHAINS[chain][2]
    mode = rng.choice(["attention", "masks"] if public else ["auto", "router", "masks", "mixed", "auto"])
    start = rng.choice([0.0, 0.0, 0.2])
    sampler, scheduler = SAMPLERS[i % len(SAMPLERS)]
    return dict(chain=chain, mode=mode, eta=rng.choice([0.0, 0.5, 1.0, 1.5]), gamma=rng.choice([0.0, 1.0, 2.0]),
                start=start, end=rng.choice([1.0, 1.0, 0.8]), record=rng.random() < 0.7,
                feather=rng.choice([0, 0, 8]), w=rng.choice(SIZES), h=rng.choice(SIZES),
                batch=2 if rng.random() < 0.15 else 1, seed=rng.randrange(2 ** 31), steps=rng.choice([2, 3, 4]),
                cfg=rng.choice([1.0, 4.0, 6.0]), sampler=sampler, scheduler=scheduler)


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def rss(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss


def rss_anon_mib(pid: int) -> float:
    """Anonymous resident memory (heap, tensors) without file-backed pages, which the kernel drops and re-reads
    under memory pressure; None where /proc has no RssAnon."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def vram(server, pid: int) -> dict:
    out = {}
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=20).stdout
            for line in q.splitlines():
                parts = [x.strip() for x in line.split(",")]
                if len(parts) == 2 and parts[0] == str(pid):
                    out["nvidia_smi_mib"] = float(parts[1])
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        dev = (server.get_json("/system_stats", timeout=30) or {}).get("devices", [{}])[0]
        if dev.get("type") not in (None, "cpu"):
            out["torch_reserved_mib"] = dev.get("torch_vram_total", 0) / 2 ** 20
            out["torch_free_in_reserved_mib"] = dev.get("torch_vram_free", 0) / 2 ** 20
    except (urllib.error.URLError, OSError, ValueError):
        pass
    return out


def wait(server, pid: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            entry = server.history(pid)
        except (urllib.error.URLError, TimeoutError, OSError):
            entry = None
        if entry is not None and (entry.get("status") or {}).get("status_str") in ("success", "error"):
            return entry
        if not server.alive:
            raise RuntimeError(f"ComfyUI died\n{server.log_tail(60)}")
        time.sleep(0.1)
    raise TimeoutError(f"prompt {pid} not done after {timeout:.0f} s")


def pixels(server, entry: dict, node: str):
    import numpy as np
    from PIL import Image
    paths = server.output_files({"outputs": {node: entry["outputs"][node]}})
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def same(a, b) -> bool:
    import numpy as np
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", default=str(REPO / "run" / "soak"))
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="also report the drift after this many of the N prompts "
                    "(the warm-up RSS proper is taken after the largest-shape warm-up prompts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default --cpu)")
    ap.add_argument("--full", action="store_true", help="full SDXL-shaped random models")
    ap.add_argument("--max-drift", type=float, default=2.0, help="allowed RSS drift after warm-up, %%")
    ap.add_argument("--timeout", type=float, default=1800, help="per prompt, s")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="start ComfyUI with MALLOC_MMAP_THRESHOLD_=BYTES (glibc: large blocks always mmapped and "
                    "returned to the OS) to tell allocator high-water growth from a leak")
    ap.add_argument("--control", action="store_true",
                    help="render the same varied prompts WITHOUT AnyStory Apply (unpatched MODEL): the drift of "
                    "ComfyUI itself under this workload, to compare with")
    ap.add_argument("--clear-history", action="store_true",
                    help="POST /history {clear} after each prompt: ComfyUI keeps up to 10000 finished prompts "
                    "(graph + outputs) in memory by design; this takes that growth out of the measurement")
    ap.add_argument("--fixed-shape", action="store_true",
                    help="every prompt at 128×128, batch 1 (the rest varies): tells growth per new tensor shape "
                    "(kernel/plan caches, allocator pools) from growth per prompt")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    t0 = time.time()
    base = Path(args.base_dir).resolve()
    mm = H.load_make_models()
    mm.make_models(base / "models", full=args.full, log=lambda *a: print("[soak]", *a, flush=True))
    names = mm.file_names(full=args.full)
    files = {part: str(Path(rel).relative_to(Path(rel).parts[0])) for part, rel in names.items()}
    draw_inputs(base / "input")
    env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else None
    server = H.ComfyServer(base_dir=base, startup_timeout=300, cpu=not args.gpu, env=env)
    report = {"prompts": args.prompts, "warmup": args.warmup, "device": "gpu" if args.gpu else "cpu", "seed": args.seed,
              "malloc_mmap_threshold": args.malloc_mmap_threshold, "control": args.control,
              "clear_history": args.clear_history, "fixed_shape": args.fixed_shape,
              "comfyui": H.comfy_available()[1], "failures": [], "per_prompt": []}
    out_path = Path(args.out) if args.out else base / "soak_report.json"
    with server:
        if server.pack_import_errors():
            print("\n".join(server.pack_import_errors()))
            return 1
        pid = server.proc.pid

        def run(g):
            entry = wait(server, server.queue_prompt(g), args.timeout)
            return entry, H.execution_error(entry)

        print(f"[soak] ComfyUI pid {pid} at {server.url}; plain + reference renders (encodes every subject once)",
              flush=True)
        prime = anchors(files)  # encode every subject chain once, before the warm-up
        for node in [c[0] for c in CHAINS.values()] + ["ap2", "ap3"]:
            prime["o" + node] = {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
        _, err = run(prime)
        assert err is None, err
        plain0, err = run(plain_graph(files))
        assert err is None, err
        ref_wf = anystory_graph(files, REFERENCE, "soak_reference")
        ref0, err = run(ref_wf)
        assert err is None, err
        for p in warmup_params():
            _, err = run(anystory_graph(files, p, "soak_warmup"))
            assert err is None, (p, err)
        report["warmup_prompts"] = len(warmup_params())
        report["rss_after_warmup_mib"] = round(rss(pid) / 2 ** 20, 1)
        report["rss_anon_after_warmup_mib"] = rss_anon_mib(pid)
        report["vram_after_warmup"] = vram(server, pid)
        print(f"[soak] warm-up ({report['warmup_prompts']} prompts at the largest shapes): RSS "
              f"{report['rss_after_warmup_mib']:.0f} MiB", flush=True)
        rng = random.Random(args.seed)
        t_loop = time.time()
        for i in range(args.prompts):
            p = prompt_params(rng, i)
            if args.fixed_shape:
                p.update(w=128, h=128, batch=1)
            ts = time.time()
            entry, err = run(control_graph(files, p) if args.control else anystory_graph(files, p))
            rec = {"i": i, "s": round(time.time() - ts, 3), "rss_mib": round(rss(pid) / 2 ** 20, 1),
                   "rss_anon_mib": rss_anon_mib(pid), **vram(server, pid),
                   "params": p}
            if err is not None:
                rec["error"] = {k: err.get(k) for k in ("node_type", "exception_message", "event")}
                report["failures"].append(rec)
            elif len(pixels(server, entry, "S")) != p["batch"]:
                rec["error"] = {"exception_message": "wrong number of images"}
                report["failures"].append(rec)
            report["per_prompt"].append(rec)
            if args.clear_history:
                server._request("POST", "/history", {"clear": True})
            if i % 10 == 0 or err is not None:
                print(f"[soak] {i:4d} {p['chain']:15s} {p['mode']:9s} {p['w']}x{p['h']}x{p['batch']} "
                      f"{p['sampler']}/{p['scheduler']} {p['steps']} steps cfg {p['cfg']}: {rec['s']:.1f} s, "
                      f"RSS {rec['rss_mib']:.0f} MiB {'FAILED ' + str(rec['error']) if err else ''}", flush=True)
        loop_s = time.time() - t_loop
        ref1, err1 = run(anystory_graph(files, dict(REFERENCE, record=False), "soak_reference"))
        plain1, err2 = run(plain_graph(files))
        report["reference_unchanged"] = err1 is None and same(pixels(server, ref0, "S"), pixels(server, ref1, "S"))
        report["plain_unchanged"] = err2 is None and same(pixels(server, plain0, "S"), pixels(server, plain1, "S"))
        report["final_rss_mib"] = round(rss(pid) / 2 ** 20, 1)

    series = [r["rss_mib"] for r in report["per_prompt"]]
    w = min(args.warmup, len(series)) - 1
    warm, end = report["rss_after_warmup_mib"], series[-1]
    post = series[w:]
    n = len(post)
    slope = 0.0
    if n > 1:
        mx, my = (n - 1) / 2, sum(post) / n
        slope = sum((x - mx) * (y - my) for x, y in enumerate(post)) / sum((x - mx) ** 2 for x in range(n))
    report.update(warmup_rss_mib=warm, end_rss_mib=end, drift_pct=round(100 * (end - warm) / warm, 3),
                  rss_at_prompt_mib={str(w + 1): series[w]},
                  drift_after_prompt_pct=round(100 * (end - series[w]) / series[w], 3),
                  max_rss_mib=max(series), slope_mib_per_100_prompts=round(100 * slope, 2),
                  loop_s=round(loop_s, 1), total_s=round(time.time() - t0, 1),
                  mean_prompt_s=round(loop_s / max(1, args.prompts), 2))
    anon = [r["rss_anon_mib"] for r in report["per_prompt"] if r.get("rss_anon_mib") is not None]
    if anon and report.get("rss_anon_after_warmup_mib"):
        a0 = report["rss_anon_after_warmup_mib"]
        report.update(end_rss_anon_mib=anon[-1], rss_anon_drift_pct=round(100 * (anon[-1] - a0) / a0, 3))
    gpu = [r.get("nvidia_smi_mib") for r in report["per_prompt"] if r.get("nvidia_smi_mib") is not None]
    vw = report["vram_after_warmup"]
    if gpu and vw.get("nvidia_smi_mib"):
        report.update(warmup_vram_mib=vw["nvidia_smi_mib"], end_vram_mib=gpu[-1], max_vram_mib=max(gpu),
                      vram_drift_pct=round(100 * (gpu[-1] - vw["nvidia_smi_mib"]) / vw["nvidia_smi_mib"], 3))
    reserved = [r.get("torch_reserved_mib") for r in report["per_prompt"] if r.get("torch_reserved_mib") is not None]
    if reserved and vw.get("torch_reserved_mib"):
        report.update(warmup_torch_reserved_mib=round(vw["torch_reserved_mib"], 1),
                      end_torch_reserved_mib=round(reserved[-1], 1))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    summary = {k: report[k] for k in ("prompts", "device", "warmup_prompts", "warmup_rss_mib", "end_rss_mib",
                                      "drift_pct", "drift_after_prompt_pct", "max_rss_mib",
                                      "slope_mib_per_100_prompts", "reference_unchanged", "plain_unchanged",
                                      "loop_s", "mean_prompt_s", "total_s")}
    for k in ("rss_anon_after_warmup_mib", "end_rss_anon_mib", "rss_anon_drift_pct", "warmup_vram_mib",
              "end_vram_mib", "max_vram_mib", "vram_drift_pct", "warmup_torch_reserved_mib",
              "end_torch_reserved_mib"):
        if k in report:
            summary[k] = report[k]
    summary["failures"] = len(report["failures"])
    print("[soak] " + json.dumps(summary, indent=1))
    print(f"[soak] report: {out_path}")
    ok = (not report["failures"] and report["reference_unchanged"] and report["plain_unchanged"]
          and abs(report["drift_pct"]) < args.max_drift)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
