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
The fast inference path (anystory.fast.injection) evaluates the one-hot form without a bias tensor; the
tests hold it to these functions.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .attention import NEG, AttnFn, sdpa


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


def eta_per_token(eta: Eta, index: torch.Tensor, dtype) -> Union[float, torch.Tensor]:
    """η of each query's route: a float, or [B, L, 1] from η per route ([K] or [B, K]) and the route index."""
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
    out = out * eta_per_token(eta, index, out.dtype)
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
