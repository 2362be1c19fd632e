"""The AnyStory FLUX double- and single-stream blocks, written against ComfyUI's FLUX block modules
(``comfy/ldm/flux/layers.py`` ``DoubleStreamBlock`` / ``SingleStreamBlock``; duck-typed — nothing here imports
ComfyUI). Every projection is the block's own module call (its weight casting, its LoRA patches); the AnyStory
LoRAs are added to the outputs of the EXTRA streams only.

Streams through a block (the authors' ``block_forward`` / ``single_block_forward`` + ``AnyStoryFluxAttnProcessor2_0``):

- **image / text** (text = prompt + Redux subject tokens while those are active): FLUX as is, except that the joint
  attention also sees the **reference keys/values** of this block (from the reference pass,
  :mod:`anystory.flux.reference`) under the bias of :func:`anystory.flux.routing.attention_bias`, carried in extra
  head dimensions (:mod:`anystory.flux.fast`: no bias tensor; the keys ref_mask hides are left out);
- **routing tokens** (9 per subject): the text-side weights (double) / joint weights (single) with the
  ``router_lora``, the same modulation vector as the image; they attend to [image keys, routing keys]. From them and
  the image tokens the block's routing map M is computed (:func:`anystory.flux.routing.routing_map`).

Pe tensors are ComfyUI's rope format b × 1 × L × d/2 × 2 × 2 (``EmbedND``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .fast import KeyPlan, joint_attention, query_extras
from .lora import StreamLoRA, call
from .routing import routing_map

__all__ = ["RouterStream", "FluxCallState", "apply_rope", "double_block_forward", "single_block_forward",
           "modulation", "modulate", "split_heads", "merge_heads", "sdpa"]


@dataclass
class RouterStream:
    """The routing-token stream of one model call: hidden states (b × n·9 × hidden) and their rope pe."""

    hidden: torch.Tensor
    pe: torch.Tensor


@dataclass
class FluxCallState:
    """What the AnyStory blocks of ONE model call need (made per call by the ComfyUI patch).

    prompt_len: text tokens before the Redux tokens; redux_len: Redux tokens in the text (0 when inactive);
    ref_kv: per block (double blocks first, then single) the visible reference (k, v), b × heads × keys × d, or
    None; plan: the keys of the joint attention and what each may be seen by (:class:`anystory.flux.fast.KeyPlan`);
    key_extra: their extra head dimensions [keys, E], None when no bias applies (the plain joint attention);
    null_rows: [b] bool, rows that see no subject (negative prompt) or None; router: the routing stream or None
    (when set, image queries see only their routed subject); routing: the per-block routing-map LoRA
    {("double"|"single", i): {"q", "k"}}; maps: where routing maps are recorded ({("double"|"single", i): M}) or
    None.
    """

    num_conds: int
    prompt_len: int
    redux_len: int
    depth: int
    ref_kv: Optional[list] = None
    plan: Optional[KeyPlan] = None
    key_extra: Optional[torch.Tensor] = None
    null_rows: Optional[torch.Tensor] = None
    router: Optional[RouterStream] = None
    router_lora: Optional[StreamLoRA] = None
    routing: dict = field(default_factory=dict)
    maps: Optional[dict] = None
    cache: dict = field(default_factory=dict)

    def ref_for(self, kind: str, index: int):
        if self.ref_kv is None:
            return None
        return self.ref_kv[index if kind == "double" else self.depth + index]


# ------------------------------------------------------------------------------------------------
# small pieces (the same arithmetic as ComfyUI's FLUX)
# ------------------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    x_ = x.to(dtype=pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def split_heads(qkv: torch.Tensor, heads: int, parts: int = 3):
    b, n, _ = qkv.shape
    return qkv.reshape(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa(q, k, v, bias=None) -> torch.Tensor:
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype)))


def modulation(mod, vec: torch.Tensor, lora: Optional[StreamLoRA] = None, path: str = ""):
    """ComfyUI ``Modulation.forward`` with the stream's LoRA on ``mod.lin`` → list of (shift, scale, gate)."""
    if vec.ndim == 2:
        vec = vec[:, None, :]
    out = call(mod.lin, path, F.silu(vec), lora).chunk(mod.multiplier, dim=-1)
    return [out[i: i + 3] for i in range(0, mod.multiplier, 3)]


