"""The routed model patch: the router (§1.2), eq. 5 and eq. 6-8 wired across the layers of a UNet call.

Host-independent: ComfyUI's adapter (``nodes/patch.py``) calls four hooks and supplies the attention
functions and the denoising UNet's own attn1 projections; everything that decides *what* is computed
lives here so it can be tested on plain tensors.

Per UNet call (one sampler step, one cond/uncond batch) a fresh :class:`CallState` carries the maps
from layer to layer, in execution order, per transformer block l:

    attn1 (eq. 6-8, uses M^{l-1})  →  route (router → M^l)  →  attn2 (eq. 5, uses M^l)

Rows of the batch come in chunks (ComfyUI batches cond and uncond). Cond rows are routed; uncond rows
get the background route N+1 everywhere in attn2 (E_{N+1} is the unconditional image embedding) and
no references in attn1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .adapter import AnyStoryAdapter
from .attention import GroupedBuffers, autograd_records, query_extra_table
from .graphs import HookGraphs
from .injection import cross_attention_body, prepare_routes, project_routes, routed_cross_attention_fast
from .layers import LayerLayout
from .reference import ReferenceFeatures, prepare_references, reference_attention_body
from .router import resize_index

log = logging.getLogger("anystory")

MODE_ROUTER = "router"        # the learned AnyStory router
MODE_MASKS = "masks"          # user masks only; background elsewhere
MODE_MIXED = "mixed"          # user masks where given, router (learned or attention) elsewhere
MODE_ATTENTION = "attention"  # training-free attention router (subject words of the prompt)
MODES = (MODE_ROUTER, MODE_MASKS, MODE_MIXED, MODE_ATTENTION)

# who decided a token's route (for the preview): stored in the recorder beside the route index
SOURCE_ROUTER, SOURCE_MASK, SOURCE_ATTENTION = 0, 1, 2


@dataclass
class RoutingInputs:
    """What AnyStoryApply fixes for a sampling run.

    E: [K, m, 2048] subject tokens, K = N+1 (last = background route N+1).
    R: [K, 1, 2048] routing features (None without the routing QFormer).
    eta: [K] η per route (η × per-subject strength; the background route gets η).
    gamma: [N] γ per subject (reference strength; 0 = no reference).
    refs: G_i^l of the N subjects (None: no reference attention).
    region_masks: [N, H, W] user masks in image space (None: no masks); an all-zero mask = not given.
    mode: one of :data:`MODES`.
    feather: the masks were feathered (blurred): tokens a mask decides get their injection scaled by
        clamp(2·m − 1, 0, 1), fading to nothing at the mask's edge.
    """

    E: torch.Tensor
    R: Optional[torch.Tensor]
    eta: torch.Tensor
    gamma: torch.Tensor
    refs: Optional[ReferenceFeatures] = None
    region_masks: Optional[torch.Tensor] = None
    mode: str = MODE_ROUTER
    feather: bool = False

    @property
    def num_routes(self) -> int:
        return self.E.shape[0]

    @property
    def num_subjects(self) -> int:
        return self.E.shape[0] - 1


@dataclass
class CallState:
    """Per UNet call. chunks: (row slice, is_cond) in batch order; step: sampler step index."""

    chunks: list
    active: bool = True
    step: int = 0
    last_index: Optional[torch.Tensor] = None  # [B, L] route index of the previous layer, all rows
    last_hw: Optional[tuple] = None
    index: dict = field(default_factory=dict)  # layer key → [B, L] route index of this call
    weight: dict = field(default_factory=dict)  # layer key → [B, L] per-token factor (feathered masks)
    layer_hw: dict = field(default_factory=dict)  # layer key → (h, w) token grid
    labels: Optional[list] = None  # per chunk: None or N lists of label token positions (attention router)
    cache: dict = field(default_factory=dict)  # per-call values shared by the layers of one grid

    @property
    def batch(self) -> int:
        return self.chunks[-1][0].stop if self.chunks else 0

    @property
    def any_cond(self) -> bool:
        return any(c for _, c in self.chunks)


def chunks_from_roles(roles: list, rows_per_chunk: int) -> list:
    """[True, False] + 2 rows per chunk → [(slice(0,2), True), (slice(2,4), False)]."""
    return [(slice(i * rows_per_chunk, (i + 1) * rows_per_chunk), bool(c)) for i, c in enumerate(roles)]


class RoutedPatch:
    """Router + routed injection for one AnyStoryApply.

    project_reference(key, G [T, C]) -> (K̃, Ṽ): the denoising UNet's attn1 to_k/to_v of that layer
    (supplied by the host, which owns the weights). Plain attention is the ``base`` each hook receives
    (the host's own attention, or another patch that was there first); the routed attentions carry
    their routing in extra head dimensions (anystory.attention, grouped attention) and call torch's
    fused SDPA directly, so no backend can drop a mask.
    """

    def __init__(self, adapter: AnyStoryAdapter, layout: LayerLayout, inputs: RoutingInputs,
                 project_reference: Optional[Callable] = None, recorder=None,
                 attention_router=None, cuda_graphs: Optional[bool] = None):
        """cuda_graphs: replay the hook bodies from CUDA graphs on CUDA (anystory.graphs; None: unless
        ANYSTORY_CUDA_GRAPHS=0)."""
        if inputs.mode not in MODES:
            raise ValueError(f"unknown router mode {inputs.mode!r}; choose one of {', '.join(MODES)}")
        if inputs.mode == MODE_ROUTER and not adapter.has_router:
            raise ValueError("router mode 'router' needs a native AnyStory file with a router")
        if inputs.mode == MODE_MASKS and inputs.region_masks is None:
            raise ValueError("router mode 'masks' needs one region mask per subject")
        if inputs.mode == MODE_ATTENTION and attention_router is None:
            raise ValueError("router mode 'attention' needs subject words (labels)")
        self.adapter = adapter
        self.layout = layout
        self.inputs = inputs
        self.project_reference = project_reference
        self.recorder = recorder
        self.attention_router = attention_router
        self._run: dict = {}
        self._buffers = GroupedBuffers()
        self.graphs = HookGraphs(cuda_graphs)
        self._static_route_kv: Optional[dict] = None  # layer key → (K, V), from precompute_routes()
        self._routes_prep: dict = {}  # layer key → PreparedRoutes (kept across runs)
        self._routes_src: Optional[tuple] = None  # (E, η) the prepared routes were made from
        self._ref_rows_cache: dict = {}  # layer key → (valid reference rows, lengths), see _ref_rows

    # --- run level (one sampling) ------------------------------------------------------------------
    def begin_run(self, **meta) -> None:
        """Drop every per-run cache (reference K/V are projected with the UNet weights of this run,
        which LoRAs or other patches may have changed)."""
        src = self._routes_src
        if src is None or any(a is not b for a, b in zip(src, (self.inputs.E, self.inputs.eta, self.inputs.refs))):
            self._routes_prep = {}  # E, η or the references were replaced: prepare them again
            self._ref_rows_cache = {}
            self._routes_src = (self.inputs.E, self.inputs.eta, self.inputs.refs)
        self.graphs.clear()
        self._run = {"route_kv": {}, "ref_kv": {}, "mask_index": {}, "dev": {},
                     "eta_zero": bool((self.inputs.eta == 0).all()),
                     "gamma_zero": bool((self.inputs.gamma == 0).all())}
        if self.attention_router is not None:
            self.attention_router.begin_run()
        if self.recorder is not None:
            self.recorder.begin_run(**meta)

    def end_run(self, **meta) -> None:
        self._run = {}
        self.graphs.clear()  # before the buffers: the graphs write into them
        self._buffers.clear()
        if self.recorder is not None:
            self.recorder.end_run(**meta)

    def begin_call(self, state: CallState) -> None:
        """Before a UNet call: the recorder makes its buffer for the run's later steps now, not in the
        middle of the call (see preview.StepSlab)."""
        if self.recorder is not None and state.active:
            self.recorder.reserve(state.step)

    def _on(self, name: str, t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        if t is None:
            return None
        cache = self._run.setdefault("dev", {})
        hit = cache.get(name)
        if hit is None or hit.device != device:
            hit = t.to(device)
            cache[name] = hit
        return hit

    @property
    def uses_learned_router(self) -> bool:
        return self.inputs.mode in (MODE_ROUTER, MODE_MIXED) and self.adapter.has_router

    @torch.no_grad()
    def precompute_routes(self, device=None) -> None:
        """E_i Ŵ_k^l, E_i Ŵ_v^l of every layer, once (E and Ŵ are fixed once the node has run): then the
        adapter's weights are not needed while sampling (unless the learned router runs)."""
        out = {}
        for spec in self.layout:
            k, v = self._project_routes(spec)
            out[spec.key] = (k.to(device) if device is not None else k, v.to(device) if device is not None else v)
        self._static_route_kv = out

    @torch.no_grad()
    def _project_routes(self, spec):
        ip = self.adapter.ip_adapter[str(spec.ckpt_index)]
        return project_routes(ip, self.inputs.E.to(ip.to_k_ip.weight.device))

    def route_kv(self, spec, like: torch.Tensor):
        """(E_i Ŵ_k^l, E_i Ŵ_v^l) for all routes of layer l (precomputed, or projected once per run)."""
        cache = self._run.setdefault("route_kv", {})
        hit = cache.get(spec.key)
        if hit is None or hit[0].device != like.device or hit[0].dtype != like.dtype:
            static = self._static_route_kv
            k, v = static[spec.key] if static is not None and spec.key in static else self._project_routes(spec)
            hit = (k.to(like.device, like.dtype), v.to(like.device, like.dtype))
            cache[spec.key] = hit
        return hit

    def prepared_routes(self, key, like: torch.Tensor):
        """route_kv in the grouped layout of the fused routed attention. It depends on E, Ŵ and η only,
        all fixed by AnyStoryApply, so it is made once per layer, device and dtype and kept across runs."""
        hit = self._routes_prep.get(key)
        if (hit is None or hit.k.dtype != like.dtype or hit.k.device != like.device
                or (hit.k.is_inference() and not torch.is_inference_mode_enabled())):  # made in inference mode
            spec = self.layout.by_key(key)
            k, v = self.route_kv(spec, like)
            hit = prepare_routes(k, v, spec.heads, eta=self.inputs.eta.to(like.device))
            self._routes_prep[key] = hit
        return hit

    def _ref_rows(self, key, device):
        """(row index [T] into G^l flattened over subjects, tokens per subject): the subjects' valid
        reference tokens, found once per layer and kept across runs (no boolean indexing, so no device
        sync, while sampling)."""
        hit = self._ref_rows_cache.get(key)
        if hit is None or hit[0].device != device:
            rows, lengths = self.inputs.refs.valid_rows(key)
            hit = (rows.to(device), lengths)
            self._ref_rows_cache[key] = hit
        return hit

    def ref_kv(self, key, like: torch.Tensor):
        """(K̃_i^l, Ṽ_i^l) per subject for layer l, from G_i^l through the UNet's attn1, once per run (one
        projection for all subjects)."""
        cache = self._run.setdefault("ref_kv", {})
        hit = cache.get(key)
        if hit is None:
            f = self.inputs.refs.features[key]
            rows, lengths = self._ref_rows(key, f.device)
            with torch.no_grad():
                g = f.flatten(0, 1).index_select(0, rows).to(like.device, like.dtype, non_blocking=True)
                k, v = self.project_reference(key, g)
            hit = (list(k.to(like.dtype).split(lengths)), list(v.to(like.dtype).split(lengths)))
            cache[key] = hit
        return hit

    def prepared_references(self, key, like: torch.Tensor, heads: int):
        """ref_kv with ln γ_i in the grouped layout of the fused reference attention (once per run)."""
        cache = self._run.setdefault("refs_prep", {})
        if key not in cache:
            ks, vs = self.ref_kv(key, like)
            # γ stays on the host: prepare_references decides on it there (no device sync per layer)
            cache[key] = prepare_references(ks, vs, heads, self.inputs.gamma)
        return cache[key]

    # --- routing -------------------------------------------------------------------------------
    def mask_index(self, hw: tuple, device):
        """User masks on a layer grid: (index [L] with -1 where no mask decides, covered [L] bool,
        weight [L]: the injection factor of covered tokens, 1 elsewhere)."""
        masks = self.inputs.region_masks
        if masks is None:
            return None, None, None
        cache = self._run.setdefault("mask_index", {})
        hit = cache.get(hw)
        if hit is None:
            m = torch.nn.functional.interpolate(masks[:, None].float(), size=hw, mode="area")[:, 0]
            m = m.flatten(1)  # [N, L]
            best, arg = m.max(0)
            covered = best > 0.5
            idx = torch.where(covered, arg, torch.full_like(arg, -1))
            w = torch.ones_like(best)
            if self.inputs.feather:
                w = torch.where(covered, (2 * best - 1).clamp(0, 1), w)
            hit = (idx.to(device), covered.to(device), w.to(device))
            cache[hw] = hit
        return hit

    def route(self, state: CallState, key, n: torch.Tensor, hw: tuple) -> None:
        """attn2 entry of layer l: compute M^l (as a route index) for every row; store it in the state."""
        spec = self.layout.get(key)
        if spec is None or not state.active:
            return
        state.layer_hw[key] = tuple(hw)
        B, L, _ = n.shape
        if hw[0] * hw[1] != L or B != state.batch:
            return  # tokens re-tiled/merged by another patch: leave this layer un-routed
        mode = self.inputs.mode
        # masks and the attention router decide the same for every layer of a grid within one call
        static = mode in (MODE_MASKS, MODE_ATTENTION) or (mode == MODE_MIXED and not self.adapter.has_router)
        ck = ("route", tuple(hw))
        hit = state.cache.get(ck) if static else None
        if hit is None:
            hit = self._route_all(spec, n, hw, state)
            if static:
                state.cache[ck] = hit
        index, idx_rec, src_rec, weight = hit
        state.index[key] = index
        if weight is not None:
            state.weight[key] = weight
        state.last_index, state.last_hw = index, tuple(hw)
        if self.recorder is not None and idx_rec is not None:
            self.recorder.record(state.step, key, hw, idx_rec, src_rec)

    def _route_all(self, spec, n: torch.Tensor, hw, state: CallState):
        """(index [B, L] long, recorded index/source [b, L] uint8 of the first positive chunk — one row
        per image; further positive entries, e.g. from ConditioningCombine, are other prompts for the
        same images — and the per-token weight [B, L] or None)."""
        B, L, _ = n.shape
        bg = self.inputs.num_subjects
        parts, weights = [], []
        rec = None
        record = self.recorder is not None and getattr(self.recorder, "enabled", True)
        into = self._index_buffer(spec, n, state)
        for sl, is_cond in state.chunks:
            rows = sl.stop - sl.start
            if not is_cond:
                parts.append(self._constant(("bg", rows, L, n.device), bg, torch.long, (rows, L), n.device))
                weights.append(None)
                continue
            idx, src, w = self._route_rows(spec, n[sl], hw, state, chunk=sl.start,
                                           out=into[1][sl.start] if into is not None else None)
            parts.append(idx)
            weights.append(w)
            if rec is None and record:
                rec = (idx, src)  # the recorder keeps a uint8 copy
        if into is not None:
            index = into[0]
        else:
            index = torch.cat(parts) if len(parts) > 1 else parts[0]
        weight = None
        if self.inputs.feather:
            weight = torch.cat([w if w is not None else torch.ones(p.shape, device=n.device)
                                for w, p in zip(weights, parts)])
        return index, (rec[0] if rec else None), (rec[1] if rec else None), weight

    def _index_buffer(self, spec, n: torch.Tensor, state: CallState) -> Optional[tuple]:
        """With the learned router alone, replayed from graphs: (one [B, L] route index per layer and
        chunk layout, kept through the run with the uncond rows set to the background once, and views of
        its cond rows that the router graphs write into) — no concatenation per layer. None otherwise."""
        if (self.inputs.mode != MODE_ROUTER or not self.adapter.has_router or self.inputs.feather
                or not self.graphs.usable(n)):
            return None
        layout = tuple((sl.start, sl.stop, bool(c)) for sl, c in state.chunks)
        cache = self._run.setdefault("index_out", {})
        key = (spec.key, layout, n.shape[1], n.device)
        hit = cache.get(key)
        if hit is None:
            full = torch.full((n.shape[0], n.shape[1]), self.inputs.num_subjects, dtype=torch.long, device=n.device)
            hit = cache[key] = (full, {sl.start: full[sl] for sl, c in state.chunks if c})
        return hit

    def _constant(self, key, value, dtype, shape, device) -> torch.Tensor:
        """A constant tensor made once per run (background routes of uncond rows, router sources)."""
        cache = self._run.setdefault("const", {})
        hit = cache.get(key)
        if hit is None:
            hit = torch.full(shape, value, dtype=dtype, device=device)
            cache[key] = hit
        return hit

    def _route_rows(self, spec, z: torch.Tensor, hw, state: CallState, chunk: int = 0,
                    out: Optional[torch.Tensor] = None):
        """(route index [rows, L], source [rows, L] uint8, weight or None) of the cond rows z; ``out``: the
        learned router's graph writes its index there (see :meth:`_index_buffer`)."""
        mode = self.inputs.mode
        rows, L = z.shape[0], z.shape[1]
        dev = z.device
        base = src = None
        if mode in (MODE_ROUTER, MODE_MIXED) and self.adapter.has_router:
            router = self.adapter.router[str(spec.ckpt_index)]
            cache = self._run.setdefault("router_prep", {})
            prep = cache.get(spec.key)
            if prep is None or prep["w"].device != dev:
                r = self._on("R", self.inputs.R, dev).transpose(0, 1)  # [1, K, 2048]
                prep = router.prepare(r)  # folded in fp32, stored in the weights' dtype
                cache[spec.key] = prep
            if self.graphs.usable(z):
                # one slot and one output buffer per layer and chunk (made outside any capture): a graph's
                # own allocations live in the pool the other graphs reuse
                buf = out
                if buf is None:
                    outs = self._run.setdefault("router_out", {})
                    ok = (spec.key, chunk, rows, L, dev)
                    buf = outs.get(ok)
                    if buf is None:
                        buf = outs[ok] = torch.empty(rows, L, dtype=torch.long, device=dev)
                # the graph reads only z and the prepared tensors (copies folded from the router's weights
                # for this run, kept alive as its statics)
                base = self.graphs.run((spec.key, "router", chunk), (z,), tuple(prep.values()) + (buf,),
                                       lambda z: router.route(z.to(router.proj_z.weight.dtype), prep, out=buf))
            else:
                base = router.route(z.to(router.proj_z.weight.dtype), prep)
            src = self._constant(("src", SOURCE_ROUTER, rows, L, dev), SOURCE_ROUTER, torch.uint8, (rows, L), dev)
        elif mode in (MODE_ATTENTION, MODE_MIXED) and self.attention_router is not None:
            base = self.attention_router.route(spec, hw, rows, dev, state)
            if base is not None:
                src = torch.full_like(base, SOURCE_ATTENTION, dtype=torch.uint8)
        weight = None
        if mode in (MODE_MASKS, MODE_MIXED):
            midx, covered, mw = self.mask_index(tuple(hw), dev)
            if midx is not None:
                if base is None:
                    base = torch.full((rows, L), self.inputs.num_subjects, dtype=torch.long, device=dev)
                    src = torch.full((rows, L), SOURCE_MASK, dtype=torch.uint8, device=dev)
                base = torch.where(covered, midx, base)
                src = torch.where(covered, SOURCE_MASK, src)  # a host scalar: no host→device copy (sync)
                weight = mw.expand(rows, -1)
        if base is None:  # nothing can decide (e.g. attention router before its warm-up): background
            base = torch.full((rows, L), self.inputs.num_subjects, dtype=torch.long, device=dev)
            src = torch.full((rows, L), SOURCE_ROUTER, dtype=torch.uint8, device=dev)
        if weight is None and self.inputs.feather:
            weight = torch.ones(rows, L, device=dev)
        return base, src, weight

    # --- injection -----------------------------------------------------------------------------
    def _query_extra(self, state: CallState, index: torch.Tensor, groups: int, dtype) -> torch.Tensor:
        """query_extra(index) as one embedding lookup in a per-run table (route index values 0…N)."""
        key = ("qe", id(index), groups, dtype)
        hit = state.cache.get(key)
        if hit is None or hit[0] is not index:
            tables = self._run.setdefault("qe_table", {})
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
        if self.attention_router is not None and state.active:
            self.attention_router.observe(state, key, q, k, heads)
        index = state.index.get(key)
        if not state.active or index is None or self._run.get("eta_zero", False):
            return base(q, k, v)
        tracked = autograd_records(q, k, v)
        buffers = GroupedBuffers() if tracked else self._buffers
        routes = self.prepared_routes(key, q)
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
        """attn1 of layer l (token grid hw): eq. 6-8 for cond rows with M^{l-1}; plain attention else.
        ``plain_sdpa``: the host's SDPA on [B, H, L, D], for the uncond rows (torch's when None)."""
        refs = self.inputs.refs
        if (not state.active or refs is None or state.last_index is None or key not in refs.features
                or self.project_reference is None or self._run.get("gamma_zero", False)):
            return base(q, k, v)
        if hw is None or hw[0] * hw[1] != q.shape[1] or q.shape[0] != state.batch or not state.any_cond:
            return base(q, k, v)
        rk = ("resized", id(state.last_index), tuple(hw))
        hit = state.cache.get(rk)
        if hit is None or hit[0] is not state.last_index:
            hit = (state.last_index, resize_index(state.last_index, state.last_hw, hw))
            state.cache[rk] = hit
        index = hit[1]
        prep = self.prepared_references(key, q, heads)
        if prep is None:
            return base(q, k, v)
        # with CUDA graphs: the cond rows in one fused call over [own; references], uncond rows (routed to
        # the background: they would meet no reference) in a plain attention over their own tokens — half
        # the GPU work; eagerly: one fused call for all rows (fewer host-side ops)
        qe = self._query_extra(state, index, prep.num_subjects, q.dtype)
        graphs = self.graphs.usable(q, k, v)
        # replayed from a graph, the split costs no host time; eagerly, one fused call is cheaper on the host
        rows = self._cond_rows(state) if graphs else None
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

    @staticmethod
    def _cond_rows(state: CallState) -> Optional[slice]:
        """The cond rows as one slice when they are contiguous and uncond rows exist (those then get the
        plain attention, see reference_attention_body); None: every row through the fused call."""
        hit = state.cache.get("cond_rows", False)
        if hit is False:
            cond = [sl for sl, c in state.chunks if c]
            hit = None
            if cond and len(cond) < len(state.chunks) and all(a.stop == b.start for a, b in zip(cond, cond[1:])):
                hit = slice(cond[0].start, cond[-1].stop)
            state.cache["cond_rows"] = hit
        return hit
