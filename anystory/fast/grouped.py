"""Grouped attention without a bias tensor: the routing masks of eq. 5 and eq. 6-8 carried in extra
head dimensions, so the routed attentions keep torch's fused kernels (no ``attn_mask``).

Routed attention (eq. 5 with one-hot maps, eq. 6-8) has a bias of a special form: key j belongs to a
group g(j) (a route, a subject's references) or is shared (g = −1); query u belongs to one group r(u)
(or none). bias[u, j] = 0 for shared keys, offset[g] if r(u) = g(j), −∞ otherwise. Such a bias is an
inner product of small vectors, so it can ride along in E extra head dimensions of q and k:

    q_e(u) = [1, one-hot(r(u)), 1, 0…],  k_e(j) = [−M, M·one-hot(g(j)), offset_g/scale, 0…]  (shared: 0)
    scale·(q_e·k_e) = −M·scale + M·scale·[r(u)=g(j)] + offset = offset or −M·scale  (M·scale = 512: exp → 0)

The paper forms (anystory.paper.injection / .reference) build the same bias densely; the tests hold
these functions to them.
"""
from __future__ import annotations

from typing import Optional

import torch

GROUP_BIG = 512.0  # exp(−512) = 0 in every float format; small enough to keep fp32 logits exact to ~1e-4


