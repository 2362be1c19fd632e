"""The joint attention of AnyStory FLUX without a bias tensor: the fast form of
:func:`anystory.flux.routing.attention_bias` (the authors build that bias as a dense
[batch, heads, queries, keys] float mask in every block; here nothing of that size exists).

Every key is either *shared* (prompt, image; the Redux tokens too while nothing routes them) or belongs to one
subject j (its Redux tokens, its visible reference tokens), and a group of keys may carry one logit offset c
(reference keys: ``ref_shift`` plus ln of the subject's strength). A query sees the shared keys and, of the
subjects' keys, all of them (text queries; image queries while the router is off), only its routed subject's
(image queries with the router on) or none (rows of a negative prompt: plain FLUX).

The softmax over a union of disjoint key groups g is the mixture of the attentions over each group alone,
weighted by the groups' softmax masses:

    out(u) = Σ_g w_g(u) · out_g(u),    w_g(u) = a_g(u)·exp(lse_g(u) + c_g) / Σ_g' a_g'(u)·exp(lse_g'(u) + c_g')

with out_g, lse_g the attention and log-sum-exp of query u over group g (one fused kernel gives both:
:func:`attention_lse`) and a_g(u) ∈ {0, 1} whether u sees g. The authors' mask gives a hidden key −100 instead of
a_g = 0 (relative weight e^−100: below fp32's resolution of the sums). Reference tokens that ``ref_mask`` hides
are not keys at all (:func:`visible_reference`).

So a block runs one fused attention over the shared keys (the plain FLUX attention) and one per subject group
(a few hundred keys each); the Redux tokens are placed FIRST in the text (a view then gives the shared keys).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["KeyPlan", "joint_attention", "attention_lse", "merge_attention", "subject_log_weights",
           "visible_reference", "plain_attention"]


# ------------------------------------------------------------------------------------------------
# attention with its log-sum-exp
# ------------------------------------------------------------------------------------------------
_KERNEL: dict = {}  # (device type, dtype, head dim) → the first kernel that worked there


def _cudnn(q, k, v):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
    return out[0], out[1]


def _flash(q, k, v):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
    return out[0], out[1]


def _efficient(q, k, v):
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    return out[0], out[1]


def _cpu_flash(q, k, v):
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out[0], out[1]


def _math(q, k, v, budget: int = 1 << 26):
    """The plain form, in query chunks of at most ``budget`` fp32 logits (no fused kernel here, e.g. MPS)."""
    b, H, Q, _ = q.shape
    step = max(1, budget // max(1, b * H * k.shape[2]))
    kt = k.float().transpose(-1, -2)
    outs, lses = [], []
    for i in range(0, Q, step):
        s = torch.matmul(q[:, :, i:i + step].float(), kt) * q.shape[-1] ** -0.5
        lse = torch.logsumexp(s, -1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v))
        lses.append(lse)
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, 2), torch.cat(lses, 2))


_ORDER = {"cuda": (_cudnn, _flash, _efficient, _math), "cpu": (_cpu_flash, _math)}


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Softmax attention (scale d^−½) and its log-sum-exp: q [b, H, Q, d], k / v [b, H, K, d] → (out [b, H, Q, d],
    lse [b, H, Q] fp32). The fused kernel is found once per device type, dtype and head dim (cuDNN, flash,
    memory-efficient on CUDA; flash on the CPU), the plain math otherwise."""
    b, H, Q, _ = q.shape
    key = (q.device.type, q.dtype, q.shape[-1])
    kernel = _KERNEL.get(key)
    if kernel is not None:
        try:
            out, lse = kernel(q, k, v)
            return out, lse.reshape(b, H, -1)[..., :Q].float()
        except (RuntimeError, NotImplementedError, TypeError):  # a shape the kernel does not take: look again
            pass
    for candidate in _ORDER.get(q.device.type, (_math,)):
        if candidate is kernel:
            continue
        try:
            out, lse = candidate(q, k, v)
            lse = lse.reshape(b, H, -1)[..., :Q].float()
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            continue
        if out.shape == q.shape[:3] + v.shape[-1:] and (kernel is not None or _agrees(q, k, v, out, lse)):
            _KERNEL.setdefault(key, candidate)
            return out, lse
    return _math(q, k, v)


def _agrees(q, k, v, out, lse, rows: int = 16) -> bool:
    """Whether a kernel's (out, lse) on this call follow the plain form on its first rows (checked once, when the
    kernel is chosen: private ops are called here without torch's own eligibility checks)."""
    want, want_lse = _math(q[:, :, :rows], k, v)
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    lse_ok = (lse[..., :rows] - want_lse).abs().amax() <= tol * want_lse.abs().amax().clamp_min(1.0)
    out_ok = (out[:, :, :rows].float() - want.float()).abs().amax() <= tol * want.float().abs().amax().clamp_min(1.0)
    return bool(torch.isfinite(lse).all() and lse_ok and out_ok)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[b, H, Q, d] → [b, Q, H·d]: torch's SDPA (the FLUX attention)."""
    b, H, Q, D = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, Q, H * D)


