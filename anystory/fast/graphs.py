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
  buffers of its own (one copy per input per call, still one launch for the body; the buffers, one set
  per input shape, cost up to ≈ 50 MB at 1024²). Past that (other shapes) the body runs eagerly. Inputs
  are never kept alive here. After another sampling the allocator's addresses can take a few steps to
  settle (the benchmark saw up to four address sets per slot where public-weight runs follow plain
  ones), so five direct variants come before the staged one.
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
import weakref
from typing import Callable, Optional

import torch

from .grouped import autograd_records

log = logging.getLogger("anystory")


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment setting: unset or empty → ``default``; 0 / false / no / off → off; else on."""
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


def graphs_enabled_by_env() -> bool:
    return env_flag("ANYSTORY_CUDA_GRAPHS", True)


_CAPTURE_STREAMS: dict = {}


def capture_stream(device) -> "torch.cuda.Stream":
    """The side stream graphs are captured on, one per device for the whole process: libraries keep
    per-stream state (cuBLAS allocates a 32 MB workspace for every new stream it meets, and keeps it), so
    a new stream per capture would leave that much VRAM behind each time."""
    device = torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get(key)
    if stream is None:
        stream = _CAPTURE_STREAMS[key] = torch.cuda.Stream(device)
    return stream


def capture_graph(fn: Callable, inputs: tuple, device, pool=None):
    """(graph, fn(*inputs)) captured on the device's capture stream (into ``pool``, else a private one);
    raises whatever the capture raised."""
    cur = torch.cuda.current_stream(device)
    side = capture_stream(device)
    side.wait_stream(cur)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.device(device), torch.cuda.stream(side):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = fn(*inputs)
            finally:
                graph.capture_end()
    finally:
        cur.wait_stream(side)
    return graph, out


class HookGraphs:
    """The CUDA graphs of one RoutedPatch's hook bodies for one sampling run."""

    def __init__(self, enabled: Optional[bool] = None, warmup: int = 1, max_variants: int = 6):
        self.enabled = graphs_enabled_by_env() if enabled is None else bool(enabled)
        self.warmup = int(warmup)
        self.max_variants = int(max_variants)
        self._slots: dict = {}
        self._inputs: dict = {}
        self._pool = None
        self._failed = False
        self.last_error = None
        self.stats = {"replay": 0, "capture": 0, "eager": 0, "staged": 0}  # staged: captures of a staged variant

    def clear(self) -> None:
        """Drop every graph (and with the last one the shared memory pool); a capture that failed in the
        last run is tried again in the next."""
        self._failed = False
        self.last_error = None
        self._slots = {}
        self._inputs = {}
        self._pool = None

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

    def run(self, slot, inputs: tuple, statics: tuple, body: Callable[..., torch.Tensor]) -> torch.Tensor:
        """body(*inputs) through the slot's graph (replayed, captured now, or eagerly: see the module doc)."""
        sig = self._signature(inputs)
        shapes = tuple(x[1:] for x in sig)
        ids = tuple(id(s) for s in statics)
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
        self.stats["staged"] += staged is not None
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
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            return capture_graph(body, inputs, device, pool=self._pool)
        except Exception as e:  # noqa: BLE001 — any failure: the run goes on without graphs
            self._failed = True
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("AnyStory: CUDA graph capture failed (%s: %s); this run continues without graphs",
                        type(e).__name__, e)
            return None


def _module_is_static(owner: torch.nn.Module, device: torch.device) -> Optional[tuple]:
    """The addresses of ``owner``'s weights (parameters and buffers) when all of them lie on ``device`` and
    no layer computes its weight at call time (ComfyUI's low-VRAM casts and on-the-fly LoRA patches keep
    ``weight_function`` / ``bias_function`` lists on the layer); else None: a graph would bake in stale
    weights."""
    ptrs = []
    add = ptrs.append
    for mod in owner.modules():  # one pass over the module tree (the only host cost of the check)
        # (the instance's and its class's dicts: a getattr that misses costs nn.Module an exception)
        if mod.__dict__.get("weight_function") or mod.__dict__.get("bias_function") \
                or getattr(type(mod), "weight_function", None) or getattr(type(mod), "bias_function", None):
            return None
        for tensors in (mod._parameters, mod._buffers):
            for t in tensors.values():
                if t is not None:
                    if t.device != device:
                        return None
                    add(t.data_ptr())
    return tuple(ptrs)


