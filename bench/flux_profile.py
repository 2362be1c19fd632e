#!/usr/bin/env python3
"""Where an AnyStory FLUX step's time and memory go (GPU; FLUX.1-dev shapes, random weights, as
``bench/flux_benchmark.py`` builds them — same carry, same environment).

    python bench/flux_profile.py --parts attn,ablate,profile --out $OUT/profile

- ``attn``: the joint attention of one block at the benchmark's shapes, each SDPA backend, with the forms the
  pack can use (the plain FLUX attention beside it);
- ``ablate``: ms/step and peak VRAM of the pack with pieces switched off (router, references, Redux), plain
  FLUX beside each, and the device memory the AnyStory weights and the reference cache hold;
- ``profile``: torch.profiler of a few steps, plain and AnyStory: the CUDA kernels by total time, and the CUDA time
  of each function of ``anystory/flux/blocks.py`` (profiler ranges; each appears twice: the kernels it launched,
  and its span on the GPU).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flux_benchmark as fb  # noqa: E402


def cuda_ms(fn, reps: int = 20) -> float:
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def attn_part(log) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fast = fb.pack_module("anystory.flux.fast")
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, D, T, I, R, Vis = 24, 128, 512 + 162, 4096, 9, 870
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    Q = T + I
    plain = [rnd(1, H, 4608, D) for _ in range(3)]
    q, k, v = rnd(1, H, Q, D), rnd(1, H, Q, D), rnd(1, H, Q, D)
    refs = {j: (rnd(1, H, Vis // 2, D), rnd(1, H, Vis // 2, D)) for j in range(2)}
    rmap = torch.zeros(1, 2, I, device=dev, dtype=dt)
    rmap[:, 0, : I // 2] = 1
    rmap[:, 1, I // 2:] = 1
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}

    def timed(name, fn):
        for bname, be in backends.items():
            try:
                if be is None:
                    ms = cuda_ms(fn)
                else:
                    with sdpa_kernel([be]):
                        ms = cuda_ms(fn)
                log(f"attn {name:48s} {bname:9s} {ms:7.3f} ms")
            except RuntimeError as e:
                log(f"attn {name:48s} {bname:9s} unsupported ({str(e).splitlines()[0][:80]})")

    kr = torch.cat([k] + [refs[j][0] for j in range(2)], 2)
    vr = torch.cat([v] + [refs[j][1] for j in range(2)], 2)
    timed("plain FLUX (4608 × 4608, D 128)", lambda: F.scaled_dot_product_attention(*plain))
    timed(f"keys + refs, no bias ({Q} × {Q + Vis}, D 128)", lambda: F.scaled_dot_product_attention(q, kr, vr))
    for routed, redux in ((True, True), (True, False), (False, False)):
        plan = fast.KeyPlan([0] * 81 + [1] * 81 if redux else [], 512, I, [0, 1], [0.0, 0.0], 2, routed=routed)
        tq = Q if redux else Q - 162

        def grouped(plan=plan, tq=tq, routed=routed):
            log_w = fast.subject_log_weights(tq - I, I, 2, 1, dev, rmap) if routed else None
            return fast.joint_attention(q[:, :, :tq], k[:, :, :tq], v[:, :, :tq], plan, refs, log_w)
        log(f"attn pack: key groups, router {'on' if routed else 'off'}, Redux {'on' if redux else 'off'} "
            f"({tq} queries, {len(plan.groups) + 1} groups) {cuda_ms(grouped):7.3f} ms (kernel "
            f"{fast._KERNEL.get(('cuda', dt, D)).__name__})")
    ops = torch.ops.aten
    for lse in (False, True):
        ms = cuda_ms(lambda: ops._scaled_dot_product_cudnn_attention(q, k[:, :, 162:], v[:, :, 162:], None, lse))
        log(f"attn cudnn op, shared keys as a view ({Q} × {Q - 162}), log-sum-exp {lse}: {ms:7.3f} ms")
    log(f"attn cudnn op, one subject (81 + {Vis // 2} keys): "
        f"{cuda_ms(lambda: ops._scaled_dot_product_cudnn_attention(q, refs[0][0], refs[0][1], None, True)):7.3f} ms")
    r_q = rnd(1, H, 18, D)
    blocks = fb.pack_module("anystory.flux.blocks")
    log(f"attn router tokens over image + routing keys "
        f"{cuda_ms(lambda: blocks._router_attention(r_q, k[:, :, 674:], v[:, :, 674:], r_q, r_q)):7.3f} ms")
    # the fast form against the dense bias (the authors' form) at these shapes, in bf16
    routing = fb.pack_module("anystory.flux.routing")
    order = torch.cat([torch.arange(162, 674), torch.arange(162), torch.arange(674, Q)]).to(dev)
    lay = routing.TokenLayout(prompt=512, redux=162, image=I, ref=Vis // 2 * 2, num_conds=2)
    bias = routing.attention_bias(lay, 1, dt, dev, None, 0.0, rmap)
    cols = torch.cat([order, torch.arange(Q, Q + Vis // 2 * 2, device=dev)])
    want = F.scaled_dot_product_attention(q[:, :, order], kr[:, :, cols], vr[:, :, cols],
                                          attn_mask=bias).transpose(1, 2).reshape(1, Q, H * D)
    plan = fast.KeyPlan([0] * 81 + [1] * 81, 512, I, [0, 1], [0.0, 0.0], 2, routed=True)
    got = fast.joint_attention(q, k, v, plan, refs, fast.subject_log_weights(674, I, 2, 1, dev, rmap))
    err = (got[:, order].float() - want.float()).abs().max().item()
    log(f"attn check: key groups vs the dense bias (bf16, full shapes): max |Δ| {err:.3e} (|out| max "
        f"{want.abs().max().item():.3e})")


def ablate_part(b: "fb.Bench", log, steps: int) -> None:
    import torch
    pack = fb.load_pack()
    anystory, _ = fb.make_anystory(b.cfg, b.args.lora_rank, b.device, b.dtype, False)
    log(f"AnyStory weights on the device: {anystory.adapter.nbytes() / 2 ** 30:.3f} GB; reference LoRA (host) "
        f"{anystory.adapter.reference_nbytes() / 2 ** 30:.3f} GB")
    subs = fb.pack_subjects(anystory, fb.subject_inputs(b.cfg, 2))
    variants = {
        "full (authors' 2-subject demo)": {},
        "router off": dict(router="off"),
        "references off": dict(ref_start=1.0, ref_end=1.0),
        "Redux off": dict(redux_scale=0.0),
        "router off, references off": dict(router="off", ref_start=1.0, ref_end=1.0),
        "references every step (no cache)": dict(ref_cache=False),
    }
    b.comfy_sampling(b.model, 2)
    for name, over in variants.items():
        opts = pack.NODE_CLASS_MAPPINGS["AnyStoryFluxOptions"]().options(**dict(fb.SETTINGS, **over))[0]
        patched, _ = pack.NODE_CLASS_MAPPINGS["AnyStoryApply"]().apply(b.model, anystory, subs, flux_options=opts)
        b.comfy_sampling(patched, 3)
        rows = []
        for _ in range(2):
            p = b.comfy_sampling(b.model, steps)
            a = b.comfy_sampling(patched, steps)
            rows.append((a[0] / p[0], a[0], p[0], a[2] - p[2], a[1]))
        med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
        log(f"ablate {name:36s} {med(1):7.1f} ms/step  × plain {med(0):.3f} (plain {med(2):.1f})  peak over plain "
            f"{med(3):.3f} GB  total {med(4):.2f} s")
        del patched
    torch.cuda.empty_cache()


REGIONS = ("_route", "_router_attention", "joint_attention", "_text_router_qkv", "_text_router_post", "modulation_pair",
           "subject_log_weights", "_stream_qkv", "_stream_post", "modulation", "double_block_forward",
           "single_block_forward")


def label_regions():
    """Wrap the FLUX block functions in profiler ranges ("as::<name>": their CUDA time in the table)."""
    import functools

    import torch
    blocks = fb.pack_module("anystory.flux.blocks")
    patch = fb.pack_module("nodes.flux.patch")
    for name in REGIONS:
        fn = getattr(blocks, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            with torch.profiler.record_function(f"as::{_name}"):
                return _fn(*a, **k)
        functools.update_wrapper(wrapped, fn)
        setattr(blocks, name, wrapped)
        if hasattr(patch, name):
            setattr(patch, name, wrapped)


def profile_part(b: "fb.Bench", log, out: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    label_regions()
    pack = fb.load_pack()
    anystory, _ = fb.make_anystory(b.cfg, b.args.lora_rank, b.device, b.dtype, False)
    subs = fb.pack_subjects(anystory, fb.subject_inputs(b.cfg, 2))
    opts = pack.NODE_CLASS_MAPPINGS["AnyStoryFluxOptions"]().options(**dict(fb.SETTINGS, ref_start=0.0,
                                                                            redux_scale=0.0))[0]  # typical steps
    patched, _ = pack.NODE_CLASS_MAPPINGS["AnyStoryApply"]().apply(b.model, anystory, subs, flux_options=opts)
    for name, model in (("plain", b.model), ("anystory", patched)):
        b.comfy_sampling(model, 2)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            b.comfy_sampling(model, 4)
            log(f"profile {name}: 4 steps {time.perf_counter() - t0:.2f} s (profiled)")
        events = prof.key_averages()
        table = events.table(sort_by="cuda_time_total", row_limit=80, max_name_column_width=70)
        (out / f"profile_{name}.txt").write_text(table)
        log(f"profile {name}:\n" + "\n".join(table.splitlines()[:30]))
        for e in sorted(events, key=lambda e: -e.device_time_total):
            if e.key.startswith("as::"):
                log(f"region {name} {e.key:32s} calls {e.count:6d}  CUDA {e.device_time_total / 1e3:8.2f} ms")
        kernels = sum(e.self_device_time_total for e in events
                      if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("as::"))
        log(f"profile {name}: CUDA kernels total {kernels / 1e3:.1f} ms, CPU (profiled) "
            f"{sum(e.self_cpu_time_total for e in events) / 1e3:.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="attn,ablate,profile")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="flux_profile")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    import torch
    parts = args.parts.split(",")
    with torch.inference_mode():
        fb.import_comfy(cpu=False)
        fb.load_pack()
        log(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        if "attn" in parts:
            attn_part(log)
        if "ablate" in parts or "profile" in parts:
            bargs = argparse.Namespace(device="cuda", size=1024, steps=args.steps, repeats=1, subjects=2,
                                       lora_rank=128, quick=False)
            b = fb.Bench(bargs)
            if "ablate" in parts:
                ablate_part(b, log, args.steps)
            if "profile" in parts:
                profile_part(b, log, out)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
