"""The routed model patch of a UNet (the SDXL family): the router (§1.2), eq. 5 and eq. 6-8 wired across
the layers of one model call.

Host-independent: the host's adapter (ComfyUI: nodes/sdxl_hooks.py) calls :meth:`RoutedPatch.route`,
:meth:`~RoutedPatch.cross_attention` and :meth:`~RoutedPatch.self_attention` from its attention hooks
and supplies the plain attention; everything that decides *what* is computed lives here so it can be
tested on plain tensors.

Per model call a fresh :class:`~anystory.patch.state.CallState` carries the maps from layer to layer, in
execution order, per transformer block l:

    attn1 (eq. 6-8, uses M^{l-1})  →  route (router → M^l)  →  attn2 (eq. 5, uses M^l)

Rows of the batch come in chunks (ComfyUI batches cond and uncond). Cond rows are routed: attn2 gives each
token its subject's (or the background's) tokens, attn1 its subject's references. Uncond rows (CFG's negative
prompt) get the background route N+1 everywhere in attn2 (E_{N+1}, the zero image's tokens: the CLIP
condition dropped, as the paper's 10 % condition dropout trains it) and, by default, no references in attn1;
with ``RoutingInputs.negative_rows`` = "same references as positive" they are routed as the cond rows are
and attend to the references too (the reference condition, which training never drops) — the reasons and
the trade-off are in anystory.patch.state.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional

import torch

from ..adapter import AnyStoryAdapter
from ..fast.graphs import HookGraphs
from ..fast.grouped import GroupedBuffers, autograd_records, query_extra_table
from ..fast.injection import cross_attention_body, routed_cross_attention_fast
from ..fast.reference import reference_attention_body
from ..layers import LayerLayout
from ..paper.router import resize_index
from ..routing import SOURCE_ROUTER, LearnedRouting, Routing
from .kv import InjectionKV
from .run import RunCaches
from .state import CallState, RoutingInputs

log = logging.getLogger("anystory")


class RoutedPatch:
    """Router + routed injection for one AnyStory Apply on a UNet.

    routing: who decides M^l (anystory.routing); attn1: layer key → the denoising UNet's self-attention
    module there (its to_k/to_v project G_i^l where the adapter has no W̃_k^l, W̃_v^l; needed only with
    references). Plain attention is the
    ``base`` each hook receives (the host's own attention, or another patch that was there first); the
    routed attentions carry their routing in extra head dimensions (anystory.fast.grouped) and call
    torch's fused SDPA directly, so no backend can drop a mask."""

    def __init__(self, adapter: AnyStoryAdapter, layout: LayerLayout, inputs: RoutingInputs, routing: Routing,
                 attn1: Optional[Mapping] = None, recorder=None, cuda_graphs: Optional[bool] = None):
        """cuda_graphs: replay the hook bodies from CUDA graphs on CUDA (anystory.fast.graphs; None: unless
        ANYSTORY_CUDA_GRAPHS=0)."""
        if routing is None:
            raise ValueError("a RoutedPatch needs a routing source (anystory.routing.make_routing)")
        self.adapter = adapter
        self.layout = layout
        self.inputs = inputs
        self.routing = routing
        self.kv = InjectionKV(adapter, layout, inputs, attn1)
        self.recorder = recorder
        self.graphs = HookGraphs(cuda_graphs)
        self._buffers = GroupedBuffers()
        self.run: Optional[RunCaches] = None  # the caches of the sampling run under way

    # --- run level (one sampling) ------------------------------------------------------------------
    def begin_run(self, **meta) -> None:
        """Drop every per-run cache (reference K/V are projected with the UNet weights of this run,
        which LoRAs or other patches may have changed)."""
        self.kv.begin_run()
        self.graphs.clear()
        self.run = RunCaches(self.graphs, eta_zero=bool((self.inputs.eta == 0).all()),
                             gamma_zero=bool((self.inputs.gamma == 0).all()))
        sigmas = meta.get("sigmas")
        steps = int(sigmas.numel()) - 1 if sigmas is not None else None
        self.routing.begin_run(steps)
        warning = self.routing.run_warning(steps)
        if warning is not None:
            log.warning("AnyStory: %s", warning)
            meta = {**meta, "warning": warning}
        if self.recorder is not None:
            self.recorder.begin_run(**meta)

    def end_run(self, **meta) -> None:
        self.run = None
        self.graphs.clear()  # before the buffers: the graphs write into them
        self._buffers.clear()
        if self.recorder is not None:
            self.recorder.end_run(**meta)

    def begin_call(self, state: CallState) -> None:
        """Before a model call: the recorder makes its buffer for the run's later steps now, not in the
        middle of the call (see anystory.fast.slab.StepSlab)."""
        if self.recorder is not None and state.active:
            self.recorder.reserve(state.step)

    def _caches(self) -> RunCaches:
        if self.run is None:  # a hook called outside a sampling run (direct callers): caches of its own
            self.run = RunCaches(self.graphs)
        return self.run

    @property
    def uses_learned_router(self) -> bool:
        return self.routing.learned

    @property
    def uses_reference_proj(self) -> bool:
        """The adapter's W̃_k^l, W̃_v^l project G_i^l while sampling (its weights must be on the device)."""
        return self.inputs.refs is not None and bool(self.adapter.reference_layers)

    def precompute_routes(self, device=None) -> None:
        self.kv.precompute_routes(device)

    def route_kv(self, spec, like: torch.Tensor):
        return self.kv.route_kv(self._caches(), spec, like)

    # --- routing -------------------------------------------------------------------------------
    def route(self, state: CallState, key, n: torch.Tensor, hw: tuple) -> None:
        """attn2 entry of layer l: compute M^l (as a route index) for every row; store it in the state."""
        spec = self.layout.get(key)
        if spec is None or not state.active:
            return
        state.layer_hw[key] = tuple(hw)
        B, L, _ = n.shape
        if hw[0] * hw[1] != L or B != state.batch:
            return  # tokens re-tiled/merged by another patch: leave this layer un-routed
        # masks and the attention router decide the same for every layer of a grid within one call
        per_grid = self.routing.per_grid
        ck = ("route", tuple(hw))
        hit = state.cache.get(ck) if per_grid else None
        if hit is None:
            hit = self._route_all(spec, n, hw, state)
            if per_grid:
                state.cache[ck] = hit
        index, idx_rec, src_rec, weight, ref_index = hit
        state.index[key] = index
        if weight is not None:
            state.weight[key] = weight
        state.last_index, state.last_hw = (index if ref_index is None else ref_index), tuple(hw)
        if self.recorder is not None and idx_rec is not None:
            self.recorder.record(state.step, key, hw, idx_rec, src_rec)

    def _route_all(self, spec, n: torch.Tensor, hw, state: CallState):
        """(index [B, L] long for attn2, recorded index/source [b, L] uint8 of the first positive chunk — one
        row per image; further positive entries, e.g. from ConditioningCombine, are other prompts for the
        same images —, the per-token weight [B, L] or None, and the index [B, L] for eq. 6-8 of the next
        attn1 when the uncond rows are routed for their references, else None)."""
        run = self._caches()
        B, L, _ = n.shape
        bg = self.inputs.num_subjects
        parts, weights, ref_parts = [], [], ([] if self.inputs.references_on_negative else None)
        rec = None
        record = self.recorder is not None and getattr(self.recorder, "enabled", True)
        into = self._index_buffer(spec, n, state)
        for sl, is_cond in state.chunks:
            rows = sl.stop - sl.start
            if not is_cond:
                parts.append(run.constant(("bg", rows, L, n.device), bg, torch.long, (rows, L), n.device))
                weights.append(None)
                if ref_parts is not None:  # routed for the references of attn1 only; attn2 stays background
                    ref_parts.append(self._route_rows(spec, n[sl], hw, state, chunk=sl.start)[0])
                continue
            idx, src, w = self._route_rows(spec, n[sl], hw, state, chunk=sl.start,
                                           out=into[1][sl.start] if into is not None else None)
            parts.append(idx)
            weights.append(w)
            if ref_parts is not None:
                ref_parts.append(idx)
            if rec is None and record:
                rec = (idx, src)  # the recorder keeps a uint8 copy
        if into is not None:
            index = into[0]
        else:
            index = torch.cat(parts) if len(parts) > 1 else parts[0]
        weight = None
        if self.routing.feathered:
            weight = torch.cat([w if w is not None else torch.ones(p.shape, device=n.device)
                                for w, p in zip(weights, parts)])
        ref_index = None if ref_parts is None else (torch.cat(ref_parts) if len(ref_parts) > 1 else ref_parts[0])
        return index, (rec[0] if rec else None), (rec[1] if rec else None), weight, ref_index

    def _index_buffer(self, spec, n: torch.Tensor, state: CallState) -> Optional[tuple]:
        """With the learned router alone, replayed from graphs: (one [B, L] route index per layer and
        chunk layout, kept through the run with the uncond rows set to the background once, and views of
        its cond rows that the router graphs write into) — no concatenation per layer. None otherwise."""
        if (not isinstance(self.routing, LearnedRouting) or not self.graphs.usable(n)
                or self.inputs.references_on_negative):
            return None
        run = self._caches()
        layout = tuple((sl.start, sl.stop, bool(c)) for sl, c in state.chunks)
        key = (spec.key, layout, n.shape[1], n.device)
        hit = run.index_out.get(key)
        if hit is None:
            full = torch.full((n.shape[0], n.shape[1]), self.inputs.num_subjects, dtype=torch.long, device=n.device)
            hit = run.index_out[key] = (full, {sl.start: full[sl] for sl, c in state.chunks if c})
        return hit

    def _route_rows(self, spec, z: torch.Tensor, hw, state: CallState, chunk: int = 0,
                    out: Optional[torch.Tensor] = None):
        """(route index [rows, L], source [rows, L] uint8, weight or None) of the cond rows z; ``out``: the
        learned router's graph writes its index there (see :meth:`_index_buffer`)."""
        index, src, weight = self.routing.route_rows(self._caches(), spec, z, hw, state, chunk, out)
        rows, L, dev = z.shape[0], z.shape[1], z.device
        if index is None:  # nothing can decide (e.g. attention router before its warm-up): background
            index, src = self.routing.background(self.run, rows, L, dev, SOURCE_ROUTER)
        if weight is None and self.routing.feathered:
            weight = torch.ones(rows, L, device=dev)
        return index, src, weight

    # --- injection -----------------------------------------------------------------------------
    def _query_extra(self, state: CallState, index: torch.Tensor, groups: int, dtype) -> torch.Tensor:
        """query_extra(index) as one embedding lookup in a per-run table (route index values 0…N)."""
        key = ("qe", id(index), groups, dtype)
        hit = state.cache.get(key)
        if hit is None or hit[0] is not index:
            tables = self._caches().qe_table
            tk = (groups, dtype, index.device)
            table = tables.get(tk)
            if table is None:
                table = query_extra_table(groups, self.inputs.num_routes, dtype, index.device)
                tables[tk] = table
            hit = (index, torch.nn.functional.embedding(index, table))
            state.cache[key] = hit
        return hit[1]

    def cross_attention(self, state: CallState, key, q, k, v, heads: int, base: Callable,
                        text_sdpa: Optional[Callable] = None, base_owned: bool = False) -> torch.Tensor:
        """attn2 of layer l: text attention (``base``) + eq. 5 routed term (one fused attention).

        ``text_sdpa``: the host's attention is this SDPA function on [B, H, L, D] tensors anyway (ComfyUI's
        attention_pytorch, no override, no other replace): where the routed term is added, the text
        attention is called here directly, still in heads, and its head merge is fused with the sum of
        eq. 5 (fewer host-side ops per layer, the same kernels). ``base_owned``: ``base`` returns a fresh
        tensor nobody else holds, so the routed term may be added into it in place. Neither is used while
        autograd records (a sampler run with grad enabled): the fused and in-place forms have no backward."""
        if state.active:
            self.routing.observe(state, key, q, k, heads)
        index = state.index.get(key)
        run = self._caches()
        if not state.active or index is None or run.eta_zero:
            return base(q, k, v)
        tracked = autograd_records(q, k, v)
        buffers = GroupedBuffers() if tracked else self._buffers
        routes = self.kv.prepared_routes(run, key, q)
        qe = self._query_extra(state, index, routes.num_routes, q.dtype)
        weight = state.weight.get(key)
        if text_sdpa is not None and not tracked and weight is None and k.shape[0] == q.shape[0]:
            graphs = self.graphs.usable(q, k, v)
            body = cross_attention_body(q, k, v, routes, heads, qe, buffers, text_sdpa,
                                        out=buffers.output(q, "attn2") if graphs else None)
            return self.graphs.run((key, "attn2"), (q, k, v), body.statics, body) if graphs else body(q, k, v)
        out = base(q, k, v)
        in_place = base_owned and not tracked
        # η is folded into the prepared values (prepare_routes)
        routed = routed_cross_attention_fast(q, routes, index, heads, 1.0, weight=weight, q_extra=qe,
                                             buffers=buffers, add_to=out if in_place else None)
        return routed if in_place else out + routed.to(out.dtype)

    def self_attention(self, state: CallState, key, q, k, v, heads: int, hw: tuple, base: Callable,
                       plain_sdpa: Optional[Callable] = None) -> torch.Tensor:
        """attn1 of layer l (token grid hw): eq. 6-8 with M^{l-1} for cond rows (and uncond rows when
        ``negative_rows`` routes them, :data:`~anystory.patch.state.NEGATIVE_REFERENCES`); plain attention
        else. ``plain_sdpa``: the host's SDPA on [B, H, L, D], for the uncond rows (torch's when None)."""
        refs = self.inputs.refs
        run = self._caches()
        if (not state.active or refs is None or state.last_index is None or key not in refs.features
                or run.gamma_zero or self.kv.reference_projection(key) is None):
            return base(q, k, v)
        on_negative = self.inputs.references_on_negative
        if hw is None or hw[0] * hw[1] != q.shape[1] or q.shape[0] != state.batch or not (state.any_cond
                                                                                         or on_negative):
            return base(q, k, v)
        rk = ("resized", id(state.last_index), tuple(hw))
        hit = state.cache.get(rk)
        if hit is None or hit[0] is not state.last_index:
            hit = (state.last_index, resize_index(state.last_index, state.last_hw, hw))
            state.cache[rk] = hit
        index = hit[1]
        prep = self.kv.prepared_references(run, key, q, heads)
        if prep is None:
            return base(q, k, v)
        # with CUDA graphs: the cond rows in one fused call over [own; references], uncond rows (routed to
        # the background: they would meet no reference) in a plain attention over their own tokens — half
        # the GPU work; eagerly: one fused call for all rows (fewer host-side ops)
        qe = self._query_extra(state, index, prep.num_subjects, q.dtype)
        graphs = self.graphs.usable(q, k, v)
        # replayed from a graph, the split costs no host time; eagerly, one fused call is cheaper on the host
        rows = state.cond_rows() if graphs and not on_negative else None
        if rows is not None:
            rk2 = ("qe_rows", id(qe), rows.start, rows.stop)
            hit = state.cache.get(rk2)
            if hit is None or hit[0] is not qe:
                hit = (qe, qe[rows])
                state.cache[rk2] = hit
            qe = hit[1]
        # while autograd records, staging buffers reused by later layers would overwrite saved tensors
        buffers = GroupedBuffers() if autograd_records(q, k, v) else self._buffers
        body = reference_attention_body(q, k, v, prep, heads, qe, buffers, rows=rows, plain=plain_sdpa,
                                        out=buffers.output(q, "attn1") if graphs else None)
        slot = (key, "attn1") if rows is None else (key, "attn1", rows.start, rows.stop)  # rows are in the body
        return self.graphs.run(slot, (q, k, v), body.statics, body) if graphs else body(q, k, v)
