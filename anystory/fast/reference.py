"""Eq. 6-8 on the fast inference path: the subjects' reference keys/values K̃_i^l, Ṽ_i^l prepared once
per run in the grouped layout (each key carries its subject and ln γ_i in extra head dimensions,
anystory.fast.grouped), and the attn1 body — one fused attention over [own keys; references] for the
rows that may be routed to a subject, the plain attention for the others — that anystory.fast.graphs
replays from a CUDA graph. :func:`anystory.paper.reference.routed_reference_attention` is the form it
must equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..paper.attention import NEG
from ..paper.reference import Gamma, RefList, as_list, log_gamma
from .grouped import GroupedBuffers, autograd_records, extra_dims, key_extra, with_extra


@dataclass
class PreparedReferences:
    """K̃_i^l, Ṽ_i^l of all subjects of a layer in the grouped layout (once per run): k, v
    [1, H, ΣL_ref, D+E]; each key carries its subject and ln γ_i in the extra dims."""

    k: torch.Tensor
    v: torch.Tensor
    num_subjects: int
    dim_head: int


def prepare_references(k_ref: RefList, v_ref: RefList, heads: int, gamma: Gamma) -> Optional[PreparedReferences]:
    """None when no subject has reference tokens with γ > 0 (then attn1 is the plain attention)."""
    k_ref, v_ref = as_list(k_ref), as_list(v_ref)
    n = len(k_ref)
    if n == 0:
        return None
    lg = log_gamma(torch.as_tensor(gamma).cpu(), n, "cpu")  # decided on the host: no device sync
    keep = [i for i in range(n) if k_ref[i].shape[0] > 0 and float(lg[i]) > NEG]
    if not keep:
        return None
    C = k_ref[0].shape[-1]
    D = C // heads
    E = extra_dims(n)
    groups = torch.cat([torch.full((k_ref[i].shape[0],), i) for i in keep])
    ks = torch.cat([k_ref[i] for i in keep])[None]
    vs = torch.cat([v_ref[i] for i in keep])[None]
    # built on the host, sent without waiting for the device (the source is a fresh host tensor)
    ke = key_extra(groups, n, D, ks.dtype, offsets=lg).to(ks.device, non_blocking=True)
    return PreparedReferences(with_extra(ks, heads, ke[None], E), with_extra(vs, heads, None, E), n, D)


def reference_attention_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, refs: PreparedReferences,
                             heads: int, q_extra: torch.Tensor, buffers: GroupedBuffers,
                             rows: Optional[slice] = None, plain: Optional[Callable] = None,
                             out: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
    """Eq. 6-8 for one call as ``body(q, k, v)`` (anystory.graphs replays it from a CUDA graph; q, k, v
    here give the shapes): it reads its arguments, the staging buffers and ``refs`` only, and returns
    [B, L, C].

    ``rows``: the rows whose queries may be routed to a subject (the cond rows, one contiguous slice);
    ``q_extra`` [len(rows), L, E] are their query extras. The other rows (uncond: routed to the
    background, so they meet no reference) get the plain attention over their own tokens — half the
    attention work of the fused call for the usual cond/uncond batch. ``plain``: the SDPA on [B, H, L, D]
    (with ``scale=``) both attentions use — the host's, under its backend priority (ComfyUI's puts cuDNN
    first, which on Hopper runs the fused call's 72-wide heads in about half flash's time); torch's by
    default. ``out``: a [B, L, C] buffer to write into (else a new tensor)."""
    b, n, c = q.shape
    D = refs.dim_head
    E = refs.k.shape[-1] - D
    sl = rows if rows is not None else slice(0, b)
    others = [s for s in (slice(0, sl.start), slice(sl.stop, b)) if s.stop > s.start]
    g = sl.stop - sl.start
    attend = plain if plain is not None else torch.nn.functional.scaled_dot_product_attention
    scale = D ** -0.5

    def plain_rows(q, k, v, s: slice) -> torch.Tensor:  # [rows, L, H, D]
        qs, ks, vs = (t[s].view(s.stop - s.start, -1, heads, D).transpose(1, 2) for t in (q, k, v))
        return attend(qs, ks, vs).transpose(1, 2)

    if autograd_records(q, k, v, refs.k, refs.v):  # no buffer reused across calls, no writes through old views
        def tracked(q, k, v) -> torch.Tensor:
            qg, kg, vg = (t[sl] if others else t for t in (q, k, v))
            fresh = GroupedBuffers()  # its query/keys stage out of place for operands that autograd records
            grouped = torch.nn.functional.scaled_dot_product_attention(
                fresh.query(qg, heads, q_extra, E, "q1"), fresh.keys(kg, heads, refs.k, E, "k"),
                fresh.keys(vg, heads, refs.v, E, "v"), scale=scale)
            parts = {sl.start: grouped[..., :D].transpose(1, 2)} | {s.start: plain_rows(q, k, v, s) for s in others}
            return torch.cat([parts[i] for i in sorted(parts)]).reshape(b, n, c)
        tracked.statics = ()
        return tracked

    qg, kg, vg = (t[sl] if others else t for t in (q, k, v))
    q_dst, q_op = buffers.query_slot(qg, heads, q_extra, E, role="q1")
    k_dst, kt_dst, kt_src, k_op = buffers.key_slot(kg, heads, refs.k, E, "k")
    v_dst, vt_dst, vt_src, v_op = buffers.key_slot(vg, heads, refs.v, E, "v")

    def body(q, k, v) -> torch.Tensor:
        qg, kg, vg = (t[sl] if others else t for t in (q, k, v))
        q_dst.copy_(qg.view(g, n, heads, D))
        k_dst.copy_(kg.view(g, -1, heads, D))
        kt_dst.copy_(kt_src)
        v_dst.copy_(vg.view(g, -1, heads, D))
        vt_dst.copy_(vt_src)
        grouped = attend(q_op, k_op, v_op, scale=scale)
        res = out if out is not None else q.new_empty(b, n, c)
        heads_view = res.view(b, n, heads, D)
        heads_view[sl].copy_(grouped[..., :D].transpose(1, 2))
        for s in others:
            heads_view[s].copy_(plain_rows(q, k, v, s))
        return res

    body.statics = (q_op, k_op, v_op, refs.k, refs.v, out)
    return body
