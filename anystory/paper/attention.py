"""Plain attention, the form every equation of the paper is written in.

Tensors follow ComfyUI's attention convention: q, k, v are ``[B, L, heads·dim_head]``. An additive
``bias`` is broadcast to ``[B, heads, Lq, Lk]`` (``[B, 1, Lq, Lk]`` is the usual shape) and must be a
float tensor in q's dtype; excluded positions use the finite :data:`NEG` rather than −∞, so rows never
turn into NaN and fp16 stays exact (exp(−1e4) underflows to 0 in every float format).

Every function that attends takes an ``attn_fn(q, k, v, heads, mask=None)`` so a host's backends can
be passed in; :func:`sdpa` is the default and honours ``mask`` on every device.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

NEG = -1.0e4  # "−∞" of every bias: exp(NEG - max) == 0 in fp16, bf16 and fp32

AttnFn = Callable[..., torch.Tensor]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H·D] → [B, H, L, D]"""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] → [B, L, H·D]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
         mask: Optional[torch.Tensor] = None, scale: Optional[float] = None, **_) -> torch.Tensor:
    """softmax(Q Kᵀ/√d + mask) V through torch's scaled_dot_product_attention; [B, L, H·D] in and out."""
    if mask is not None:
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                         attn_mask=mask, scale=scale)
    return merge_heads(out)
