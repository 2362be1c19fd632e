"""Routed reference attention (eq. 6-8), at attn1 of layer l with reference strength γ.

The ReferenceNet (a UNet without cross-attention, fed the subject's latent and mask, no noise) gives
for every subject i and layer l the hidden states G_i^l entering self-attention. They are projected
with the reference projections of eq. 6-8, K̃_i^l = G_i^l W̃_k^l, Ṽ_i^l = G_i^l W̃_v^l
(:class:`ReferenceProjection`, trained in stage 1 with the UNet frozen; the tilde marks them as other
weights than the self-attention's own W_k^l, W_v^l). Where a checkpoint has no W̃ for a layer (IP-Adapter
files, the shared ReferenceNet), the denoising UNet's own attn1 W_k^l, W_v^l stand in. The UNet attends
to them next to its own tokens:

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

:class:`ReferenceFeatures` holds the G_i^l of a set of subjects. The fast inference path
(anystory.fast.reference) evaluates eq. 6-8 without a bias tensor; the tests hold it to these functions.

The ReferenceNet pass itself (run by the nodes, with ComfyUI's UNet) takes from here which of its tokens are
the subject's (:func:`reference_token_mask`) and SDXL's vector conditioning y (:func:`reference_y`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.nn as nn

from .attention import NEG, AttnFn, sdpa

Gamma = Union[float, torch.Tensor]


def log_gamma(gamma: Gamma, n: int, device) -> torch.Tensor:
    """ln γ_i per subject ([n], NEG where γ_i = 0: the references are removed exactly); checks γ ≥ 0."""
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


class ReferenceProjection(nn.Module):
    """W̃_k^l, W̃_v^l of one layer (eq. 6-8): G_i^l (C-wide) → K̃_i^l, Ṽ_i^l (C-wide). Checkpoint keys
    ``reference_proj.{N}.to_k.weight`` / ``.to_v.weight`` (C×C, no bias, as the UNet's attn1 to_k/to_v)."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)

    def forward(self, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G: [..., L_ref, C] → (G W̃_k, G W̃_v)."""
        return self.to_k(G), self.to_v(G)


def project_references(G: torch.Tensor, proj) -> tuple[torch.Tensor, torch.Tensor]:
    """(K̃, Ṽ) = (G W̃_k^l, G W̃_v^l) with ``proj`` a :class:`ReferenceProjection` (its weights taken to G's
    device and dtype) or, as the stand-in, the UNet's attn1 (called as the host built it: its ``to_k`` /
    ``to_v`` cast and patch their own weights)."""
    if isinstance(proj, ReferenceProjection):
        wk, wv = proj.to_k.weight, proj.to_v.weight
        return (torch.nn.functional.linear(G, wk.to(G.device, G.dtype)),
                torch.nn.functional.linear(G, wv.to(G.device, G.dtype)))
    return proj.to_k(G), proj.to_v(G)


RefList = Union[torch.Tensor, list]  # [N, L_ref, C] or a list of N tensors [L_ref_i, C]


def as_list(refs: RefList) -> list:
    """K̃/Ṽ per subject as a list of [L_ref,i, C]."""
    return list(refs.unbind(0)) if torch.is_tensor(refs) else list(refs)


def reference_bias(index: torch.Tensor, ref_lengths: list, self_len: int, gamma: Gamma, dtype) -> torch.Tensor:
    """Bias [B, 1, L, L + Σ_i L_ref,i] of eq. 6: 0 on the self columns; on subject j's columns ln γ_j
    where the query is routed to j (index == j), NEG elsewhere. index: [B, L] (values 0…N, N = bg)."""
    n = len(ref_lengths)
    lg = log_gamma(gamma, n, index.device)
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
    k_ref, v_ref = as_list(k_ref), as_list(v_ref)
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
    k_ref, v_ref = as_list(k_ref), as_list(v_ref)
    if gamma_is_zero(gamma) or not k_ref:
        return out
    lg = log_gamma(gamma, len(k_ref), q.device)
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



SDXL_SIZE_DIM = 256  # each of SDXL's six size numbers → a 256-d sinusoidal embedding (adm = pooled + 6 × 256)


def sdxl_size_embedding(values: torch.Tensor, dim: int = SDXL_SIZE_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[n] numbers → [n, dim]: [cos, sin] of value × 10000^(−k/(dim/2)), the sinusoidal embedding of SDXL's
    size conditioning (ComfyUI's ``Timestep(256)`` / ``timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def reference_y(pooled: Optional[torch.Tensor], size: tuple, batch: int = 1, adm_dim: int = 2816) -> torch.Tensor:
    """SDXL's vector conditioning y [batch, adm_dim] for the ReferenceNet pass, built as ComfyUI's SDXL model
    builds it for sampling (``comfy.model_base.SDXL.encode_adm``): [pooled text embedding, embeddings of
    (height, width, crop_h, crop_w, target_height, target_width)], here with the reference's own size
    ``size`` = (h, w) in pixels as original and target size (what ComfyUI gives a latent of that size) and
    no crop.

    ``pooled`` [1 or batch, P] is the positive prompt's pooled output (CLIP-G, P = 1280 for SDXL) — the authors'
    FLUX code runs its reference pass with the prompt's pooled embedding likewise. None: zeros there (what
    ComfyUI's ConditioningZeroOut gives, and SDXL's dropped text condition), the size embedding still set: an
    all-zero y, which the base UNet never saw, is avoided either way."""
    h, w = int(size[0]), int(size[1])
    sizes = sdxl_size_embedding(torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)).flatten()[None]
    width = adm_dim - sizes.shape[-1]
    if pooled is None:
        pooled = torch.zeros(1, width)
    pooled = pooled.reshape(-1, pooled.shape[-1]).float()
    if pooled.shape[-1] != width:
        raise ValueError(f"the pooled text embedding has width {pooled.shape[-1]}, the UNet's y takes {width} "
                         f"(+ {sizes.shape[-1]} of size embedding)")
    if pooled.shape[0] not in (1, batch):
        raise ValueError(f"{pooled.shape[0]} pooled embeddings for a batch of {batch}")
    y = torch.cat([pooled.cpu(), sizes.expand(pooled.shape[0], -1)], dim=-1)
    return y.expand(batch, -1).contiguous() if y.shape[0] == 1 else y


def reference_token_mask(mask: torch.Tensor, hw: tuple) -> torch.Tensor:
    """Which reference tokens of a layer grid lie on the subject: mask [V, H, W] (white = subject) → [V·h·w]
    bool, a token being kept when ANY of its pixels is on the subject (pooled coverage > 0).

    This is the authors' rule: their reference masks are ``adaptive_avg_pool2d(mask, (s, s)) > 0``
    (github junjiehe96/AnyStory, ``anystory/generate.py``, ``encode_ref_condition`` and the Redux token mask),
    so a token on the subject's edge, half background, still carries the subject's detail. (An earlier
    version of this pack kept only tokens with coverage > 0.5, dropping that edge.) A mask that covers no
    token at all keeps every token."""
    m = F.interpolate(mask[:, None].float(), size=tuple(hw), mode="area")[:, 0].flatten(1)  # [V, L] coverage
    valid = m > 0
    if not bool(valid.any()):
        valid = torch.ones_like(valid)
    return valid.flatten()


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
