#!/usr/bin/env python3
"""Training cost at full SDXL shapes — ms per step and peak VRAM, gradient checkpointing on/off; the router
(stage 2, default) or the subject encoder (``--stage 1``).

    python bench/train_gpu.py --out bench/results                # on the GPU machine (1024², batch 1)
    python bench/train_gpu.py --stage 1 --out bench/results      # stage 1: QFormer + Ŵ + W̃ + ReferenceNet
    python bench/train_gpu.py --quick --device cpu --out /tmp/x   # a smoke run of the script itself

Everything is built in this process, never loaded from disk, with bench/benchmark.py's helpers: the
SDXL UNet (70 cross-attention layers), the SDXL VAE and CLIP ViT-H/14 with random fp16 weights of the
real shapes, and a random IP-Adapter Plus SDXL ViT-H subject branch (m=16, 4-layer QFormer) for the
UNet's layout. A synthetic coloured-shapes dataset (2 instances per image) is written to a temp folder.
Training runs through ``scripts/train_router.py`` itself (``train(argv, components)``): per step the
augmented reference crops go through CLIP-H, the routing QFormer gives R_i, the UNet runs with the
routers' Gumbel maps in eq. 5 at every layer, loss = ε-MSE + 0.1·routing loss, AdamW on the routing
QFormer + 70 routers. Text conditioning is a fixed random context (computed once per caption in real
runs, not part of a step).

With ``--reference`` (default auto, as the script: stage 2 with the UNet itself as frozen ReferenceNet,
stage 1 with a trainable ReferenceNet copied from the UNet) a step also runs the ReferenceNet on the reference
views (``--ref-size``, through the VAE) and eq. 6-8 at every layer but the first. Stage 1 trains the subject
QFormer, the 70 Ŵ_k/Ŵ_v, the 70 W̃_k/W̃_v and the ReferenceNet (AdamW, fp32 master weights), routed by the
instance masks, 10 % condition dropout.

Per configuration (autocast dtype × gradient checkpointing): ms/step = median of the steps after the
warm-up ones; peak VRAM = ``torch.cuda.max_memory_allocated`` over the training steps (targets'
VAE encoding excluded). Writes ``train_latest.json`` / ``train_latest.md`` (stage 1:
``train_stage1_latest.*``) under --out.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO / "tests"))
from comfy_harness import load_module as _load  # noqa: E402


def random_text(captions, hw):
    """(context [B, 77, 2048], y [B, 2816]) — one fixed random conditioning (CLIP-L/G are not built)."""
    import torch
    g = torch.Generator().manual_seed(7)
    c, y = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 2816, generator=g)
    return c.expand(len(captions), -1, -1).clone(), y.expand(len(captions), -1).clone()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024, help="training resolution (square)")
    ap.add_argument("--steps", type=int, default=12, help="steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    ap.add_argument("--configs", default="bf16:on,bf16:off,fp16:on,fp16:off",
                    help="autocast:checkpointing pairs (bf16|fp16|no : on|off)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny UNet, for checking the script on a CPU")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=2, help="2: the router; 1: the subject encoder")
    ap.add_argument("--reference", choices=("auto", "native", "shared", "off"), default="auto",
                    help="the reference branch while training (scripts/train_router.py --reference)")
    ap.add_argument("--ref-size", type=int, default=512, help="side of the reference views the ReferenceNet sees")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.warmup = min(args.size, 128), min(args.steps, 3), min(args.warmup, 1)
        args.ref_size = min(args.ref_size, 64)

    B = _load("anystory_benchmark", REPO / "bench" / "benchmark.py")
    import torch
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    B.import_comfy(cpu=not cuda)
    TR = _load("train_router", REPO / "scripts" / "train_router.py")
    A = TR.core()
    import anystory.synthetic as synthetic
    from anystory.adapter import KIND_IPADAPTER_PLUS

    t0 = time.time()
    patcher, vae, clip_vision = B.build_models(device, torch.float16 if cuda else torch.float32, args.quick)
    layout = A.layers.discover_layout(patcher.model.diffusion_model)
    n_unet = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    print(f"[train-bench] random SDXL UNet ({n_unet / 1e9:.2f} B, {len(layout)} cross-attention layers), VAE, "
          f"CLIP-H built in {time.time() - t0:.1f} s on {device}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="anystory-train-bench-"))
    A.train.make_shapes_dataset(tmp / "data", args.images, size=args.size, seed=0)
    results = []
    for spec in filter(None, args.configs.split(",")):
        prec, ckpt = spec.split(":")
        # a fresh random IP-Adapter Plus subject branch per configuration (the router is attached to it)
        adapter = synthetic.random_adapter(layout, kind=KIND_IPADAPTER_PLUS, seed=1,
                                           dtype=torch.float16 if cuda else torch.float32)
        comps = TR.Components(model=patcher, vae=vae, clip_vision=clip_vision, adapter=adapter, text=random_text,
                              names={"checkpoint": "random full SDXL", "clip_vision": "random CLIP-H",
                                     "adapter": "random ip-adapter-plus"})
        argv_t = ["--data", str(tmp / "data"), "--out", str(tmp / f"out-{prec}-{ckpt}.safetensors"),
                  "--steps", str(args.steps), "--resolution", str(args.size), "--mixed-precision", prec,
                  "--device", str(device), "--no-progress", "--save-every", "0", "--warmup", "0",
                  "--stage", str(args.stage), "--reference", args.reference, "--ref-size", str(args.ref_size)]
        if ckpt == "on":
            argv_t.append("--grad-checkpointing")
        print(f"[train-bench] === {prec} autocast, gradient checkpointing {ckpt}", flush=True)
        try:
            if cuda:
                torch.cuda.empty_cache()
            res = TR.train(argv_t, components=comps)
        except torch.OutOfMemoryError as e:  # report, keep the other rows
            print(f"[train-bench] out of memory: {e}", flush=True)
            results.append({"autocast": prec, "grad_checkpointing": ckpt == "on", "error": "out of memory"})
            continue
        secs = [h["seconds"] for h in res["history"]][args.warmup:]
        row = {"autocast": prec, "grad_checkpointing": ckpt == "on", "steps_timed": len(secs),
               "ms_per_step": round(statistics.median(secs) * 1000, 1),
               "ms_per_step_min": round(min(secs) * 1000, 1),
               "peak_vram_gb": None if res["peak_vram_gb"] is None else round(res["peak_vram_gb"], 2),
               "final_loss": round(res["losses"]["loss"], 4), "final_routing_loss": round(res["losses"]["routing"], 4)}
        results.append(row)
        print(f"[train-bench] {row}", flush=True)
        del adapter, comps, res

    devname = torch.cuda.get_device_name(device) if cuda else "cpu"
    data = {"device": devname, "date": dt.date.today().isoformat(), "torch": torch.__version__,
            "size": args.size, "batch": 1, "subjects_per_image": 2, "steps": args.steps, "warmup_steps": args.warmup,
            "unet_params": n_unet, "layers": len(layout), "quick": args.quick, "stage": args.stage,
            "reference": args.reference, "ref_size": args.ref_size, "configs": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = ("train_latest" if not args.quick else "train_quick") if args.stage == 2 else \
        ("train_stage1_latest" if not args.quick else "train_stage1_quick")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    trained = (f"routing QFormer + {len(layout)} routers" if args.stage == 2 else
               f"subject QFormer + {len(layout)} Ŵ + {len(layout)} W̃ (+ the ReferenceNet with reference native)")
    lines = [f"# AnyStory stage-{args.stage} training — {devname}, {data['date']}", "",
             f"SDXL UNet {'(quick, tiny)' if args.quick else 'full shapes'} ({n_unet / 1e9:.2f} B, {len(layout)} "
             f"layers), random weights stored fp16; {args.size}², batch 1, 2 instances per image; trained: {trained} "
             f"(AdamW); reference branch {args.reference} (views at {args.ref_size}²); median of "
             f"{args.steps - args.warmup} steps after {args.warmup} warm-up; a step includes CLIP-H on the "
             "augmented reference crops.", "",
             "| autocast | gradient checkpointing | ms/step | peak VRAM GB |", "|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['autocast']} | {'on' if r['grad_checkpointing'] else 'off'} | {r['error']} | – |")
        else:
            lines.append(f"| {r['autocast']} | {'on' if r['grad_checkpointing'] else 'off'} | {r['ms_per_step']} | "
                         f"{r['peak_vram_gb'] if r['peak_vram_gb'] is not None else '–'} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