def modulate(x: torch.Tensor, m) -> torch.Tensor:
    shift, scale, _ = m
    return torch.addcmul(shift, x, 1 + scale)


def _mlp(seq, path: str, x, lora: Optional[StreamLoRA]):
    """``seq`` = Linear, GELU, Linear; the authors enable the stream LoRA on the second Linear only (ff.net.2)."""
    return call(seq[2], f"{path}.2", seq[1](seq[0](x)), lora)


# ------------------------------------------------------------------------------------------------
# double block
# ------------------------------------------------------------------------------------------------
def _stream_qkv(block, side: str, h, mods, heads, pe, lora, path):
    """Modulated norm1 → qkv (+ LoRA) → q, k (normed, rotated), v, plus the pre-LoRA qkv and the norm1 input."""
    norm1, attn = getattr(block, f"{side}_norm1"), getattr(block, f"{side}_attn")
    x = modulate(norm1(h), mods[0])
    base = attn.qkv(x)
    qkv = base if lora is None else lora.apply(f"{path}.{side}_attn.qkv", x, base)
    q, k, v = split_heads(qkv, heads)
    q, k = attn.norm(q, k, v)
    return apply_rope(q, pe), apply_rope(k, pe), v, base, x


def _stream_post(block, side: str, h, attn_out, mods, lora, path):
    attn = getattr(block, f"{side}_attn")
    h = h + mods[0][2] * call(attn.proj, f"{path}.{side}_attn.proj", attn_out, lora)
    x = modulate(getattr(block, f"{side}_norm2")(h), mods[1])
    return h + mods[1][2] * _mlp(getattr(block, f"{side}_mlp"), f"{path}.{side}_mlp", x, lora)


def double_block_forward(block, index: int, img, txt, vec, pe, st: FluxCallState):
    """One ``DoubleStreamBlock`` with the AnyStory streams → (img, txt); updates ``st.router``."""
    path, heads, T = f"double_blocks.{index}", block.num_heads, txt.shape[1]
    img_mods, txt_mods = modulation(block.img_mod, vec), modulation(block.txt_mod, vec)
    img_q, img_k, img_v, img_base, img_x = _stream_qkv(block, "img", img, img_mods, heads, pe[:, :, T:], None, path)
    txt_q, txt_k, txt_v, _, _ = _stream_qkv(block, "txt", txt, txt_mods, heads, pe[:, :, :T], None, path)
    rmap = None
    if st.router is not None:
        r = st.router
        r_mods = modulation(block.txt_mod, vec, st.router_lora, f"{path}.txt_mod.lin")
        r_q, r_k, r_v, r_base, r_x = _stream_qkv(block, "txt", r.hidden, r_mods, heads, r.pe, st.router_lora, path)
        lo = st.routing[("double", index)]
        map_q = split_heads(r_base, heads)[0] + split_heads(lo["q"].delta(r_x), heads, 1)[0]
        map_q = apply_rope(block.txt_attn.norm.query_norm(map_q).to(r_v), r.pe)
        map_k = split_heads(img_base, heads)[1] + split_heads(lo["k"].delta(img_x), heads, 1)[0]
        map_k = apply_rope(block.img_attn.norm.key_norm(map_k).to(img_v), pe[:, :, T:])
        rmap = routing_map(map_q, map_k, st.num_conds)
        if st.maps is not None:
            st.maps[("double", index)] = rmap
    q, k, v = torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2)
    attn = _joint_attention(q, k, v, st, "double", index, T, img.shape[1], rmap)
    txt_attn, img_attn = attn[:, :T], attn[:, T:]
    if st.router is not None:
        r_attn = sdpa(r_q, torch.cat((img_k, r_k), 2), torch.cat((img_v, r_v), 2))
        st.router = RouterStream(_stream_post(block, "txt", r.hidden, r_attn, r_mods, st.router_lora, path), r.pe)
    img = _stream_post(block, "img", img, img_attn, img_mods, None, path)
    txt = _stream_post(block, "txt", txt, txt_attn, txt_mods, None, path)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def _joint_attention(q, k, v, st: FluxCallState, kind: str, index: int, text_len: int, img_len: int, rmap):
    """Queries [text, image] over keys [text, image, visible reference] with the AnyStory bias carried in extra
    head dimensions (:mod:`anystory.flux.fast`; the authors' dense mask is :func:`anystory.flux.routing.
    attention_bias`)."""
    ref = st.ref_for(kind, index)
    if ref is not None:
        k, v = torch.cat((k, ref[0].to(k)), 2), torch.cat((v, ref[1].to(v)), 2)
    if st.key_extra is None:
        return joint_attention(q, k, v)
    routed = rmap is not None and st.num_conds > 1
    qe = None if routed else st.cache.get("q_extra")
    if qe is None:
        qe = query_extras(text_len, img_len, st.num_conds, q.shape[0], q.dtype, q.device, rmap if routed else None,
                          st.null_rows)
        if not routed:
            st.cache["q_extra"] = qe
    return joint_attention(q, k, v, qe, st.key_extra)


