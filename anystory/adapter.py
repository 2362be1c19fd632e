"""The loaded AnyStory model ("router loading"): subject branch, per-layer Ŵ_k/Ŵ_v, router.

One ``nn.Module`` whose ``state_dict()`` keys are exactly the native checkpoint's keys:

- ``subject_proj.*``   subject QFormer → E_i (m × 2048)
- ``ip_adapter.{N}.to_k_ip.weight`` / ``.to_v_ip.weight``   Ŵ_k^l, Ŵ_v^l (N = 1, 3, …)
- ``routing_proj.*``   routing QFormer → R_i (1 query)                 [native only]
- ``router.{N}.*``     the per-layer router                              [native only]
- ``reference_proj.{N}.to_k.weight`` / ``.to_v.weight``   W̃_k^l, W̃_v^l of eq. 6-8 (C × C), for
  any subset of the layers                                             [native only, optional]

Slots that public weights cannot fill stay empty (``routing_proj``/``router`` None) and the pack
falls back to a training-free stand-in (user masks, attention router); a layer without W̃ projects
the reference features G_i^l with the denoising UNet's own attn1 W_k^l, W_v^l. :attr:`slots` says which.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from .layers import LayerLayout
from .paper.encoder import (
    ZERO_IMAGE_NORMALISED,
    ZERO_IMAGE_PIXEL_BLACK,
    ZERO_IMAGES,
    Resampler,
    SubjectEmbeddings,
    encode_routes,
)
from .paper.injection import DecoupledKV
from .paper.reference import ReferenceProjection
from .paper.router import LayerRouter

log = logging.getLogger("anystory")

KIND_NATIVE = "anystory-sdxl"
KIND_IPADAPTER_PLUS = "ip-adapter-plus-sdxl"


ZERO_IMAGE_META = "zero_image"  # the file's metadata key: ZERO_IMAGE_NORMALISED or ZERO_IMAGE_PIXEL_BLACK


def zero_image_of(meta: dict) -> str:
    """The zero-image convention (``anystory.paper.encoder.ZERO_IMAGES``) a subject branch was trained with,
    from its file's metadata: ``zero_image`` when the file says; else ``pixel_black`` for a file this pack's
    router trainer wrote before it recorded the convention (metadata ``trained_router_steps``: that trainer
    encoded the background from black pixels); else ``normalized_zeros`` (IP-Adapter's, which IP-Adapter Plus
    was trained with). A value outside ZERO_IMAGES raises ValueError (the checkpoint reader refuses such a
    file first)."""
    v = meta.get(ZERO_IMAGE_META)
    if v is None:
        return ZERO_IMAGE_PIXEL_BLACK if "trained_router_steps" in meta else ZERO_IMAGE_NORMALISED
    if v not in ZERO_IMAGES:
        raise ValueError(f"metadata {ZERO_IMAGE_META}={v!r} is not one of {ZERO_IMAGES}")
    return v


class LayoutMismatch(ValueError):
    """A checkpoint's per-layer weights do not fit the connected UNet."""


class AnyStoryAdapter(nn.Module):
    def __init__(self, subject_proj: Resampler, layer_dims: dict[int, int],
                 routing_proj: Optional[Resampler] = None, router_dim: int = 256, router_heads: int = 4,
                 with_router: bool = False, kind: str = KIND_NATIVE, meta: Optional[dict] = None,
                 reference_layers: Optional[list] = None):
        """reference_layers: the layers N (of ``layer_dims``) that get their own W̃_k^l, W̃_v^l
        (``reference_proj``); None or empty: none (every layer uses the UNet's attn1 weights)."""
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
        self.reference_proj = None
        if reference_layers:
            self.attach_reference_proj(reference_layers)

    def attach_reference_proj(self, layers: Optional[list] = None) -> nn.ModuleDict:
        """Give layers N (default: all) their own W̃_k^l, W̃_v^l (ReferenceProjection, PyTorch's default
        init) unless they have them; returns ``reference_proj``."""
        dims = self.layer_dims
        layers = sorted(dims) if layers is None else sorted(int(n) for n in layers)
        unknown = [n for n in layers if n not in dims]
        if unknown:
            raise ValueError(f"reference projections for layers {unknown[:8]} that have no ip_adapter weights")
        if self.reference_proj is None:
            self.reference_proj = nn.ModuleDict()
        like = next(iter(self.ip_adapter.values())).to_k_ip.weight
        for n in layers:
            if str(n) not in self.reference_proj:
                self.reference_proj[str(n)] = ReferenceProjection(dims[n]).to(like.device, like.dtype)
        return self.reference_proj

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
    def zero_image(self) -> str:
        """The zero image of the background route (E_{N+1}, R_{N+1}, CFG's unconditional image tokens) this
        subject branch was trained with: :func:`zero_image_of` its metadata."""
        return zero_image_of(self.meta)

    @property
    def reference_layers(self) -> list[int]:
        """The layers N with their own W̃_k^l, W̃_v^l (the others use the UNet's attn1 weights)."""
        return sorted(int(n) for n in self.reference_proj) if self.reference_proj is not None else []

    def reference_projection(self, ckpt_index: int) -> Optional[ReferenceProjection]:
        """W̃_k^l, W̃_v^l of layer N, or None (then the UNet's attn1 W_k^l, W_v^l stand in)."""
        rp = self.reference_proj
        return rp[str(ckpt_index)] if rp is not None and str(ckpt_index) in rp else None

    @property
    def slots(self) -> dict[str, str]:
        native = self.kind == KIND_NATIVE
        n_ref, n = len(self.reference_layers), len(self.ip_adapter)
        ref = ("the UNet's own attn1 weights" if not n_ref else
               f"native AnyStory W̃ ({n_ref} of {n} layers" + (", the UNet's attn1 elsewhere)" if n_ref < n else ")"))
        return {
            "subject encoder": "native AnyStory" if native else "public IP-Adapter Plus",
            "router": "native AnyStory" if self.has_router else "training-free (attention router / user masks)",
            "zero image": ("zeros after normalisation (IP-Adapter)" if self.zero_image == ZERO_IMAGE_NORMALISED
                           else "black pixels"),
            "reference projections": ref,
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