def merge_attention(parts: Sequence[tuple], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_g w_g·out_g (module docstring) from ``parts`` = [(out_g [b, H, Q, d], lse_g [b, H, Q] with the group's offset
    and log a_g added)] → [b, Q, H·d] (written into ``out`` when given: a [b, Q, H·d] view)."""
    o0 = parts[0][0]
    b, H, Q, D = o0.shape
    w = torch.softmax(torch.stack([lse for _, lse in parts]), 0).to(o0.dtype).transpose(2, 3)[..., None]
    if out is None:
        out = torch.empty(b, Q, H * D, dtype=o0.dtype, device=o0.device)
    acc = out.unflatten(-1, (H, D))  # [b, Q, H, D]: the sum is written in the output's layout, no extra pass
    torch.mul(o0.transpose(1, 2), w[0], out=acc)
    for g in range(1, len(parts)):
        acc.addcmul_(parts[g][0].transpose(1, 2), w[g])
    return out


# ------------------------------------------------------------------------------------------------
# the key groups of one call
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    subject: int
    redux: Optional[tuple]  # (start, stop) in the text keys
    ref: bool               # the subject's visible reference keys
    offset: float


class KeyPlan:
    """The keys of one model call's joint attentions (built on the host, shared by every block): text = [Redux
    tokens (subject-major; ``redux_subjects`` gives the subject of each), prompt], image; per subject with
    references (``ref_subjects``) its visible reference keys with logit offset ``ref_offsets``. ``routed``: image
    queries see only their routed subject; ``null_rows``: some rows see no subject."""

    def __init__(self, redux_subjects: Sequence[int], prompt: int, image: int, ref_subjects: Sequence[int],
                 ref_offsets: Sequence[float], num_subjects: int, routed: bool = False, null_rows: bool = False):
        self.redux_subjects = [int(s) for s in redux_subjects]
        self.prompt, self.image, self.num_subjects = int(prompt), int(image), int(num_subjects)
        self.ref_subjects = [int(s) for s in ref_subjects]
        self.ref_offsets = [float(o) for o in ref_offsets]
        if len(self.ref_offsets) != len(self.ref_subjects):
            raise ValueError("one offset per subject with references")
        self.routed = bool(routed) and self.num_subjects > 1
        self.null_rows = bool(null_rows)
        # the Redux keys are the subjects' own while something routes them, else shared
        split = bool(self.redux_subjects) and (self.routed or self.null_rows)
        self.shared_start = len(self.redux_subjects) if split else 0
        groups = []
        for j in range(self.num_subjects):
            span = None
            if split and j in self.redux_subjects:
                first = self.redux_subjects.index(j)
                span = (first, first + self.redux_subjects.count(j))
            off = self.ref_offsets[self.ref_subjects.index(j)] if j in self.ref_subjects else None
            if off is not None and span is not None and off != 0.0:
                groups += [_Group(j, span, False, 0.0), _Group(j, None, True, off)]
            elif off is not None or span is not None:
                groups.append(_Group(j, span, off is not None, off or 0.0))
        self.groups = groups

    @property
    def text(self) -> int:
        return len(self.redux_subjects) + self.prompt

    @property
    def grouped(self) -> bool:
        """Whether the joint attention needs groups (else it is the plain one over the text and image keys)."""
        return bool(self.groups)

    @property
    def weighted(self) -> bool:
        """Whether some query does not see every subject group."""
        return self.routed or self.null_rows


def subject_log_weights(text: int, image: int, num_subjects: int, batch: int, device,
                        rmap: Optional[torch.Tensor] = None, null_rows: Optional[torch.Tensor] = None):
    """log a_j(u) [batch, n, text + image], fp32 as the log-sum-exps (0 or −inf): text queries see every subject;
    image queries the subject of ``rmap`` (b × n × image one-hot; None: every subject); rows where ``null_rows``
    [batch] bool is set none."""
    a = torch.ones(batch, num_subjects, text + image, dtype=torch.float32, device=device)
    if rmap is not None:
        a[:, :, text:] = rmap.float()
    if null_rows is not None:  # torch.where, not boolean indexing: no device → host sync
        a = torch.where(null_rows.to(device)[:, None, None], 0.0, a)
    return torch.log(a)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Optional[KeyPlan] = None,
                    refs: Optional[dict] = None, log_w: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Queries [text, image] over the text and image keys (q, k, v [b, H, Q, d]) and the subjects' reference keys
    ``refs`` {subject: (k, v) [b or 1, H, V, d]} → [b, Q, H·d] (into ``out`` when given). ``log_w``: the
    :func:`subject_log_weights` of this block (None: every query sees every subject)."""
    if plan is None or not plan.grouped:
        res = plain_attention(q, k, v)
        return res if out is None else out.copy_(res)
    b = q.shape[0]
    s = plan.shared_start
    parts = [attention_lse(q, k[:, :, s:], v[:, :, s:])]
    for g in plan.groups:
        ks, vs = [], []
        if g.redux is not None:
            ks.append(k[:, :, g.redux[0]:g.redux[1]])
            vs.append(v[:, :, g.redux[0]:g.redux[1]])
        if g.ref:
            rk, rv = refs[g.subject]
            if rk.shape[0] != b:  # a real batch, not a zero stride: fused kernels differ on broadcast inputs
                rk, rv = rk.expand(b, -1, -1, -1).contiguous(), rv.expand(b, -1, -1, -1).contiguous()
            ks.append(rk)
            vs.append(rv)
        kg, vg = (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, 2), torch.cat(vs, 2))
        o, lse = attention_lse(q, kg, vg)
        if g.offset:
            lse = lse + g.offset
        if log_w is not None:
            lse = lse + log_w[:, g.subject, None]
        parts.append((o, lse))
    return merge_attention(parts, out)


def visible_reference(ref_masks: Sequence[Optional[torch.Tensor]], lengths: Sequence[int], use_mask: bool):
    """Per subject, the index of its kept reference tokens in its own stream: with ``use_mask`` the tokens its
    ref_mask hides are left out (the authors give them −MASK for every query); host tensors, no device sync."""
    keep = []
    for m, L in zip(ref_masks, lengths):
        idx = torch.arange(L)
        if use_mask and m is not None:
            idx = idx[m.reshape(-1).cpu() > 0.5]
        keep.append(idx)
    return keep