# ------------------------------------------------------------------------------------------------
# single block
# ------------------------------------------------------------------------------------------------
def _single_pre(block, h, mod, pe, lora, path):
    x = modulate(block.pre_norm(h), mod)
    base = block.linear1(x)
    lin1 = base if lora is None else lora.apply(f"{path}.linear1", x, base)
    qkv, mlp = torch.split(lin1, [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
    q, k, v = split_heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    return apply_rope(q, pe), apply_rope(k, pe), v, mlp, base, x


def _single_post(block, h, attn_out, mlp, mod, lora, path):
    out = call(block.linear2, f"{path}.linear2", torch.cat((attn_out, block.mlp_act(mlp)), 2), lora)
    return h + mod[2] * out


def single_block_forward(block, index: int, x, vec, pe, st: FluxCallState, text_len: int):
    """One ``SingleStreamBlock`` on [text, image] (``text_len`` text tokens) with the AnyStory streams → x."""
    path, heads, T = f"single_blocks.{index}", block.num_heads, text_len
    mod = modulation(block.modulation, vec)[0]
    q, k, v, mlp, base, x_mod = _single_pre(block, x, mod, pe, None, path)
    img_len = x.shape[1] - T
    rmap = None
    if st.router is not None:
        r = st.router
        r_mod = modulation(block.modulation, vec, st.router_lora, f"{path}.modulation.lin")[0]
        r_q, r_k, r_v, r_mlp, r_base, r_x = _single_pre(block, r.hidden, r_mod, r.pe, st.router_lora, path)
        lo = st.routing[("single", index)]
        hid = block.hidden_size
        map_q = split_heads(r_base[..., :hid], heads, 1)[0] + split_heads(lo["q"].delta(r_x), heads, 1)[0]
        map_q = apply_rope(block.norm.query_norm(map_q).to(r_v), r.pe)
        img_x = x_mod[:, T:]
        map_k = split_heads(base[:, T:, hid: 2 * hid], heads, 1)[0] + split_heads(lo["k"].delta(img_x), heads, 1)[0]
        map_k = apply_rope(block.norm.key_norm(map_k).to(r_v), pe[:, :, T:])
        rmap = routing_map(map_q, map_k, st.num_conds)
        if st.maps is not None:
            st.maps[("single", index)] = rmap
    attn = _joint_attention(q, k, v, st, "single", index, T, img_len, rmap)
    if st.router is not None:
        r_attn = sdpa(r_q, torch.cat((k[:, :, T:], r_k), 2), torch.cat((v[:, :, T:], r_v), 2))
        st.router = RouterStream(_single_post(block, r.hidden, r_attn, r_mlp, r_mod, st.router_lora, path), r.pe)
    x = _single_post(block, x, attn, mlp, mod, None, path)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x
