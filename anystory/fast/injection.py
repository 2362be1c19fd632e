"""Eq. 5 on the fast inference path: the routed term for one-hot maps as ONE fused attention whose
route mask rides in extra head dimensions (anystory.fast.grouped), with the route keys/values prepared
once per run (η folded into the values) and the text attention's head merge fused with the sum.
:func:`anystory.paper.injection.routed_cross_attention` is the form it must equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..paper.injection import Eta, eta_per_token
from .grouped import extra_dims, key_extra, query_extra, with_extra


@dataclass
class PreparedRoutes:
    """E_i Ŵ_k^l, E_i Ŵ_v^l of all routes of a layer in the grouped layout (once per run):
    k, v: [1, H, K·m, D+E] (keys carry their route in the extra dims, values are zero-padded)."""

    k: torch.Tensor
    v: torch.Tensor
    num_routes: int
    dim_head: int
    expanded: dict = field(default_factory=dict)  # batch → (k, v) expanded views, made once

    def kv(self, b: int):
        hit = self.expanded.get(b)
        if hit is None:
            hit = (self.k.expand(b, -1, -1, -1), self.v.expand(b, -1, -1, -1))
            self.expanded[b] = hit
        return hit


def prepare_routes(k_routes: torch.Tensor, v_routes: torch.Tensor, heads: int,
                   eta: Optional[torch.Tensor] = None) -> PreparedRoutes:
    """``eta`` [K] (η per route) is folded into the values: every query attends to one route only,
    so η_r·Attn(Q, K_r, V_r) = Attn(Q, K_r, η_r·V_r) — no per-token scaling at run time."""
    K, m, C = k_routes.shape
    if eta is not None:
        v_routes = v_routes * eta.to(v_routes).view(K, 1, 1)
    D = C // heads
    E = extra_dims(K)
    groups = torch.arange(K, device=k_routes.device).repeat_interleave(m)
    ke = key_extra(groups, K, D, k_routes.dtype)
    k = with_extra(k_routes.reshape(1, K * m, C), heads, ke[None], E)
    v = with_extra(v_routes.reshape(1, K * m, C), heads, None, E)
    return PreparedRoutes(k, v, K, D)


def routed_cross_attention_fast(q: torch.Tensor, routes: PreparedRoutes, index: torch.Tensor, heads: int,
                                eta: Eta = 1.0, weight: Optional[torch.Tensor] = None,
                                q_extra: Optional[torch.Tensor] = None, buffers=None,
                                add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The routed term of eq. 5 for one-hot maps, as :func:`routed_cross_attention`, but with the route
    mask carried in extra head dimensions (no bias tensor; fused attention kernels stay available).
    ``q_extra`` may pass a cached :func:`query_extra` of ``index``; ``buffers`` a GroupedBuffers;
    ``eta`` is applied here unless it was folded into ``routes`` (pass 1.0 then). ``add_to`` (the text
    attention [B, L, C]): the routed term is added to it — in place when it is contiguous (the head merge
    and the sum of eq. 5 in one kernel) — and the sum returned."""
    b, n, c = q.shape
    D = routes.dim_head
    E = routes.k.shape[-1] - D
    qe = q_extra if q_extra is not None else query_extra(index, routes.num_routes, q.dtype)
    q_ext = buffers.query(q, heads, qe, E) if buffers is not None else with_extra(q, heads, qe, E)
    k, v = routes.kv(b)
    out = F.scaled_dot_product_attention(q_ext, k, v, scale=D ** -0.5)[..., :D].transpose(1, 2)  # [B, L, H, D]
    plain_eta = isinstance(eta, float) and eta == 1.0
    if add_to is not None and plain_eta and weight is None and add_to.is_contiguous():
        add_to.view(b, n, heads, D).add_(out)
        return add_to
    out = out.reshape(b, n, c)
    if not plain_eta:
        out = out * eta_per_token(eta, index, out.dtype)
    if weight is not None:
        out = out * weight.unsqueeze(-1).to(out.dtype)
    return out if add_to is None else add_to + out.to(add_to.dtype)


def cross_attention_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routes: PreparedRoutes, heads: int,
                         q_extra: torch.Tensor, buffers, text_sdpa: Callable,
                         out: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
    """Eq. 5 for one call (one-hot maps, η folded into ``routes``) as ``body(q, k, v)`` (anystory.graphs
    replays it from a CUDA graph; q, k, v here give the shapes): text attention ``text_sdpa`` on [B, H, L, D] (the
    host's SDPA, so the same kernels as its own attention) + the routed term, summed by the head merge;
    reads its arguments, the staging buffers and ``routes`` only; returns [B, L, C] (``out`` if given)."""
    b, n, c = q.shape
    D = routes.dim_head
    E = routes.k.shape[-1] - D
    q_dst, q_op = buffers.query_slot(q, heads, q_extra, E, role="q")
    rk, rv = routes.kv(b)
    scale = D ** -0.5

    def body(q, k, v) -> torch.Tensor:
        qh = q.view(b, n, heads, D)
        q_dst.copy_(qh)
        text = text_sdpa(qh.transpose(1, 2), k.view(b, -1, heads, D).transpose(1, 2),
                         v.view(b, -1, heads, D).transpose(1, 2))
        routed = F.scaled_dot_product_attention(q_op, rk, rv, scale=scale)[..., :D]
        res = out if out is not None else q.new_empty(b, n, c)
        torch.add(text.transpose(1, 2), routed.transpose(1, 2), out=res.view(b, n, heads, D))
        return res

    body.statics = (q_op, rk, rv, out)
    return body
