"""The AnyStory FLUX double- and single-stream blocks, written against ComfyUI's FLUX block modules
(``comfy/ldm/flux/layers.py`` ``DoubleStreamBlock`` / ``SingleStreamBlock``; duck-typed — nothing here imports
ComfyUI). Every projection is the block's own module call (its weight casting, its LoRA patches); the AnyStory
LoRAs are added to the outputs of the EXTRA streams only.

Streams through a block (the authors' ``block_forward`` / ``single_block_forward`` + ``AnyStoryFluxAttnProcessor2_0``):

- **image / text** (text = Redux subject tokens while those are active + prompt): FLUX as is, except that the joint
  attention also sees the **reference keys/values** of this block (from the reference pass,
  :mod:`anystory.flux.reference`) under the bias of :func:`anystory.flux.routing.attention_bias`, as key groups
  merged by their log-sum-exp (:mod:`anystory.flux.fast`: no bias tensor; the keys ref_mask hides are left out);
- **routing tokens** (9 per subject): the text-side weights (double) / joint weights (single) with the
  ``router_lora``, the same modulation vector as the image; they attend to [image keys, routing keys]. From them and
  the image tokens the block's routing map M is computed (:func:`anystory.flux.routing.routing_map`). Their rows
  join the text rows (double) / the joint rows (single) in one call of each module (one weight read; their
  modulation is the text's / joint's plus the LoRA delta), the LoRA added to their rows only.

Pe tensors are ComfyUI's rope format b × 1 × L × d/2 × 2 × 2 (``EmbedND``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .fast import KeyPlan, attention_lse, joint_attention, merge_attention, subject_log_weights
from .lora import StreamLoRA, call
from .routing import routing_map

__all__ = ["RouterStream", "FluxCallState", "apply_rope", "double_block_forward", "single_block_forward",
           "modulation", "modulation_pair", "modulate", "split_heads", "merge_heads"]


@dataclass
class RouterStream:
    """The routing-token stream of one model call: hidden states (b × n·9 × hidden) and their rope pe."""

    hidden: torch.Tensor
    pe: torch.Tensor


@dataclass
class FluxCallState:
    """What the AnyStory blocks of ONE model call need (made per call by the ComfyUI patch).

    prompt_len: prompt tokens (after the Redux tokens); redux_len: Redux tokens at the START of the text (0 when
    inactive); ref_kv: per block (double blocks first, then single) {subject: visible reference (k, v), 1 × heads ×
    keys × d}, or None; plan: the key groups of the joint attention (:class:`anystory.flux.fast.KeyPlan`), None for
    the plain joint attention; null_rows: [b] bool, rows that see no subject (negative prompt) or None; router: the
    routing stream or None (when set, image queries see only their routed subject); routing: the per-block
    routing-map LoRA {("double"|"single", i): {"q", "k"}}; maps: where routing maps are recorded ({("double"|"single",
    i): M}) or None.
    """

    num_conds: int
    prompt_len: int
    redux_len: int
    depth: int
    ref_kv: Optional[list] = None
    plan: Optional[KeyPlan] = None
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

    def pe_with_router(self, key: str, pe: torch.Tensor) -> torch.Tensor:
        """[pe, router pe] along the tokens (made once per call)."""
        t = self.cache.get(key)
        if t is None:
            t = self.cache[key] = torch.cat((pe, self.router.pe.to(pe)), 2)
        return t


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


def modulation(mod, vec: torch.Tensor, lora: Optional[StreamLoRA] = None, path: str = ""):
    """ComfyUI ``Modulation.forward`` with the stream's LoRA on ``mod.lin`` → list of (shift, scale, gate)."""
    if vec.ndim == 2:
        vec = vec[:, None, :]
    return _chunks(call(mod.lin, path, F.silu(vec), lora), mod.multiplier)


def modulation_pair(mod, vec: torch.Tensor, lora: StreamLoRA, path: str):
    """(the modulation, the same with the stream's LoRA): one call of ``mod.lin``, the LoRA adds its delta."""
    if vec.ndim == 2:
        vec = vec[:, None, :]
    x = F.silu(vec)
    base = mod.lin(x)
    return _chunks(base, mod.multiplier), _chunks(lora.apply(path, x, base), mod.multiplier)


def _chunks(out: torch.Tensor, multiplier: int):
    out = out.chunk(multiplier, dim=-1)
    return [out[i: i + 3] for i in range(0, multiplier, 3)]


def modulate(x: torch.Tensor, m) -> torch.Tensor:
    shift, scale, _ = m
    return torch.addcmul(shift, x, 1 + scale)


def _router_attention(r_q, image_k, image_v, r_k, r_v) -> torch.Tensor:
    """The routing tokens' attention over [image keys, routing keys]: two fused attentions merged by their
    log-sum-exp (scores in fp32 inside the kernels, as the authors' SDPA; the image keys are not copied)."""
    return merge_attention([attention_lse(r_q, image_k, image_v), attention_lse(r_q, r_k, r_v)])


