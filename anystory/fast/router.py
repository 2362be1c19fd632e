"""The router (§1.2) at inference, folded: everything that depends only on the routing features R
(constant through a sampling run) is computed once per run with the router's linear maps folded into
it (:func:`fold_router`), so that :func:`route` reads Z^l through two matrix products and a few tiny
ones instead of five projections. :meth:`anystory.paper.router.LayerRouter.forward` is the definition
these must equal (the tests hold them to it).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..paper.attention import NEG
from ..paper.router import LayerRouter


@torch.no_grad()
def fold_router(router: LayerRouter, r: torch.Tensor) -> dict:
    """Everything that depends only on the routing features R (constant through a sampling run), with
    the router's linear maps folded into it so that :func:`route` reads Z^l through two matrix
    products instead of five projections (fewer, larger kernels; the math of :meth:`LayerRouter.forward`).
    ``r``: [1, K, route_dim] (K = N+1 routes, broadcast over the batch); computed in fp32, stored in
    the weights' dtype. With D = router_dim, H heads of width d, C = dim (Z^l's width):

    - ``w`` [16·⌈(K·H + K)/16⌉, C] and ``b``: rows 0…K·H-1 give the refinement logits of route k,
      head h, ⟨q_kh, Ŵ_k,h z⟩/√d = z·(Ŵ_k,hᵀ q_kh)/√d; the next K rows the coarse logits
      ⟨R_k Ŵ_r, z Ŵ_z⟩/√D = z·(Ŵ_zᵀ Ŵ_r R_k)/√D + ⟨R_k Ŵ_r, b_z⟩/√D; the rest is padding.
    - ``w_v`` [C, D]: the refinement values (applied after the attention: softmax(·)·Z Ŵ_vᵀ =
      (softmax(·)·Z) Ŵ_vᵀ).
    - ``g0`` [K, C+1] and ``m`` [D, C+1]: the refined logits are z·g_k[:C] + g_k[C] with
      g = g0 + upd·m, where upd is the refinement's attention output, since R_k' = R_k + upd Ŵ_oᵀ + b_o
      and the logits ⟨R_k' Ŵ_r, z Ŵ_z⟩/√D are linear in R_k'.
    """
    f32 = torch.float32
    K = r.shape[-2]
    if r.numel() != K * r.shape[-1]:
        raise ValueError(f"prepare() takes the routing features of one image, [1, K, route_dim]; got {tuple(r.shape)}")
    H, D = router.heads, router.router_dim
    d = D // H
    r = r.reshape(K, -1).to(f32)
    wz, bz = router.proj_z.weight.to(f32), router.proj_z.bias.to(f32)
    wr, br = router.proj_r.weight.to(f32), router.proj_r.bias.to(f32)
    wo, bo = router.refine_out.weight.to(f32), router.refine_out.bias.to(f32)
    C = wz.shape[1]
    q = F.linear(F.layer_norm(r, r.shape[-1:], router.refine_norm.weight.to(f32), router.refine_norm.bias.to(f32),
                              router.refine_norm.eps), router.refine_q.weight.to(f32))          # [K, D]
    fold_k = torch.einsum("khd,hdc->khc", q.view(K, H, d), router.refine_k.weight.to(f32).view(H, d, C))
    rp = F.linear(r, wr, br) / math.sqrt(D)                                                      # [K, D]
    rows = K * H + K
    pad = (-rows) % 16
    w = torch.cat([fold_k.reshape(K * H, C) / math.sqrt(d), rp @ wz, wz.new_zeros(pad, C)])
    b = torch.cat([wz.new_zeros(K * H), rp @ bz, wz.new_zeros(pad)])
    p0 = F.linear(r + bo, wr, br) / math.sqrt(D)            # Ŵ_r(R_k + b_o) + b_r, scaled: [K, D]
    m1 = (wr @ wo) / math.sqrt(D)                           # upd → its share of that: [D, D]
    wz1 = torch.cat([wz, bz[:, None]], 1)                   # [D, C+1]
    dt = router.proj_z.weight.dtype
    return {"w": w.to(dt), "b": b.to(dt), "w_v": router.refine_v.weight.t().to(dt).contiguous(),
            "g0": (p0 @ wz1).to(dt), "m": (m1.t() @ wz1).to(dt)}

@torch.no_grad()
def route_logits(router: LayerRouter, z: torch.Tensor, prep: dict) -> torch.Tensor:
    """Inference: the refined logits [B, K, L] (in z's dtype) of :meth:`LayerRouter.forward`, from the folded
    matrices of :func:`fold_router`: two products with Z^l and a handful of tiny ones."""
    B, L, C = z.shape
    K = prep["g0"].shape[0]
    H = router.heads
    d = router.router_dim // H
    zt = z.transpose(1, 2)                                          # [B, C, L]
    out = torch.matmul(prep["w"], zt) + prep["b"][:, None]          # [B, 16·…, L]: tokens last
    coarse = out[:, K * H:K * H + K]                                # [B, K, L]
    own = coarse.argmax(1, keepdim=True) == torch.arange(K, device=z.device)[:, None]   # [B, K, L]
    # Mask2Former-style: a route sees only its own tokens, a route that owns none sees all of them
    hide = own.any(-1, keepdim=True) > own                          # [B, K, L]
    s = out[:, :K * H].view(B, K, H, L).masked_fill(hide[:, :, None], NEG)
    a = s.softmax(-1).view(B, K * H, L)                             # over the tokens
    y = torch.bmm(a, z)                                             # [B, K·H, C]
    # each head's values: y_kh Ŵ_v,hᵀ (all heads computed, the diagonal kept: one product)
    upd = (y @ prep["w_v"]).view(B, K, H, H, d).diagonal(dim1=2, dim2=3).transpose(-1, -2)
    g = torch.matmul(upd.reshape(B, K, H * d), prep["m"]) + prep["g0"]   # [B, K, C+1]
    return torch.baddbmm(g[..., C:], g[..., :C], zt)

@torch.no_grad()
def route(router: LayerRouter, z: torch.Tensor, prep: dict, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inference: the route index [B, L] (argmax of the refined map of :meth:`LayerRouter.forward`), written into
    ``out`` ([B, L] long) when given."""
    logits = route_logits(router, z, prep)
    return logits.argmax(1) if out is None else torch.argmax(logits, 1, out=out)
