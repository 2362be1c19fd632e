"""Routed decoupled cross-attention (eq. 5), at attn2 of layer l with strength η:

    Ẑ^l = Attn(Q, K_text, V_text) + η · Σ_{i=1}^{N+1} σ(M_i^l) ⊙ Attn(Q, E_i Ŵ_k^l, E_i Ŵ_v^l)

Ŵ_k^l, Ŵ_v^l are per-layer projections of the subject tokens (IP-Adapter's ``to_k_ip`` / ``to_v_ip``,
checkpoint keys ``ip_adapter.{N}.to_k_ip.weight`` of shape C×2048).

Two evaluations of the same sum:

- :func:`routed_cross_attention_sum` — eq. 5 as written, N+1 attentions weighted by the maps; exact
  for soft maps and differentiable through them (training, Gumbel straight-through);
- :func:`routed_cross_attention` — for one-hot σ(M) (inference) the sum equals ONE attention over the
  concatenated route tokens [E_1Ŵ_k … E_{N+1}Ŵ_k] with a bias that is 0 on the columns of the query's
  own route and −∞ elsewhere: one kernel call instead of N+1.

η may be a scalar or one value per route (per-subject strengths; the background route is the last).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import NEG, AttnFn, extra_dims, key_extra, query_extra, sdpa, with_extra


class DecoupledKV(nn.Module):
    """Ŵ_k^l, Ŵ_v^l of one layer: subject tokens (2048-d) → keys/values of width C."""

    def __init__(self, dim: int, route_dim: int = 2048):
        super().__init__()
        self.to_k_ip = nn.Linear(route_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(route_dim, dim, bias=False)

    def forward(self, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E: [..., m, 2048] → (E Ŵ_k, E Ŵ_v), each [..., m, C]."""
        return self.to_k_ip(E), self.to_v_ip(E)


Eta = Union[float, torch.Tensor]


def _eta_per_token(eta: Eta, index: torch.Tensor, dtype) -> Union[float, torch.Tensor]:
    if not torch.is_tensor(eta):
        return float(eta)
    eta = eta.to(index.device)
    if eta.ndim == 1:  # [K]
        return eta[index].unsqueeze(-1).to(dtype)
    return torch.gather(eta, 1, index).unsqueeze(-1).to(dtype)  # [B, K]


def route_bias(index: torch.Tensor, tokens_per_route: int, num_routes: int, dtype) -> torch.Tensor:
    """Bias [B, 1, L, K·m]: 0 where column j belongs to the route of query l (j // m == index[l]),
    NEG elsewhere."""
    col_route = torch.arange(num_routes, device=index.device).repeat_interleave(tokens_per_route)
    same = index.unsqueeze(-1) == col_route  # [B, L, K·m]
    return torch.where(same, 0.0, NEG).to(dtype).unsqueeze(1)


def routed_cross_attention(q: torch.Tensor, k_routes: torch.Tensor, v_routes: torch.Tensor,
                           index: torch.Tensor, heads: int, eta: Eta = 1.0,
                           attn_fn: AttnFn = sdpa, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """η ⊙ Σ_i one-hot(M_i) ⊙ Attn(Q, K_i, V_i) as one biased attention (the routed term of eq. 5).

    q: [B, L, C]; k_routes, v_routes: [K, m, C] (shared by the batch) or [B, K, m, C];
    index: [B, L] route of each query (0…K-1); weight: optional [B, L] per-token factor (feathered
    region masks fade the injection towards their edges). Returns [B, L, C] — add it to the text
    attention."""
    b = q.shape[0]
    if k_routes.ndim == 3:
        k_routes, v_routes = k_routes.unsqueeze(0), v_routes.unsqueeze(0)
    _, K, m, C = k_routes.shape
    k = k_routes.expand(b, -1, -1, -1).reshape(b, K * m, C).to(q.dtype)
    v = v_routes.expand(b, -1, -1, -1).reshape(b, K * m, C).to(q.dtype)
    out = attn_fn(q, k, v, heads, mask=route_bias(index, m, K, q.dtype))
    out = out * _eta_per_token(eta, index, out.dtype)
    if weight is not None:
        out = out * weight.unsqueeze(-1).to(out.dtype)
    return out


def routed_cross_attention_sum(q: torch.Tensor, k_routes: torch.Tensor, v_routes: torch.Tensor,
                               maps: torch.Tensor, heads: int, eta: Eta = 1.0,
                               attn_fn: AttnFn = sdpa) -> torch.Tensor:
    """η · Σ_i σ(M_i) ⊙ Attn(Q, K_i, V_i), eq. 5 as written (maps: [B, K, L], soft or one-hot)."""
    b, L, C = q.shape
    if k_routes.ndim == 3:
        k_routes, v_routes = k_routes.unsqueeze(0), v_routes.unsqueeze(0)
    K, m = k_routes.shape[1], k_routes.shape[2]
    qk = q.unsqueeze(1).expand(b, K, L, C).reshape(b * K, L, C)
    k = k_routes.expand(b, -1, -1, -1).reshape(b * K, m, C).to(q.dtype)
    v = v_routes.expand(b, -1, -1, -1).reshape(b * K, m, C).to(q.dtype)
    per_route = attn_fn(qk, k, v, heads).view(b, K, L, C)
    w = maps.to(per_route.dtype).unsqueeze(-1)
    if torch.is_tensor(eta):
        eta = eta.to(per_route)
        w = w * (eta.view(1, K, 1, 1) if eta.ndim == 1 else eta.view(b, K, 1, 1))
    else:
        w = w * float(eta)
    return (w * per_route).sum(1)


def project_routes(ip_layer: DecoupledKV, E: torch.Tensor, dtype: Optional[torch.dtype] = None):
    """(E_i Ŵ_k^l, E_i Ŵ_v^l) for every route of a layer; E: [K, m, 2048]."""
    k, v = ip_layer(E.to(ip_layer.to_k_ip.weight.dtype))
    if dtype is not None:
        k, v = k.to(dtype), v.to(dtype)
    return k, v


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
        out = out * _eta_per_token(eta, index, out.dtype)
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
