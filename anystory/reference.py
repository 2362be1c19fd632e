"""Routed reference attention (eq. 6-8), at attn1 of layer l with reference strength γ.

The ReferenceNet (a UNet without cross-attention, fed the subject's latent and mask, no noise) gives
for every subject i and layer l the hidden states G_i^l entering self-attention. The denoising UNet
projects them with its own attn1 weights, K̃_i^l = G_i^l W_k^l, Ṽ_i^l = G_i^l W_v^l, and attends to
them next to its own tokens:

    Z̃^l = softmax(Q [K, K̃_1^l … K̃_N^l]ᵀ/√d + [0, g(M_1^{l-1}) + log γ_1, …]) · [V, Ṽ_1^l … Ṽ_N^l]

with g(M)_{u,·} = 0 if query token u is routed to subject i by the previous layer's map M^{l-1}
(resized to this layer's grid) and −∞ otherwise. Background-routed tokens see no reference.

**γ as a strength.** The paper writes γ as an additive logit offset. Here γ ≥ 0 is the factor by
which the attention mass of the reference tokens is scaled before normalisation, i.e. the logit
offset is ln γ: γ = 1 is the paper's offset 0, γ > 1 pulls harder towards the reference, and γ = 0
removes the references exactly (the un-patched attention, bit for bit).

Two evaluations that must agree:
- :func:`routed_reference_attention` — dense: one attention over [K, K̃_1…K̃_N] with a bias;
- :func:`routed_reference_attention_sparse` — block-sparse: queries routed to subject i attend to
  their own tokens plus K̃_i only; background queries run the plain attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from .attention import (NEG, AttnFn, GroupedBuffers, autograd_records, extra_dims, key_extra, query_extra, sdpa,
                        with_extra)

Gamma = Union[float, torch.Tensor]


def _log_gamma(gamma: Gamma, n: int, device) -> torch.Tensor:
    g = torch.as_tensor(gamma, dtype=torch.float32, device=device).flatten()
    if g.numel() == 1:
        g = g.expand(n)
    if g.numel() != n:
        raise ValueError(f"γ has {g.numel()} values for {n} subjects")
    if (g < 0).any():
        raise ValueError("γ (reference strength) must be ≥ 0")
    return torch.where(g > 0, g.clamp_min(1e-30).log(), torch.full_like(g, NEG))


def gamma_is_zero(gamma: Gamma) -> bool:
    if torch.is_tensor(gamma):
        return bool((gamma == 0).all())
    return float(gamma) == 0.0


RefList = Union[torch.Tensor, list]  # [N, L_ref, C] or a list of N tensors [L_ref_i, C]


def _as_list(refs: RefList) -> list:
    return list(refs.unbind(0)) if torch.is_tensor(refs) else list(refs)


def reference_bias(index: torch.Tensor, ref_lengths: list, self_len: int, gamma: Gamma, dtype) -> torch.Tensor:
    """Bias [B, 1, L, L + Σ_i L_ref,i] of eq. 6: 0 on the self columns; on subject j's columns ln γ_j
    where the query is routed to j (index == j), NEG elsewhere. index: [B, L] (values 0…N, N = bg)."""
    n = len(ref_lengths)
    lg = _log_gamma(gamma, n, index.device)
    col_subject = torch.repeat_interleave(torch.arange(n, device=index.device),
                                          torch.as_tensor(ref_lengths, device=index.device))
    same = index.unsqueeze(-1) == col_subject  # [B, L, ΣL_ref]
    ref = torch.where(same, lg[col_subject], torch.tensor(NEG, device=index.device))
    selfcols = torch.zeros(index.shape[0], index.shape[1], self_len, device=index.device)
    return torch.cat([selfcols, ref], dim=-1).to(dtype).unsqueeze(1)


def routed_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               k_ref: RefList, v_ref: RefList, index: torch.Tensor,
                               heads: int, gamma: Gamma = 1.0, attn_fn: AttnFn = sdpa) -> torch.Tensor:
    """Eq. 6-8, dense form. q, k, v: [B, L, C] (the layer's own projections); k_ref, v_ref: K̃_i^l, Ṽ_i^l
    per subject ([N, L_ref, C] or a list of [L_ref,i, C]); index: [B, L] route of each query under M^{l-1}."""
    k_ref, v_ref = _as_list(k_ref), _as_list(v_ref)
    if gamma_is_zero(gamma) or not k_ref:
        return attn_fn(q, k, v, heads)
    b = q.shape[0]
    kc = torch.cat([k] + [r.to(k.dtype).unsqueeze(0).expand(b, -1, -1) for r in k_ref], dim=1)
    vc = torch.cat([v] + [r.to(v.dtype).unsqueeze(0).expand(b, -1, -1) for r in v_ref], dim=1)
    bias = reference_bias(index, [r.shape[0] for r in k_ref], k.shape[1], gamma, q.dtype)
    return attn_fn(q, kc, vc, heads, mask=bias)


def routed_reference_attention_sparse(q, k, v, k_ref: RefList, v_ref: RefList, index, heads,
                                      gamma: Gamma = 1.0, attn_fn: AttnFn = sdpa) -> torch.Tensor:
    """Eq. 6-8, block-sparse form: every query meets its own tokens plus the references of the one
    subject it is routed to; background queries get the plain attention."""
    out = attn_fn(q, k, v, heads)
    k_ref, v_ref = _as_list(k_ref), _as_list(v_ref)
    if gamma_is_zero(gamma) or not k_ref:
        return out
    lg = _log_gamma(gamma, len(k_ref), q.device)
    out = out.clone()
    for j, (kr, vr) in enumerate(zip(k_ref, v_ref)):
        if lg[j] <= NEG or kr.shape[0] == 0:
            continue
        for bi in range(q.shape[0]):
            rows = (index[bi] == j).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            qj = q[bi:bi + 1, rows]
            kj = torch.cat([k[bi:bi + 1], kr.to(k.dtype).unsqueeze(0)], dim=1)
            vj = torch.cat([v[bi:bi + 1], vr.to(v.dtype).unsqueeze(0)], dim=1)
            mask = None
            if float(lg[j]) != 0.0:
                mask = torch.zeros(1, 1, 1, kj.shape[1], dtype=q.dtype, device=q.device)
                mask[..., k.shape[1]:] = lg[j].to(q.dtype)
            out[bi, rows] = attn_fn(qj, kj, vj, heads, mask=mask)[0]
    return out


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
    k_ref, v_ref = _as_list(k_ref), _as_list(v_ref)
    n = len(k_ref)
    if n == 0:
        return None
    lg = _log_gamma(torch.as_tensor(gamma).cpu(), n, "cpu")  # decided on the host: no device sync
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


def routed_reference_attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    refs: Optional[PreparedReferences], index: torch.Tensor, heads: int,
                                    q_extra: Optional[torch.Tensor] = None, buffers=None,
                                    rows: Optional[slice] = None) -> torch.Tensor:
    """Eq. 6-8 as :func:`routed_reference_attention`, with the routing bias carried in extra head
    dimensions: one fused attention over [own keys; all subjects' reference keys], no bias tensor.
    ``buffers`` (a GroupedBuffers) stages the operands with one copy each; ``rows``: see
    :func:`reference_attention_body`."""
    if refs is None:
        return sdpa(q, k, v, heads)
    qe = q_extra if q_extra is not None else query_extra(index, refs.num_subjects, q.dtype)
    if rows is not None:
        qe = qe[rows]
    return reference_attention_body(q, k, v, refs, heads, qe, buffers if buffers is not None else GroupedBuffers(),
                                    rows=rows)(q, k, v)


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


@dataclass
class ReferenceFeatures:
    """G_i^l of N subjects, computed once at encode time (the ReferenceNet sees no noise).

    features: layer key → [N, L_ref, C] hidden states entering attn1 (after norm1) of that layer.
    grids: layer key → (h_G, w_G) token grid of that layer.
    valid: layer key → [N, L_ref] bool, the reference tokens that lie on the subject (its mask,
        resized to the layer's grid); tokens of the neutral background fill are left out. Empty: all.
    source: "native" (trained ReferenceNet) or "shared" (the denoising UNet itself).
    """

    features: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    source: str = "native"
    valid: dict = field(default_factory=dict)

    def subject_tokens(self, key, i: int) -> torch.Tensor:
        """G_i^l restricted to the subject's own tokens: [L_ref,i, C]."""
        g = self.features[key][i]
        if key in self.valid:
            g = g[self.valid[key][i].to(g.device)]
        return g

    def valid_rows(self, key) -> tuple[torch.Tensor, list]:
        """The subjects' own tokens of layer l as (row index [T] into G^l flattened over subjects, on the
        CPU; tokens per subject): G^l.flatten(0, 1)[rows] is every subject's G_i^l, subject after subject."""
        f = self.features[key]
        n, L = f.shape[0], f.shape[1]
        valid = self.valid.get(key)
        rows, lengths = [], []
        for i in range(n):
            r = torch.arange(L) if valid is None else valid[i].cpu().nonzero().squeeze(-1)
            rows.append(r + i * L)
            lengths.append(int(r.numel()))
        return torch.cat(rows), lengths

    @property
    def num_subjects(self) -> int:
        return next(iter(self.features.values())).shape[0] if self.features else 0

    def concat(self, other: "ReferenceFeatures") -> "ReferenceFeatures":
        """Subjects of self, then of other (for chained encode nodes). Layers must match."""
        if not self.features:
            return other
        if not other.features:
            return self
        if set(self.features) != set(other.features):
            raise ValueError("reference features of the subjects cover different layers; encode all "
                             "subjects with the same ReferenceNet and MODEL")
        feats = {}
        for key, f in self.features.items():
            g = other.features[key]
            if f.shape[1:] != g.shape[1:]:
                raise ValueError(f"reference features of layer {key} differ in shape: {tuple(f.shape)} vs "
                                 f"{tuple(g.shape)}; encode every subject at the same reference size")
            feats[key] = torch.cat([f, g.to(f)], dim=0)
        valid = {}
        if self.valid or other.valid:
            for key, f in self.features.items():
                va = self.valid.get(key, torch.ones(f.shape[:2], dtype=torch.bool))
                vb = other.valid.get(key, torch.ones(other.features[key].shape[:2], dtype=torch.bool))
                valid[key] = torch.cat([va, vb.to(va.device)], dim=0)
        src = self.source if self.source == other.source else "mixed"
        return ReferenceFeatures(feats, dict(self.grids), src, valid)

    def select(self, idx: list[int]) -> "ReferenceFeatures":
        return ReferenceFeatures({k: f[idx] for k, f in self.features.items()}, dict(self.grids), self.source,
                                 {k: v[idx] for k, v in self.valid.items()})

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features.values())


class PinnedStaging:
    """Page-locked host buffers for the device → host transfer of G_i^l, one prepared ahead per size.

    A subject's G_i^l (≈ 52 MB for SDXL at 512²) is kept on the host while ComfyUI caches the encode.
    Through fresh pageable memory its transfer costs ≈ 34 ms on an H200 host (the page faults of the new
    buffer); through page-locked memory ≈ 1 ms — but page-locking a new buffer costs as much. So each
    :meth:`take` hands out a buffer allocated in the background after the previous take of that size
    (allocation releases the GIL) and starts the next one: every encode after the first finds its buffer
    ready. One spare buffer per recent size stays allocated (≈ 52 MB of page-locked host memory)."""

    def __init__(self, keep_sizes: int = 2, alloc: Optional[Callable] = None):
        self.keep_sizes = int(keep_sizes)
        self.alloc = alloc or (lambda numel, dtype: torch.empty(numel, dtype=dtype, pin_memory=True))
        self._pending: dict = {}
        self._pool = None

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = (int(numel), dtype)
        fut = self._pending.pop(key, None)
        buf = None
        if fut is not None:
            try:
                buf = fut.result()
            except Exception:  # noqa: BLE001 — allocate here instead
                buf = None
        if buf is None:
            buf = self.alloc(key[0], dtype)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anystory-pinned")
        self._pending[key] = self._pool.submit(self.alloc, key[0], dtype)
        while len(self._pending) > self.keep_sizes:  # a spare for the most recent sizes only
            self._pending.pop(next(iter(self._pending)))
        return buf


def move_together(tensors: list, device, copy: bool = False, staging: Optional[PinnedStaging] = None) -> list:
    """``tensors`` (one dtype) on ``device`` after ONE transfer, each a view of it: a copy per tensor would
    wait for the device each time. Returned as they are when all are already there (unless ``copy``).
    From a GPU to the CPU with ``staging``, the transfer lands in one of its page-locked buffers."""
    device = torch.device(device)
    if not copy and all(t.device == device for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    host = None
    if staging is not None and device.type == "cpu" and flat.is_cuda:
        try:
            host = staging.take(flat.numel(), flat.dtype)
        except RuntimeError:  # page-locked memory refused (e.g. a container's memlock limit): pageable
            host = None
    if host is not None:
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
        flat = host
    else:
        flat = flat.to(device)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view(t.shape))
        at += t.numel()
    return out


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with ``num_tokens`` tokens in a UNet fed a latent of latent_hw, using the
    UNet's stride-2 ceil arithmetic (each level halves with ceil)."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == num_tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"cannot place {num_tokens} tokens on a grid derived from latent {latent_hw}")