def extra_dims(num_groups: int) -> int:
    """Extra head dimensions for ``num_groups`` groups (a multiple of 8, as fused kernels want)."""
    return -(-(num_groups + 2) // 8) * 8


def query_extra(q_group: torch.Tensor, num_groups: int, dtype) -> torch.Tensor:
    """[B, L] group of each query (−1 or ≥ num_groups: none) → [B, L, E]."""
    E = extra_dims(num_groups)
    out = torch.zeros(*q_group.shape, E, dtype=dtype, device=q_group.device)
    out[..., 0] = 1
    out[..., num_groups + 1] = 1
    g = q_group.long()
    valid = (g >= 0) & (g < num_groups)
    idx = torch.where(valid, g + 1, torch.zeros_like(g))  # no group → dim 0, which is 1 anyway
    out.scatter_(-1, idx.unsqueeze(-1), torch.ones(*idx.shape, 1, dtype=dtype, device=idx.device))
    return out


def key_extra(k_group: torch.Tensor, num_groups: int, dim_head: int, dtype,
              offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[Lk] group of each key (−1: shared) → [Lk, E]; ``offsets``: [num_groups] logit offsets."""
    E = extra_dims(num_groups)
    scale = dim_head ** -0.5
    M = torch.tensor(GROUP_BIG / scale, dtype=dtype).item()  # the same rounded value with both signs
    out = torch.zeros(k_group.shape[0], E, dtype=torch.float32, device=k_group.device)
    g = k_group.long()
    grouped = g >= 0
    out[grouped, 0] = -M
    idx = grouped.nonzero().squeeze(-1)
    out[idx, g[idx] + 1] = M
    if offsets is not None:
        out[idx, num_groups + 1] = offsets.to(out.device).float()[g[idx]] / scale
    return out.to(dtype)


def with_extra(x: torch.Tensor, heads: int, extra: Optional[torch.Tensor], E: int) -> torch.Tensor:
    """[B, L, H·D] (+ extra [B or 1, L, E] or None = zeros) → [B, H, L, D+E], stored as [B, L, H, D+E]
    (the layout ComfyUI's q/k/v already have per head: staging is one copy, no transpose)."""
    b, n, c = x.shape
    D = c // heads
    out = x.new_empty(b, n, heads, D + E)
    out[..., :D] = x.view(b, n, heads, D)
    if extra is None:
        out[..., D:] = 0
    else:
        out[..., D:] = extra.to(x.dtype)[:, :, None].expand(b, n, heads, E)
    return out.transpose(1, 2)


def query_extra_table(num_groups: int, rows: int, dtype, device) -> torch.Tensor:
    """[rows, E]: row g is :func:`query_extra` of group g (rows ≥ num_groups: no group), so the query
    extras of a route index are one embedding lookup (one kernel) instead of a scatter."""
    g = torch.arange(rows)
    return query_extra(g, num_groups, dtype).to(device)


def autograd_records(*tensors) -> bool:
    """Autograd records an op on these (e.g. a sampler run outside inference mode on a model that requires
    grad): then no buffer reused across layers (it may hold a tensor saved for backward), no in-place or
    ``out=`` forms."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class GroupedBuffers:
    """Reusable staging buffers of the grouped attention, one set per shape, so that a call costs one
    copy per operand (no cat/pad allocations) and as few host-side ops as possible: a buffer is stored as
    [B, L, H, D+E] (ComfyUI's q/k/v viewed per head, so staging copies need no transpose) and handed to
    SDPA as its [B, H, L, D+E] view; the slices that are written every call are views made once.
    ComfyUI runs one UNet call at a time on one stream, so reuse across layers is ordered. The extra dims
    of the self-key rows stay zero; the query's extra dims are rewritten only when the routing
    (``q_extra``) changes."""

    def __init__(self):
        self._bufs: dict = {}

    def clear(self) -> None:
        self._bufs.clear()

    def query(self, q: torch.Tensor, heads: int, q_extra: torch.Tensor, E: int, role: str = "q") -> torch.Tensor:
        """q staged with its extra dims: the [B, H, L, D+E] operand of SDPA. ``role`` keeps one buffer per
        caller (attn1 / attn2 of the same shape alternate layer by layer; with their own buffers neither
        rewrites the other's extra dims at every layer)."""
        if autograd_records(q):  # in-place writes through views made earlier would break the graph
            return with_extra(q, heads, q_extra, E)
        dst, operand = self.query_slot(q, heads, q_extra, E, role)
        b, n, c = q.shape
        dst.copy_(q.view(b, n, heads, c // heads))
        return operand

    def query_slot(self, q: torch.Tensor, heads: int, q_extra: torch.Tensor, E: int, role: str = "q"):
        """(the [B, L, H, D] view q is copied into, the [B, H, L, D+E] SDPA operand): the buffer for q's
        shape, its extra dims rewritten here when the routing (``q_extra``) changed — so a body replayed
        from a CUDA graph only copies q."""
        b, n, c = q.shape
        D = c // heads
        key = (role, b, heads, n, D, E, q.dtype, q.device)
        ent = self._bufs.get(key)
        if ent is None:
            buf = q.new_empty(b, n, heads, D + E)
            ent = [buf[..., :D], None, buf[..., D:], buf.transpose(1, 2)]
            self._bufs[key] = ent
        if ent[1] is not q_extra:
            ent[2].copy_(q_extra.to(q.dtype)[:, :, None].expand(b, n, heads, E))
            ent[1] = q_extra  # kept alive, so the identity test is sound
        return ent[0], ent[3]

    def keys(self, x: torch.Tensor, heads: int, tail: torch.Tensor, E: int, which: str) -> torch.Tensor:
        """[x (own tokens, extra dims 0); tail ([1, H, T, D+E], all rows)] as one [B, H, L+T, D+E]."""
        if autograd_records(x, tail):
            b = x.shape[0]
            return torch.cat([with_extra(x, heads, None, E), tail.to(x.dtype).expand(b, -1, -1, -1)], dim=2)
        own, tail_dst, tail_src, operand = self.key_slot(x, heads, tail, E, which)
        b, n, c = x.shape
        own.copy_(x.view(b, n, heads, c // heads))
        tail_dst.copy_(tail_src)
        return operand

    def key_slot(self, x: torch.Tensor, heads: int, tail: torch.Tensor, E: int, which: str):
        """(view x is copied into, view the tail is copied into, the tail as [B, T, H, D+E], the
        [B, H, L+T, D+E] SDPA operand) of the buffer for this shape (layers of one shape share it)."""
        b, n, c = x.shape
        D = c // heads
        T = tail.shape[2]
        key = (which, b, heads, n, T, D, E, x.dtype, x.device)
        ent = self._bufs.get(key)
        if ent is None:
            buf = x.new_empty(b, n + T, heads, D + E)
            buf[:, :n, :, D:] = 0
            ent = [buf[:, :n, :, :D], buf[:, n:], buf.transpose(1, 2), {}]
            self._bufs[key] = ent
        src = ent[3].get(id(tail))  # the tail as [B, T, H, D+E], made once per tail (kept alive with it)
        if src is None or src[0] is not tail:
            src = (tail, tail.transpose(1, 2).expand(b, -1, -1, -1))
            ent[3][id(tail)] = src
        return ent[0], ent[1], src[1], ent[2]

    def output(self, like: torch.Tensor, role: str) -> torch.Tensor:
        """A [B, L, C] output buffer of ``like``'s shape, one per role and shape (the static output of a
        body replayed from a CUDA graph; its caller consumes it before the next layer runs)."""
        key = ("out", role, tuple(like.shape), like.dtype, like.device)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf
