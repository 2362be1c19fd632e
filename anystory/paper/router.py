"""Routing (§1.2): in every cross-attention layer l, decide for each latent token which route it
belongs to — one of the N subjects or the background (route N+1).

For the latent tokens Z^l (hw × C) and the routing features R_1…R_{N+1}:

1. coarse map: projected inner product ⟨R_i Ŵ_r, Z^l Ŵ_z⟩/√D → logits (N+1) × hw;
2. refinement: each R_i is updated by a masked cross-attention over Z^l (queries R_i, keys/values
   Z^l) in which route i only sees the tokens its coarse map assigns to it (Mask2Former-style; a route
   that was assigned no token sees all tokens, so no row is ever fully masked);
3. refined map: the same projected inner product with the updated features → logits;
   M_i^l = softmax_i(logits). At inference σ(M^l) = one-hot(argmax_i); in training the straight-through
   Gumbel-softmax keeps gradients flowing.

Checkpoint keys per layer N (IP-Adapter odd numbering): ``router.{N}.proj_z``, ``proj_r``,
``refine_norm``, ``refine_q``, ``refine_k``, ``refine_v``, ``refine_out``.

Maps are passed around as a *route index* ``[B, hw]`` (long, values 0…N, N = background) — the
argmax of M^l — or as soft/one-hot maps ``[B, N+1, hw]``.

:meth:`LayerRouter.forward` is the definition; anystory.fast.router evaluates the same logits at
inference with the router's linear maps folded into a few matrices once per run.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import NEG, sdpa


class LayerRouter(nn.Module):
    """The router of one cross-attention layer (width ``dim`` = C of the layer)."""

    def __init__(self, dim: int, route_dim: int = 2048, router_dim: int = 256, heads: int = 4):
        super().__init__()
        if router_dim % heads:
            raise ValueError("router_dim must be divisible by heads")
        self.heads = heads
        self.router_dim = router_dim
        self.proj_z = nn.Linear(dim, router_dim)
        self.proj_r = nn.Linear(route_dim, router_dim)
        self.refine_norm = nn.LayerNorm(route_dim)
        self.refine_q = nn.Linear(route_dim, router_dim, bias=False)
        self.refine_k = nn.Linear(dim, router_dim, bias=False)
        self.refine_v = nn.Linear(dim, router_dim, bias=False)
        self.refine_out = nn.Linear(router_dim, route_dim)

    def _logits(self, zp: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        rp = self.proj_r(r)
        return torch.einsum("bkd,bld->bkl", rp.float(), zp.float()) / math.sqrt(self.router_dim)

    def forward(self, z: torch.Tensor, r: torch.Tensor, return_coarse: bool = False):
        """z: [B, L, C] latent tokens Z^l; r: [B, K, route_dim] routing features (K = N+1).

        Returns refined logits [B, K, L] in fp32 (and the coarse ones if asked)."""
        r = r.to(z.dtype)
        zp = self.proj_z(z)
        coarse = self._logits(zp, r)
        bias = coarse_attention_bias(coarse).to(z.dtype)  # [B, K, L]
        q = self.refine_q(self.refine_norm(r))
        upd = sdpa(q, self.refine_k(z), self.refine_v(z), self.heads, mask=bias[:, None])
        r_new = r + self.refine_out(upd)
        refined = self._logits(zp, r_new)
        return (refined, coarse) if return_coarse else refined


def coarse_attention_bias(coarse_logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former-style mask from coarse logits [B, K, L]: 0 where token l is assigned to route k
    (argmax over k), NEG elsewhere; a route that owns no token may attend to every token."""
    K = coarse_logits.shape[1]
    owner = coarse_logits.argmax(1, keepdim=True)  # [B, 1, L]
    assign = owner == torch.arange(K, device=owner.device).view(1, K, 1)  # [B, K, L]
    allowed = assign | ~assign.any(-1, keepdim=True)
    return torch.where(allowed, 0.0, NEG).to(coarse_logits.dtype)


def route_index(logits: torch.Tensor) -> torch.Tensor:
    """σ(M^l) at inference: argmax over routes. logits [B, K, L] → route index [B, L] (long)."""
    return logits.argmax(1)


def one_hot_maps(index: torch.Tensor, num_routes: int, dtype=torch.float32) -> torch.Tensor:
    """route index [B, L] → one-hot maps [B, K, L]."""
    return F.one_hot(index, num_routes).transpose(1, 2).to(dtype)


def soft_maps(logits: torch.Tensor) -> torch.Tensor:
    """M_i^l = softmax over routes of the refined logits [B, K, L]."""
    return logits.softmax(1)


def gumbel_maps(logits: torch.Tensor, tau: float = 1.0, hard: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Training-time σ(M^l): Gumbel-softmax over routes; with ``hard`` the forward value is one-hot and
    the gradient is the soft sample's (straight-through)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    g = -torch.log((-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10))
    y = ((logits.float() + g) / tau).softmax(1)
    if not hard:
        return y
    y_hard = F.one_hot(y.argmax(1), y.shape[1]).transpose(1, 2).to(y.dtype)
    return y_hard - y.detach() + y


ROUTING_REDUCTIONS = ("sum", "mean")


def routing_loss(maps: torch.Tensor, target: torch.Tensor, num_subjects: int, reduction: str = "sum") -> torch.Tensor:
    """The instance-aware routing loss of one layer l, eq. 4 without its weight λ (λ = 0.1 is applied by the
    trainer): (1/N) Σ_i ‖M_i^l − M_i^gt‖²₂ over the N subject routes (maps, target: [B, K, L] with L = h·w
    tokens; averaged over the batch B).

    ``reduction`` says what happens over the L tokens of the layer:

    - ``"sum"`` (eq. 4, the default): the squared L2 norm, a sum over the h·w tokens — so a layer's loss
      grows with its grid (1 024 / 4 096 tokens at SDXL's 1024² grids);
    - ``"mean"``: the mean over the tokens (= sum / (h·w)): layers of any size weigh alike, and the loss is
      1 000-4 000× weaker than eq. 4 at SDXL's grids (what this pack did before; kept as a named option).
    """
    if reduction not in ROUTING_REDUCTIONS:
        raise ValueError(f"routing loss reduction must be one of {ROUTING_REDUCTIONS}, got {reduction!r}")
    diff = (maps[:, :num_subjects].float() - target[:, :num_subjects].float()) ** 2
    per_route = diff.sum(-1) if reduction == "sum" else diff.mean(-1)   # [B, N]: ‖M_i − M_i^gt‖² (or / hw)
    return per_route.sum(1).mean() / max(1, num_subjects)


def resize_index(index: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of a route index [B, h·w] (row-major) from grid src_hw to dst_hw."""
    if tuple(src_hw) == tuple(dst_hw):
        return index
    b = index.shape[0]
    grid = index.view(b, 1, *src_hw).float()
    out = F.interpolate(grid, size=tuple(dst_hw), mode="nearest-exact")
    return out.view(b, -1).long()