class ForwardGraphs:
    """CUDA graphs of whole encoder forwards (the ReferenceNet pass, CLIP vision), kept across encodes.

    Subject encoding runs a UNet and a ViT on one image at a fixed size (every subject is cropped to 512²
    and 224²): thousands of small launches, so the host sets the pace (several times the GPU work of the
    ReferenceNet pass; bench/README.md has the measurements). A forward ``fn(*inputs)`` runs eagerly the
    first time a ``key`` is seen, is captured the second time (on a side stream, into a private memory
    pool) and is replayed after that, its inputs copied into the graph's own input buffers.

    - The graph bakes in the addresses of ``owner``'s weights. It is replayed only while every parameter
      and buffer of ``owner`` lies where it lay at capture, on the inputs' device, with no weight computed
      at call time (:func:`_module_is_static`); ComfyUI moving, re-patching (LoRA) or unloading the model
      changes that, and the graph is dropped (and captured anew the next time).
    - The outputs are tensors of the graph's pool, rewritten by the next replay of the same key: the caller
      copies out what it keeps before it calls again.
    - At most ``max_entries`` graphs are kept (least recently used dropped). Each holds its pool (the
      forward's intermediates and outputs: ≈ 0.1 GB for the SDXL ReferenceNet pass at 512²) until
      :meth:`release` — at the start of every sampling run with AnyStory, so the subjects of one prompt
      share the graphs and sampling does not pay for them. On GPUs with less than ``min_vram_gb`` the
      forwards run eagerly.
    - Off CUDA, while autograd records, during another capture, with ``ANYSTORY_CUDA_GRAPHS=0``, or after
      a key's capture failed (logged once), ``fn`` simply runs.
    """

    def __init__(self, enabled: Optional[bool] = None, warmup: int = 1, max_entries: int = 4,
                 min_vram_gb: float = 12.0):
        self.enabled = enabled
        self.warmup = int(warmup)
        self.max_entries = int(max_entries)
        self.min_vram_gb = float(min_vram_gb)
        self._entries: dict = {}  # key → [owner weakref, weight addresses, graph, static inputs, outputs, sig]
        self._seen: dict = {}  # key → eager calls so far
        self._failed: set = set()
        self.stats = {"replay": 0, "capture": 0, "eager": 0}

    def clear(self) -> None:
        self._entries.clear()
        self._seen.clear()
        self._failed.clear()

    def release(self) -> None:
        """Drop the graphs and their memory (AnyStory Apply calls this when a sampling run starts, so the
        encoders' graphs add nothing to sampling's VRAM); a key already run once is captured again at its
        next call."""
        self._entries.clear()

    def _usable(self, inputs) -> bool:
        enabled = graphs_enabled_by_env() if self.enabled is None else self.enabled
        if not enabled or not inputs or not all(torch.is_tensor(t) and t.is_cuda for t in inputs):
            return False
        if autograd_records(*inputs) or torch.cuda.is_current_stream_capturing():
            return False
        total = torch.cuda.get_device_properties(inputs[0].device).total_memory
        return total >= self.min_vram_gb * 2 ** 30

    def run(self, key, fn: Callable, inputs: tuple, owner: torch.nn.Module):
        """fn(*inputs) (any nest of tensors and plain values) through the key's graph, or eagerly."""
        if key in self._failed or not self._usable(inputs):
            self.stats["eager"] += 1
            return fn(*inputs)
        ent = self._entries.get(key)
        seen = self._seen.get(key, 0)
        if ent is None and seen < self.warmup:  # warm-up: eager, no need to look at the weights yet
            self._seen[key] = seen + 1
            self.stats["eager"] += 1
            return fn(*inputs)
        device = inputs[0].device
        weights = _module_is_static(owner, device)
        if weights is None:
            self.stats["eager"] += 1
            return fn(*inputs)
        sig = tuple((t.shape, t.dtype) for t in inputs)
        if ent is not None:
            if ent[0]() is owner and ent[1] == weights and ent[5] == sig:
                for dst, src in zip(ent[3], inputs):
                    dst.copy_(src)
                ent[2].replay()
                self._entries[key] = self._entries.pop(key)  # most recently used last
                self.stats["replay"] += 1
                return ent[4]
            del self._entries[key]  # the weights moved (or another model): captured anew below
        while len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        static = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in inputs)
        try:
            graph, out = self._capture(fn, static, device)
        except Exception as e:  # noqa: BLE001 — this forward runs eagerly from now on
            self._failed.add(key)
            log.warning("AnyStory: CUDA graph capture of %s failed (%s: %s); it runs eagerly",
                        key[0] if isinstance(key, tuple) else key, type(e).__name__, e)
            self.stats["eager"] += 1
            return fn(*inputs)
        self._entries[key] = [weakref.ref(owner), weights, graph, static, out, sig]
        self.stats["capture"] += 1
        graph.replay()
        return out

    @staticmethod
    def _capture(fn, static: tuple, device):
        """(graph, outputs) of fn(*static) captured into a private pool; raises on failure."""
        return capture_graph(fn, static, device)
