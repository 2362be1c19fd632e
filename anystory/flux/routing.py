"""Routing in the AnyStory FLUX transformer: the per-block routing map and the attention bias it implies.

**Routing map** (authors: ``calculate_routing_maps``). In every double and single block, for the n subjects' routing
tokens (9 per subject, carried as their own stream) and the image tokens:

    q_j = mean over heads and subject j's 9 tokens of rope(norm_q(W_q·r + ΔW_q^route·r))      (routing-token query)
    k_p = mean over heads of rope(norm_k(W_k·z_p + ΔW_k^route·z_p))                             (image-token key)
    M[j, p] = 1 if j = argmax_j' ⟨q_j', k_p⟩ else 0

W_q is the text-side (double block: ``add_q_proj`` = ComfyUI ``txt_attn.qkv`` q-part) or the joint (single block:
``to_q`` = ``linear1`` q-part) projection WITHOUT the router LoRA; ΔW^route the per-block routing-map LoRA
(``to_{q,k}_routing_map_lora``); r / z the block's modulated (norm1) routing / image hidden states.

**Attention bias** (authors: ``separable_scaled_dot_product_attention``) on the logits of the joint attention whose
queries are [text, Redux tokens, image] and keys [text, Redux tokens, image, reference tokens]:
- every query → reference keys: + ``ref_shift`` and + (ref_mask − 1)·100 (masked-out reference tokens are hidden);
- image query p → Redux and reference keys of subject j: + (M[j, p] − 1)·100 (only its own subject is seen).
The authors build it as a dense [batch, heads, queries, keys] tensor per block; here it is [batch, 1, queries,
keys] (broadcast over heads), and ``None`` when nothing applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["routing_map", "TokenLayout", "attention_bias", "MASK_OFFSET"]

MASK_OFFSET = 100.0  # the authors' "masked" logit offset


def routing_map(router_q: torch.Tensor, image_k: torch.Tensor, num_conds: int) -> torch.Tensor:
    """router_q b × heads × (n·t) × d, image_k b × heads × L × d (both normed and rotated) → M, b × n × L one-hot."""
    b, h, nt, d = router_q.shape
    q = router_q.view(b, h, num_conds, nt // num_conds, d).mean((1, 3))  # b × n × d
    k = image_k.mean(1)                                                    # b × L × d
    logits = torch.bmm(q, k.transpose(-1, -2))                             # b × n × L
    index = logits.max(dim=1, keepdim=True)[1]
    return torch.zeros_like(logits).scatter_(1, index, 1.0)


@dataclass(frozen=True)
class TokenLayout:
    """Token counts of one joint attention: prompt, Redux tokens (n·81 or 0), image, reference (n·Lr or 0)."""

    prompt: int
    redux: int
    image: int
    ref: int
    num_conds: int

    @property
    def text(self) -> int:
        return self.prompt + self.redux

    @property
    def queries(self) -> int:
        return self.text + self.image

    @property
    def keys(self) -> int:
        return self.queries + self.ref


def attention_bias(layout: TokenLayout, batch: int, dtype, device, ref_mask: Optional[torch.Tensor] = None,
                   ref_shift: float = 0.0, rmap: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The additive logit bias [batch, 1, queries, keys] (see the module docstring), or None when none applies.

    ref_mask: b × ref × 1 (1 = subject token of the reference), rmap: the routing map b × n × image."""
    if ref_shift == 0 and ref_mask is None and rmap is None:
        return None
    lay = layout
    bias = torch.zeros(batch, 1, lay.queries, lay.keys, dtype=dtype, device=device)
    ref_cols = slice(lay.queries, lay.keys)
    if ref_shift != 0:
        bias[:, :, :, ref_cols] += ref_shift
    if ref_mask is not None and lay.ref > 0:
        bias[:, :, :, ref_cols] += ((ref_mask.to(dtype).transpose(-1, -2).unsqueeze(1)) - 1.0) * MASK_OFFSET
    if rmap is not None and lay.num_conds > 0:
        rows = slice(lay.text, lay.queries)
        for count, cols in ((lay.redux, slice(lay.prompt, lay.text)), (lay.ref, ref_cols)):
            if count == 0:
                continue
            per = rmap.to(dtype).repeat_interleave(count // lay.num_conds, dim=1)  # b × count × image
            bias[:, :, rows, cols] += ((per - 1.0) * MASK_OFFSET).transpose(1, 2).unsqueeze(1)
    return bias
