"""CUDA graphs of the hook bodies (eq. 5 at attn2, eq. 6-8 at attn1), one per layer and hook.

Plain SDXL in ComfyUI is bound by the host on a fast GPU: every op a hook adds costs its launch time in
wall time, GPU work mostly does not. A hook body (stage q/k/v with their routing dims, attend, merge the
heads, add the routed term) is a dozen ops whose shapes and inputs repeat step after step, so it is
captured once per layer into a CUDA graph and replayed as one launch.

What a body may read and write:
- *inputs*: the tensors ComfyUI hands the hook (q, k, v of this call), passed as ``body(*inputs)``. A
  graph reads them at the address they had when it was captured, so it is replayed only when this
  call's tensors lie at that same address with the same shape and strides (ComfyUI's UNet allocates
  the same way every step, so after the first captured step they usually do). Where they moved, another
  variant is captured; the last of ``max_variants`` is *staged*: it reads copies of the inputs in
  buffers of its own (one copy per input per call, still one launch for the body). Past that (other
  shapes) the body runs eagerly. Inputs are never kept alive here.
- *statics*: tensors fixed for the sampling run (staging buffers, reference K̃/Ṽ, route K/V, the
  output buffer); a graph is replayed only while the very same objects are passed (they are kept
  alive with the graph).
- it returns a tensor that lives outside the graph's memory (a buffer allocated before the capture),
  which the caller consumes before the next call of a body sharing that buffer. A tensor allocated
  inside the capture would live in the shared pool, where later graphs' intermediates overwrite it.

A slot's first call runs eagerly (kernel selection, lazy initialisation, the run's caches); the second
is captured, on a side stream, in a memory pool shared by all graphs of the run (intermediates of one
body are dead when it returns, so the bodies can share it), and replayed. Graphs are dropped with the
run (:meth:`clear`). Off CUDA, while autograd records, while another capture is under way, or after a
capture failed (logged once; the run goes on eagerly) the body simply runs. ``ANYSTORY_CUDA_GRAPHS=0``
turns graphs off.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

from .attention import autograd_records

log = logging.getLogger("anystory")


def graphs_enabled_by_env() -> bool:
    return os.environ.get("ANYSTORY_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")


class HookGraphs:
    """The CUDA graphs of one RoutedPatch's hook bodies for one sampling run."""

    def __init__(self, enabled: Optional[bool] = None, warmup: int = 1, max_variants: int = 3):
        self.enabled = graphs_enabled_by_env() if enabled is None else bool(enabled)
        self.warmup = int(warmup)
        self.max_variants = int(max_variants)
        self._slots: dict = {}
        self._inputs: dict = {}
        self._pool = None
        self._streams: dict = {}
        self._failed = False
        self.last_error = None
        self.stats = {"replay": 0, "capture": 0, "eager": 0}

    def clear(self) -> None:
        """Drop every graph (and with the last one the shared memory pool); a capture that failed in the
        last run is tried again in the next."""
        self._failed = False
        self.last_error = None
        self._slots = {}
        self._inputs = {}
        self._pool = None
        self._streams = {}

    def usable(self, *tensors: torch.Tensor) -> bool:
        """Graphs can serve a call on these tensors (CUDA, no autograd, no capture under way)."""
        if not self.enabled or self._failed:
            return False
        if not all(t.is_cuda for t in tensors) or autograd_records(*tensors):
            return False
        return not torch.cuda.is_current_stream_capturing()

    @staticmethod
    def _signature(inputs) -> tuple:
        return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in inputs)

    def run(self, slot, inputs: tuple, statics: tuple, body: Callable[..., torch.Tensor],
            watch: tuple = ()) -> torch.Tensor:
        """body(*inputs) through the slot's graph (replayed, captured now, or eagerly: see the module doc).
        ``watch``: tensors the body reads that are not its own (module weights): a graph is replayed only
        while they stay at the address they had at capture."""
        sig = self._signature(inputs)
        shapes = tuple(x[1:] for x in sig)
        ids = tuple(id(s) for s in statics) + tuple(t.data_ptr() for t in watch)
        ent = self._slots.get(slot)
        if ent is None:
            ent = self._slots[slot] = [0, []]
        for v_sig, v_ids, graph, out, staged, _statics in ent[1]:
            if v_ids == ids and v_sig == (sig if staged is None else shapes):
                for dst, src in zip(staged or (), inputs):
                    dst.copy_(src)
                graph.replay()
                self.stats["replay"] += 1
                return out
        ent[0] += 1
        if ent[0] <= self.warmup or len(ent[1]) >= self.max_variants:
            self.stats["eager"] += 1
            return body(*inputs)
        staged = None
        if len(ent[1]) == self.max_variants - 1:  # the last variant reads copies of the inputs
            staged = self._staged_inputs(inputs)
            for dst, src in zip(staged, inputs):
                dst.copy_(src)
        captured = self._capture(body, staged if staged is not None else inputs, inputs[0].device)
        if captured is None:
            self.stats["eager"] += 1
            return body(*inputs)
        graph, out = captured
        # the statics are kept alive with the graph: their ids cannot be taken by other objects meanwhile
        ent[1].append((shapes if staged is not None else sig, ids, graph, out, staged, statics))
        self.stats["capture"] += 1
        graph.replay()
        return out

    def _staged_inputs(self, inputs) -> tuple:
        """Buffers of the inputs' shapes and strides that a staged variant reads (shared by the slots:
        bodies run one after the other)."""
        out = []
        for i, t in enumerate(inputs):
            key = (i, t.shape, t.stride(), t.dtype, t.device)
            buf = self._inputs.get(key)
            if buf is None:
                buf = self._inputs[key] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
            out.append(buf)
        return tuple(out)

    def _capture(self, body, inputs, device):
        cur = torch.cuda.current_stream(device)
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        side.wait_stream(cur)
        try:
            with torch.cuda.device(device), torch.cuda.stream(side):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    out = body(*inputs)
                finally:
                    graph.capture_end()
        except Exception as e:  # noqa: BLE001 — any failure: the run goes on without graphs
            self._failed = True
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("AnyStory: CUDA graph capture failed (%s: %s); this run continues without graphs",
                        type(e).__name__, e)
            return None
        finally:
            cur.wait_stream(side)
        return graph, out