def _route(q_norm, k_norm, st: FluxCallState, kind: str, index: int, r_base_q, r_x, img_base_k, img_x, r_pe, img_pe,
           heads: int, dtype):
    """The block's routing map M (:func:`anystory.flux.routing.routing_map`) from the pre-LoRA q of the routing
    tokens and k of the image tokens plus the routing-map LoRA; recorded in ``st.maps``. The image keys are averaged
    over heads before the rotation (the same rotation for every head: rope(mean) = mean(rope))."""
    lo = st.routing[(kind, index)]
    map_q = split_heads(lo["q"].add_to(r_x, r_base_q), heads, 1)[0]
    map_q = apply_rope(q_norm(map_q).to(dtype), r_pe)
    map_k = lo["k"].add_to(img_x, img_base_k).unflatten(-1, (heads, -1))  # b × L × heads × d (no head-major copy)
    map_k = apply_rope(k_norm(map_k).to(dtype).mean(2).unsqueeze(1), img_pe)
    rmap = routing_map(map_q, map_k, st.num_conds)
    if st.maps is not None:
        st.maps[(kind, index)] = rmap
    return rmap


def _joint_attention(q, k, v, st: FluxCallState, kind: str, index: int, text_len: int, img_len: int, rmap,
                     out=None):
    """Queries [text, image] over keys [text, image, visible reference] in key groups (:mod:`anystory.flux.fast`;
    the authors' dense mask is :func:`anystory.flux.routing.attention_bias`)."""
    plan = st.plan
    log_w = None
    if plan is not None and plan.grouped and plan.weighted:
        # without routing the weights are the same in every block of the call: made once
        log_w = None if plan.routed else st.cache.get("log_w")
        if log_w is None:
            log_w = subject_log_weights(text_len, img_len, st.num_conds, q.shape[0], q.device,
                                        rmap if plan.routed else None, st.null_rows)
            if not plan.routed:
                st.cache["log_w"] = log_w
    return joint_attention(q, k, v, plan, st.ref_for(kind, index), log_w, out)


# ------------------------------------------------------------------------------------------------
# double block
# ------------------------------------------------------------------------------------------------
def _stream_qkv(block, side: str, h, mods, heads, pe):
    """Modulated norm1 → qkv → q, k (normed, rotated), v, plus the qkv and the norm1 output."""
    attn = getattr(block, f"{side}_attn")
    x = modulate(getattr(block, f"{side}_norm1")(h), mods[0])
    base = attn.qkv(x)
    q, k, v = split_heads(base, heads)
    q, k = attn.norm(q, k, v)
    return apply_rope(q, pe), apply_rope(k, pe), v, base, x


def _stream_post(block, side: str, h, attn_out, mods):
    attn, mlp = getattr(block, f"{side}_attn"), getattr(block, f"{side}_mlp")
    h = h + mods[0][2] * attn.proj(attn_out)
    x = modulate(getattr(block, f"{side}_norm2")(h), mods[1])
    return h + mods[1][2] * mlp[2](mlp[1](mlp[0](x)))


def _text_router_qkv(block, txt, r: RouterStream, mods, r_mods, heads, pe, lora: StreamLoRA, path: str):
    """The text and the routing tokens through the text side's norm1 → qkv in ONE call of each module (rows
    [text, routing]; the router LoRA added on the routing rows only) → (q, k, v) of all rows, the routing rows'
    pre-LoRA qkv and their norm1 output."""
    T, norm1, attn = txt.shape[1], block.txt_norm1, block.txt_attn
    x = torch.cat((modulate(norm1(txt), mods[0]), modulate(norm1(r.hidden), r_mods[0])), 1)
    qkv = attn.qkv(x)
    r_base = qkv[:, T:].clone()
    lora.add_(f"{path}.txt_attn.qkv", x[:, T:], qkv[:, T:])
    q, k, v = split_heads(qkv, heads)
    q, k = attn.norm(q, k, v)
    return apply_rope(q, pe), apply_rope(k, pe), v, r_base, x[:, T:]


def _text_router_post(block, txt, r_hidden, attn_out, mods, r_mods, lora: StreamLoRA, path: str):
    """proj, norm2, MLP of the text side on rows [text, routing] (``attn_out``), the router LoRA on the routing
    rows → (text, routing hidden states)."""
    T, attn, mlp = txt.shape[1], block.txt_attn, block.txt_mlp
    out = attn.proj(attn_out)
    lora.add_(f"{path}.txt_attn.proj", attn_out[:, T:], out[:, T:])
    txt = txt + mods[0][2] * out[:, :T]
    r_hidden = r_hidden + r_mods[0][2] * out[:, T:]
    norm2 = block.txt_norm2
    x = torch.cat((modulate(norm2(txt), mods[1]), modulate(norm2(r_hidden), r_mods[1])), 1)
    mid = mlp[1](mlp[0](x))
    out = mlp[2](mid)
    lora.add_(f"{path}.txt_mlp.2", mid[:, T:], out[:, T:])  # the authors: ff.net.2 only
    return txt + mods[1][2] * out[:, :T], r_hidden + r_mods[1][2] * out[:, T:]


