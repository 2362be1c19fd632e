"""The keys and values the routed attentions add, per layer l:

- eq. 5: E_i Ŵ_k^l, E_i Ŵ_v^l of every route (the adapter's per-layer projections of the subject tokens),
  projected once when AnyStory Apply runs and kept in the fused layout across runs (η folded in);
- eq. 6-8: K̃_i^l = G_i^l W̃_k^l, Ṽ_i^l = G_i^l W̃_v^l of every subject with references, projected once
  per run, only for the reference tokens that lie on the subject, with the adapter's reference projections
  W̃ where the file has them for layer l (``reference_proj.N``), else with the denoising UNet's own attn1
  W_k^l, W_v^l (the stand-in, which LoRAs or other patches may change between runs).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..adapter import AnyStoryAdapter
from ..fast.injection import prepare_routes
from ..fast.reference import prepare_references
from ..layers import LayerLayout
from ..paper.injection import project_routes
from ..paper.reference import project_references
from .run import RunCaches
from .state import RoutingInputs


class InjectionKV:
    """Route and reference K/V of one AnyStory Apply.

    attn1: layer key → the denoising UNet's self-attention module of that layer (its ``to_k``/``to_v``
    project G_i^l where the adapter has no W̃ for the layer); None: only the adapter's W̃ project."""

    def __init__(self, adapter: AnyStoryAdapter, layout: LayerLayout, inputs: RoutingInputs,
                 attn1: Optional[Mapping] = None):
        self.adapter = adapter
        self.layout = layout
        self.inputs = inputs
        self.attn1 = attn1
        self._static_route_kv: Optional[dict] = None  # layer key → (K, V), from precompute_routes()
        self._routes_prep: dict = {}  # layer key → PreparedRoutes (kept across runs)
        self._routes_src: Optional[tuple] = None  # (E, η, refs) the prepared routes were made from
        self._ref_rows_cache: dict = {}  # layer key → (valid reference rows, lengths), see _ref_rows
        self._proj: dict = {}  # layer key → W̃ of the adapter or the UNet's attn1 (reference_projection)

    def begin_run(self) -> None:
        """Keep what depends on E, η and the references only, unless those were replaced."""
        src = self._routes_src
        if src is None or any(a is not b for a, b in zip(src, (self.inputs.E, self.inputs.eta, self.inputs.refs))):
            self._routes_prep = {}  # E, η or the references were replaced: prepare them again
            self._ref_rows_cache = {}
            self._routes_src = (self.inputs.E, self.inputs.eta, self.inputs.refs)

    # --- eq. 5 ---------------------------------------------------------------------------------
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

    def route_kv(self, run: RunCaches, spec, like: torch.Tensor):
        """(E_i Ŵ_k^l, E_i Ŵ_v^l) for all routes of layer l (precomputed, or projected once per run)."""
        hit = run.route_kv.get(spec.key)
        if hit is None or hit[0].device != like.device or hit[0].dtype != like.dtype:
            static = self._static_route_kv
            k, v = static[spec.key] if static is not None and spec.key in static else self._project_routes(spec)
            hit = (k.to(like.device, like.dtype), v.to(like.device, like.dtype))
            run.route_kv[spec.key] = hit
        return hit

    def prepared_routes(self, run: RunCaches, key, like: torch.Tensor):
        """route_kv in the grouped layout of the fused routed attention. It depends on E, Ŵ and η only,
        all fixed by AnyStoryApply, so it is made once per layer, device and dtype and kept across runs."""
        hit = self._routes_prep.get(key)
        if (hit is None or hit.k.dtype != like.dtype or hit.k.device != like.device
                or (hit.k.is_inference() and not torch.is_inference_mode_enabled())):  # made in inference mode
            spec = self.layout.by_key(key)
            k, v = self.route_kv(run, spec, like)
            hit = prepare_routes(k, v, spec.heads, eta=self.inputs.eta.to(like.device))
            self._routes_prep[key] = hit
        return hit

    # --- eq. 6-8 -------------------------------------------------------------------------------
    def reference_projection(self, key):
        """What projects G_i^l at layer l: the adapter's W̃_k^l, W̃_v^l, else the UNet's attn1, else None
        (looked up once per layer)."""
        hit = self._proj.get(key, False)
        if hit is False:
            spec = self.layout.get(key)
            hit = self.adapter.reference_projection(spec.ckpt_index) if spec is not None else None
            if hit is None and self.attn1 is not None:
                hit = self.attn1.get(key)
            self._proj[key] = hit
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

    def ref_kv(self, run: RunCaches, key, like: torch.Tensor):
        """(K̃_i^l, Ṽ_i^l) per subject for layer l, from G_i^l through W̃ (or the UNet's attn1), once per run
        (one projection for all subjects)."""
        hit = run.ref_kv.get(key)
        if hit is None:
            f = self.inputs.refs.features[key]
            rows, lengths = self._ref_rows(key, f.device)
            proj = self.reference_projection(key)
            with torch.no_grad():
                g = f.flatten(0, 1).index_select(0, rows).to(like.device, like.dtype, non_blocking=True)
                k, v = project_references(g, proj)
            hit = (list(k.to(like.dtype).split(lengths)), list(v.to(like.dtype).split(lengths)))
            run.ref_kv[key] = hit
        return hit

    def prepared_references(self, run: RunCaches, key, like: torch.Tensor, heads: int):
        """ref_kv with ln γ_i in the grouped layout of the fused reference attention (once per run)."""
        if key not in run.refs_prep:
            ks, vs = self.ref_kv(run, key, like)
            # γ stays on the host: prepare_references decides on it there (no device sync per layer)
            run.refs_prep[key] = prepare_references(ks, vs, heads, self.inputs.gamma)
        return run.refs_prep[key]
