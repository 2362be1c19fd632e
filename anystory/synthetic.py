"""Random-weight AnyStory / IP-Adapter models with the real key names and shapes.

No model weights can be downloaded where this pack is built and tested, so tests and the demo make
their own: same architecture, same key names, random values. Never used at run time by the nodes.
"""
from __future__ import annotations

from typing import Optional

import torch

from .adapter import KIND_IPADAPTER_PLUS, KIND_NATIVE, AnyStoryAdapter
from .encoder import Resampler
from .layers import LayerLayout


def _init_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("latents"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif p.ndim == 1 and ("norm" in name):
                p.copy_(1.0 + 0.01 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.01 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def random_adapter(layout: LayerLayout, kind: str = KIND_NATIVE, num_tokens: Optional[int] = None,
                   router_dim: int = 256, router_heads: int = 4, clip_dim: int = 1280, qformer_dim: int = 1280,
                   depth: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> AnyStoryAdapter:
    """An adapter for ``layout`` with random weights.

    kind: "anystory-sdxl" (subject + routing QFormer + router; m=64 by default) or
    "ip-adapter-plus-sdxl" (subject QFormer + Ŵ_k/Ŵ_v only; m=16 as ip-adapter-plus_sdxl_vit-h)."""
    native = kind == KIND_NATIVE
    m = num_tokens or (64 if native else 16)
    heads = max(1, qformer_dim // 64)
    subject = Resampler(dim=qformer_dim, depth=depth, heads=heads, num_queries=m, embedding_dim=clip_dim)
    routing = Resampler(dim=qformer_dim, depth=depth, heads=heads, num_queries=1, embedding_dim=clip_dim) if native else None
    dims = {s.ckpt_index: s.dim for s in layout}
    ad = AnyStoryAdapter(subject, dims, routing_proj=routing, router_dim=router_dim, router_heads=router_heads,
                         with_router=native, kind=kind,
                         meta={"format": kind, "synthetic": "random weights"})
    _init_(ad, seed)
    return ad.to(dtype)


def ipadapter_plus_state_dict(layout: LayerLayout, num_tokens: int = 16, seed: int = 0,
                              dtype: torch.dtype = torch.float16, **kw) -> dict:
    """The state dict of an ip-adapter-plus_sdxl_vit-h file: ``image_proj.*`` + ``ip_adapter.{N}.*``."""
    ad = random_adapter(layout, KIND_IPADAPTER_PLUS, num_tokens=num_tokens, seed=seed, dtype=dtype, **kw)
    sd = {}
    for k, v in ad.state_dict().items():
        if k.startswith("subject_proj."):
            k = "image_proj." + k[len("subject_proj."):]
        sd[k] = v.contiguous()
    return sd
