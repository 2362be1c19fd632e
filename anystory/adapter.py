"""The loaded AnyStory model ("router loading"): subject branch, per-layer Ŵ_k/Ŵ_v, router.

One ``nn.Module`` whose ``state_dict()`` keys are exactly the native checkpoint's keys:

- ``subject_proj.*``   subject QFormer → E_i (m × 2048)
- ``ip_adapter.{N}.to_k_ip.weight`` / ``.to_v_ip.weight``   Ŵ_k^l, Ŵ_v^l (N = 1, 3, …)
- ``routing_proj.*``   routing QFormer → R_i (1 query)                 [native only]
- ``router.{N}.*``     the per-layer router                              [native only]

Slots that public weights cannot fill stay empty (``routing_proj``/``router`` None) and the pack
falls back to a training-free stand-in (user masks, attention router); :attr:`slots` says which.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from .layers import LayerLayout
from .paper.encoder import Resampler, SubjectEmbeddings, encode_routes
from .paper.injection import DecoupledKV
from .paper.router import LayerRouter

log = logging.getLogger("anystory")

KIND_NATIVE = "anystory-sdxl"
KIND_IPADAPTER_PLUS = "ip-adapter-plus-sdxl"


class LayoutMismatch(ValueError):
    """A checkpoint's per-layer weights do not fit the connected UNet."""


class AnyStoryAdapter(nn.Module):
    def __init__(self, subject_proj: Resampler, layer_dims: dict[int, int],
                 routing_proj: Optional[Resampler] = None, router_dim: int = 256, router_heads: int = 4,
                 with_router: bool = False, kind: str = KIND_NATIVE, meta: Optional[dict] = None):
        super().__init__()
        route_dim = subject_proj.output_dim
        self.kind = kind
        self.meta = dict(meta or {})
        self.subject_proj = subject_proj
        self.ip_adapter = nn.ModuleDict({str(n): DecoupledKV(c, route_dim) for n, c in sorted(layer_dims.items())})
        self.routing_proj = routing_proj
        self.router = None
        if with_router:
            if routing_proj is None:
                raise ValueError("a router needs the routing QFormer (routing_proj)")
            self.router = nn.ModuleDict({str(n): LayerRouter(c, route_dim, router_dim, router_heads)
                                         for n, c in sorted(layer_dims.items())})
        self.router_dim = router_dim
        self.router_heads = router_heads

    # --- what is in it -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """m, subject tokens per route."""
        return self.subject_proj.num_queries

    @property
    def has_router(self) -> bool:
        return self.router is not None and self.routing_proj is not None

    @property
    def layer_dims(self) -> dict[int, int]:
        return {int(n): m.to_k_ip.out_features for n, m in self.ip_adapter.items()}

    @property
    def slots(self) -> dict[str, str]:
        native = self.kind == KIND_NATIVE
        return {
            "subject encoder": "native AnyStory" if native else "public IP-Adapter Plus",
            "router": "native AnyStory" if self.has_router else "training-free (attention router / user masks)",
        }

    def describe(self) -> str:
        return (f"{self.kind}: {len(self.ip_adapter)} layers, m={self.num_tokens} subject tokens, "
                + "; ".join(f"{k}: {v}" for k, v in self.slots.items()))

    # --- checks ----------------------------------------------------------------------------------
    def check_layout(self, layout: LayerLayout, model_name: str = "the connected MODEL") -> None:
        """Raise :class:`LayoutMismatch` unless there is one Ŵ_k/Ŵ_v (and router) per cross-attention
        layer of ``layout`` with the layer's width."""
        mine = sorted(self.layer_dims.items())
        theirs = layout.signature()
        if mine == theirs:
            return
        widths = lambda sig: sorted({c for _, c in sig})
        log.warning("AnyStory: %d adapter layers; %s: %s", len(mine), model_name, layout.describe())
        raise LayoutMismatch(
            f"the AnyStory model ({self.kind}) has per-layer weights for {len(mine)} cross-attention layers "
            f"of widths {widths(mine)}, but {model_name} has {len(theirs)} cross-attention layers of widths "
            f"{widths(theirs)}: use an AnyStory/IP-Adapter file made for this base model family (SDXL base has "
            "70 layers).")

    # --- the subject branch ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, clip_subjects: torch.Tensor, clip_background: torch.Tensor) -> SubjectEmbeddings:
        dtype = self.subject_proj.proj_in.weight.dtype
        return encode_routes(self.subject_proj, self.routing_proj if self.has_router else None,
                             clip_subjects.to(dtype), clip_background.to(dtype))
