#!/usr/bin/env python3
"""Dispatched PyTorch ops per SDXL UNet call from AnyStory's hooks (host-side work, which is what the
patched sampling is bound by on a fast GPU) — on the CPU, no ComfyUI, no weights needed.

    python bench/opcount.py [--subjects 2]

It drives ``anystory.patch.RoutedPatch`` over the 70 attention layers of SDXL's layout (public weights:
IP-Adapter Plus tokens, shared-UNet references, attention router; a 256² image so it runs in seconds —
op counts do not depend on the size) in the order ComfyUI calls the hooks, and counts every op that
reaches the dispatcher, per hook, for a steady step (after the run's set-up): once with the hook bodies
run eagerly (graphs off, or off CUDA), once as on CUDA with graphs (anystory.graphs), where a body
replayed from its graph counts as one op ("graph replay"; the CPU stands in for the device here, so the
replay runs the body uncounted).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anystory.attention_router import AttentionRouter, observed_layers  # noqa: E402
from anystory.layers import LayerLayout  # noqa: E402
from anystory.paper.attention import sdpa  # noqa: E402
from anystory.paper.reference import ReferenceFeatures  # noqa: E402
from anystory.patch import CallState, RoutedPatch, RoutingInputs, chunks_from_roles  # noqa: E402
from anystory.recorder import RoutingRecorder  # noqa: E402
from anystory.routing import AttentionRouting  # noqa: E402
from anystory.synthetic import random_adapter  # noqa: E402

# SDXL's attention layers (block key, width) and their token grids for a 256² image (latent 32²)
SDXL = [(("input", 4), 2, 640), (("input", 5), 2, 640), (("input", 7), 10, 1280), (("input", 8), 10, 1280),
        (("middle", 0), 10, 1280)] + [(("output", i), 10, 1280) for i in (0, 1, 2)] + \
       [(("output", i), 2, 640) for i in (3, 4, 5)]
GRID = {640: (16, 16), 1280: (8, 8)}


class _Replay:
    """A stand-in for a captured CUDA graph: replaying runs the body with counting suspended."""

    def __init__(self, ctr, body, inputs):
        self.ctr, self.body, self.inputs = ctr, body, inputs

    def replay(self):
        self.ctr.counts[(self.ctr.where, "graph replay")] += 1
        self.ctr.paused = True
        try:
            self.body(*self.inputs)
        finally:
            self.ctr.paused = False


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.where = "?"
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.counts[(self.where, func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count(n, layout, specs, grid, inputs, graphs: bool) -> None:
    router = AttentionRouting(AttentionRouter(n, warmup_steps=0, layers=observed_layers(layout)), n + 1)
    attn1 = {key: SimpleNamespace(to_k=lambda g: g * 1.0, to_v=lambda g: g * 0.5) for key, _, _ in specs}
    rp = RoutedPatch(random_adapter(layout, kind="ip-adapter-plus-sdxl"), layout, inputs, router, attn1=attn1,
                     recorder=RoutingRecorder(n))
    ctr = Counter()
    if graphs:  # as on CUDA: every body through HookGraphs, "captured" into a counting stand-in
        rp.graphs.enabled = True
        rp.graphs.usable = lambda *t: True
        rp.graphs._capture = lambda body, ins, device: (_Replay(ctr, body, ins), body(*ins))
    rp.precompute_routes()
    rp.begin_run()
    labels = [[[2 + 3 * i, 3 + 3 * i] for i in range(n)], None]
    for step in range(6):  # steps 0-4: the run's caches, the router's maps, the graphs; step 5 is counted
        ctr.counts.clear()
        state = CallState(chunks_from_roles([True, False], 1), step=step)
        state.labels = labels
        for key, dim, heads in specs:
            h, w = grid[key]
            q, k, v, z = (torch.randn(2, h * w, dim) for _ in range(4))
            kt, vt = torch.randn(2, 77, dim), torch.randn(2, 77, dim)
            with ctr:
                ctr.where = "attn1 (eq. 6-8)"
                rp.self_attention(state, key, q, k, v, heads, (h, w), lambda q, k, v: sdpa(q, k, v, heads))
                ctr.where = "router"
                rp.route(state, key, z, (h, w))
                ctr.where = "attn2 (text + eq. 5)"
                rp.cross_attention(state, key, q, kt, vt, heads, lambda q, k, v: sdpa(q, k, v, heads),
                                   text_sdpa=torch.nn.functional.scaled_dot_product_attention, base_owned=True)
    rp.end_run()
    per_hook = collections.Counter()
    for (where, _), c in ctr.counts.items():
        per_hook[where] += c
    print(f"dispatched ops per SDXL UNet call, {n} subject(s), public weights (steady step), "
          f"{'hook bodies replayed from CUDA graphs' if graphs else 'hook bodies eager'}: {sum(per_hook.values())}")
    for where, c in per_hook.items():
        top = sorted(((op, k) for (w, op), k in ctr.counts.items() if w == where), key=lambda x: -x[1])[:8]
        print(f"  {where:22s} {c:6d}   " + ", ".join(f"{op} {k}" for op, k in top))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=2)
    args = ap.parse_args(argv)
    n = args.subjects
    torch.manual_seed(0)
    specs = [((blk[0], blk[1], d), dim, dim // 64) for blk, depth, dim in SDXL for d in range(depth)]
    layout = LayerLayout(specs)
    grid = {key: GRID[dim] for key, dim, _ in specs}
    refs = ReferenceFeatures({k: torch.randn(n, 4 * h * w, dim) for (k, dim, _), (h, w) in
                              ((s, grid[s[0]]) for s in specs)},
                             {k: (2 * h, 2 * w) for k, (h, w) in grid.items()})
    inputs = RoutingInputs(E=torch.randn(n + 1, 16, 2048), eta=torch.ones(n + 1), gamma=torch.ones(n), refs=refs)
    for graphs in (False, True):
        count(n, layout, specs, grid, inputs, graphs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