def double_block_forward(block, index: int, img, txt, vec, pe, st: FluxCallState):
    """One ``DoubleStreamBlock`` with the AnyStory streams → (img, txt); updates ``st.router``."""
    path, heads, T = f"double_blocks.{index}", block.num_heads, txt.shape[1]
    img_mods = modulation(block.img_mod, vec)
    img_q, img_k, img_v, img_base, img_x = _stream_qkv(block, "img", img, img_mods, heads, pe[:, :, T:])
    r, rmap = st.router, None
    if r is None:
        txt_mods = modulation(block.txt_mod, vec)
        txt_q, txt_k, txt_v, _, _ = _stream_qkv(block, "txt", txt, txt_mods, heads, pe[:, :, :T])
    else:
        txt_mods, r_mods = modulation_pair(block.txt_mod, vec, st.router_lora, f"{path}.txt_mod.lin")
        tr_pe = st.pe_with_router("pe_double", pe[:, :, :T])
        q, k, v, r_base, r_x = _text_router_qkv(block, txt, r, txt_mods, r_mods, heads, tr_pe, st.router_lora, path)
        txt_q, txt_k, txt_v = q[:, :, :T], k[:, :, :T], v[:, :, :T]
        r_q, r_k, r_v = q[:, :, T:], k[:, :, T:], v[:, :, T:]
        hid = block.hidden_size
        rmap = _route(block.txt_attn.norm.query_norm, block.img_attn.norm.key_norm, st, "double", index,
                      r_base[..., :hid], r_x, img_base[..., hid: 2 * hid], img_x, r.pe, pe[:, :, T:], heads,
                      img_v.dtype)
    q, k, v = torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2)
    attn = _joint_attention(q, k, v, st, "double", index, T, img.shape[1], rmap)
    img = _stream_post(block, "img", img, attn[:, T:], img_mods)
    if r is None:
        txt = _stream_post(block, "txt", txt, attn[:, :T], txt_mods)
    else:
        r_attn = _router_attention(r_q, img_k, img_v, r_k, r_v)
        txt, r_hidden = _text_router_post(block, txt, r.hidden, torch.cat((attn[:, :T], r_attn), 1), txt_mods,
                                          r_mods, st.router_lora, path)
        st.router = RouterStream(r_hidden, r.pe)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


# ------------------------------------------------------------------------------------------------
# single block
# ------------------------------------------------------------------------------------------------
def single_block_forward(block, index: int, x, vec, pe, st: FluxCallState, text_len: int):
    """One ``SingleStreamBlock`` on [text, image] (``text_len`` text tokens) with the AnyStory streams → x. The
    routing tokens (when present) go through ``linear1`` / ``linear2`` in the same calls as x (rows [x, routing],
    the router LoRA added on the routing rows only)."""
    path, heads, T, L = f"single_blocks.{index}", block.num_heads, text_len, x.shape[1]
    hid, r, lora = block.hidden_size, st.router, st.router_lora
    if r is None:
        mod = modulation(block.modulation, vec)[0]
        x_in = modulate(block.pre_norm(x), mod)
    else:
        (mod,), (r_mod,) = modulation_pair(block.modulation, vec, lora, f"{path}.modulation.lin")
        x_in = torch.cat((modulate(block.pre_norm(x), mod), modulate(block.pre_norm(r.hidden), r_mod)), 1)
        pe = st.pe_with_router("pe_single", pe)
    lin1 = block.linear1(x_in)
    rmap = None
    if r is not None:
        r_base_q = lin1[:, L:, :hid].clone()
        lora.add_(f"{path}.linear1", x_in[:, L:], lin1[:, L:])
    qkv, mlp = torch.split(lin1, [3 * hid, block.mlp_hidden_dim], dim=-1)
    q, k, v = split_heads(qkv, heads)
    q, k = block.norm(q, k, v)
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    n_rows = x_in.shape[1]
    attn = torch.empty(x.shape[0], n_rows, hid, device=x.device, dtype=v.dtype) if r is not None else None
    if r is not None:
        rmap = _route(block.norm.query_norm, block.norm.key_norm, st, "single", index, r_base_q, x_in[:, L:],
                      lin1[:, T:L, hid: 2 * hid], x_in[:, T:L], r.pe, pe[:, :, T:L], heads, v.dtype)
        attn[:, L:] = _router_attention(q[:, :, L:], k[:, :, T:L], v[:, :, T:L], k[:, :, L:], v[:, :, L:])
    main = _joint_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], st, "single", index, T, L - T, rmap,
                            None if attn is None else attn[:, :L])
    if attn is None:
        attn = main
    lin2_in = torch.cat((attn, block.mlp_act(mlp)), 2)
    out = block.linear2(lin2_in)
    if r is not None:
        lora.add_(f"{path}.linear2", lin2_in[:, L:], out[:, L:])
        st.router = RouterStream(r.hidden + r_mod[2] * out[:, L:], r.pe)
    x = x + mod[2] * out[:, :L]
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x
