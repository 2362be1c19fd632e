#!/usr/bin/env python3
"""Which SDPA backend is fastest for the attention shapes of the patch (GPU only):

    python bench/sdpa_backends.py

Eq. 6-8 attends the cond rows' queries to [own tokens; subjects' reference tokens] with heads widened by
8 routing dims (64 → 72); eq. 5's routed term attends to the (N+1)·16 route tokens. Prints µs per call
(CUDA events, 20 calls after 3 warm-ups) for flash, cuDNN and memory-efficient attention at head widths
64 / 72 / 128, and the kernel that ComfyUI's priority (cuDNN first) picks.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

CASES = {  # name → (batch, heads, queries, keys), SDXL 1024², 2 subjects with 512² references
    "eq. 6-8, 64² grid, cond row": (1, 10, 4096, 6144),
    "eq. 6-8, 32² grid, cond row": (1, 20, 1024, 1536),
    "plain attn1, 64² grid": (1, 10, 4096, 4096),
    "eq. 5 routed term, 32² grid": (2, 20, 1024, 48),
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
COMFY_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def main() -> int:
    dev, dt = "cuda", torch.float16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, (B, H, Lq, Lk) in CASES.items():
        for D in (64, 72, 128):
            q = torch.randn(B, H, Lq, D, device=dev, dtype=dt)
            k, v = torch.randn(B, H, Lk, D, device=dev, dtype=dt), torch.randn(B, H, Lk, D, device=dev, dtype=dt)
            res = {}
            for bname, be in BACKENDS.items():
                try:
                    with sdpa_kernel([be]):
                        for _ in range(3):
                            F.scaled_dot_product_attention(q, k, v, scale=64 ** -0.5)
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        for _ in range(20):
                            F.scaled_dot_product_attention(q, k, v, scale=64 ** -0.5)
                        e1.record()
                        torch.cuda.synchronize()
                        res[bname] = round(e0.elapsed_time(e1) / 20 * 1000, 1)
                except RuntimeError as e:
                    res[bname] = f"n/a ({str(e)[:50]})"
            with sdpa_kernel(COMFY_ORDER, set_priority=True), profile(activities=[ProfilerActivity.CUDA]) as p:
                F.scaled_dot_product_attention(q, k, v, scale=64 ** -0.5)
                torch.cuda.synchronize()
            picked = [e.key[:48] for e in p.key_averages() if "sdpa" in e.key.lower() or "flash" in e.key.lower()
                      or "fmha" in e.key.lower()][:1]
            print(f"{name:30s} D {D:3d}  µs {res}  cuDNN-first picks {picked}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
