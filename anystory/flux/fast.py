"""The joint attention of AnyStory FLUX without a bias tensor: the fast form of
:func:`anystory.flux.routing.attention_bias` (the authors build that bias as a dense
[batch, heads, queries, keys] float mask in every block; here nothing of that size exists).

The bias has a special form. Every key is either *shared* (prompt, image) or belongs to one subject j
(its Redux tokens, its reference tokens) and may carry a logit offset (reference keys: ``ref_shift``, plus
ln of the subject's strength); every query either sees every subject (text queries, image queries when
the router is off), only the subject the routing map gives it (image queries with the router on), or none
(rows of a negative prompt: plain FLUX). With MASK = 100 (the authors' offset):

    bias[u, j] = offset_j                      if key j is shared, or query u sees subject(j)
                 offset_j − MASK               otherwise

which is an inner product of small vectors carried in E extra head dimensions of q and k (so the attention
keeps torch's fused kernels; v gets E zero dims, the output's are dropped):

    q_e(u) = [one-hot(route(u)) over n subjects + 1 null route (all zeros: sees every subject), 1, 0…]
    k_e(j) = [−M·(1 − one-hot(subject(j))) (shared key: 0), offset_j / scale, 0…]      M = MASK / scale

An allowed (query, key) pair sums only zeros in the group dimensions (no large values cancel: its logit is
exact); a disallowed one gets −MASK as the authors' mask gives it. Reference tokens that ``ref_mask`` hides
(the authors: −MASK on every query) are not keys at all here (see :func:`visible_reference`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .routing import MASK_OFFSET

__all__ = ["extra_dims", "key_extras", "query_extras", "joint_attention", "visible_reference", "KeyPlan"]


def extra_dims(num_subjects: int) -> int:
    """Extra head dimensions for n subjects: n + 1 routes (the last: none) + 1 offset, a multiple of 8."""
    return -(-(num_subjects + 2) // 8) * 8


class KeyPlan:
    """The keys of one model call's joint attentions, in order: prompt (shared), Redux tokens (subject of
    each), image (shared), visible reference tokens (subject and logit offset of each). Built on the host;
    :meth:`extras` is what every block of the call shares."""

    def __init__(self, prompt: int, redux_subjects: Sequence[int], image: int, ref_subjects: Sequence[int],
                 ref_offsets: Sequence[float], num_subjects: int):
        self.prompt, self.image, self.num_subjects = int(prompt), int(image), int(num_subjects)
        self.redux_subjects = [int(s) for s in redux_subjects]
        self.ref_subjects = [int(s) for s in ref_subjects]
        self.ref_offsets = [float(o) for o in ref_offsets]
        if len(self.ref_offsets) != len(self.ref_subjects):
            raise ValueError("one offset per reference key")

    @property
    def text(self) -> int:
        return self.prompt + len(self.redux_subjects)

    @property
    def queries(self) -> int:
        return self.text + self.image

    @property
    def keys(self) -> int:
        return self.queries + len(self.ref_subjects)

    def needs_extras(self, routed: bool, null_rows: bool) -> bool:
        """Whether any bias applies: a logit offset, routing among 2+ subjects present in the keys, or rows
        that must see no subject; else the joint attention is the plain one over all keys."""
        grouped = bool(self.redux_subjects or self.ref_subjects)
        return (any(o != 0 for o in self.ref_offsets) or (routed and grouped and self.num_subjects > 1)
                or (null_rows and grouped))

    def extras(self, head_dim: int, dtype, device) -> torch.Tensor:
        """k_e of every key, [keys, E]."""
        return key_extras(self.prompt, self.redux_subjects, self.image, self.ref_subjects, self.ref_offsets,
                          self.num_subjects, head_dim, dtype, device)


def key_extras(prompt: int, redux_subjects: Sequence[int], image: int, ref_subjects: Sequence[int],
               ref_offsets: Sequence[float], num_subjects: int, head_dim: int, dtype, device) -> torch.Tensor:
    """[prompt + redux + image + ref, E] key extras (module docstring), made on the host and sent once."""
    n = int(num_subjects)
    E = extra_dims(n)
    scale = head_dim ** -0.5
    K = prompt + len(redux_subjects) + image + len(ref_subjects)
    out = torch.zeros(K, E, dtype=torch.float32)
    M = MASK_OFFSET / scale
    for start, subjects in ((prompt, redux_subjects), (prompt + len(redux_subjects) + image, ref_subjects)):
        if not len(subjects):
            continue
        s = torch.as_tensor(list(subjects), dtype=torch.long)
        rows = torch.arange(start, start + len(s))
        block = torch.full((len(s), n + 1), -M)
        block[torch.arange(len(s)), s] = 0.0
        out[rows, : n + 1] = block
    if len(ref_subjects):
        start = prompt + len(redux_subjects) + image
        out[start:, n + 1] = torch.as_tensor(list(ref_offsets), dtype=torch.float32) / scale
    return out.to(device=device, dtype=dtype, non_blocking=True)


def query_extras(text: int, image: int, num_subjects: int, batch: int, dtype, device,
                 rmap: Optional[torch.Tensor] = None, null_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q_e [batch, text + image, E]: text queries see every subject; image queries the subject of ``rmap``
    (b × n × image one-hot; None: every subject); rows where ``null_rows`` [batch] bool is set see none."""
    n = num_subjects
    E = extra_dims(n)
    out = torch.zeros(batch, text + image, E, dtype=dtype, device=device)
    out[..., n + 1] = 1
    if rmap is not None:
        out[:, text:, :n] = rmap.transpose(1, 2).to(dtype)
    if null_rows is not None:  # torch.where, not boolean indexing: no device → host sync
        null = torch.zeros(E, dtype=dtype, device=device)
        null[n] = null[n + 1] = 1
        out = torch.where(null_rows.to(device)[:, None, None], null, out)
    return out


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_extra: Optional[torch.Tensor] = None,
                    k_extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [b, H, Q, D], k / v [b, H, K, D] (+ q_extra [b, Q, E], k_extra [K, E] or [b, K, E]) → [b, Q, H·D].
    Without extras: the plain attention."""
    b, H, Q, D = q.shape
    if q_extra is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        E = q_extra.shape[-1]
        K = k.shape[2]
        ke = k_extra if k_extra.ndim == 3 else k_extra[None]
        qx = torch.cat((q, q_extra.to(q.dtype)[:, None].expand(b, H, Q, E)), -1)
        kx = torch.cat((k, ke.to(k.dtype)[:, None].expand(b, H, K, E)), -1)
        vx = F.pad(v, (0, E))
        out = F.scaled_dot_product_attention(qx, kx, vx, scale=D ** -0.5)[..., :D]
    return out.transpose(1, 2).reshape(b, Q, H * D)


def visible_reference(ref_masks: Sequence[Optional[torch.Tensor]], lengths: Sequence[int], use_mask: bool):
    """(index of the kept reference tokens in the subject-major stream, subject of each): with ``use_mask``
    the tokens a subject's ref_mask hides are left out (the authors give them −MASK for every query);
    host tensors, no device sync."""
    keep, subj, pos = [], [], 0
    for j, (m, L) in enumerate(zip(ref_masks, lengths)):
        idx = torch.arange(pos, pos + L)
        if use_mask and m is not None:
            idx = idx[m.reshape(-1).cpu() > 0.5]
        keep.append(idx)
        subj += [j] * len(idx)
        pos += L
    return (torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)), subj
