"""The reference pass: the subjects' VAE latents through the FLUX transformer at t = 0 with the ``ref_lora``.

Authors (``tranformer_forward`` with ``ref_hidden_states``): the masked subject (512², FLUX VAE, packed 2×2 →
1024 tokens per subject) is a token stream of its own, embedded by ``x_embedder`` + ref LoRA, modulated by the
time-text embedding at t = 0 (same guidance and pooled text vector as the image), rotated with its own position ids
(the image grid shifted by ``position_delta``, default (0, −w): left of the image), and run through every block with
the ref LoRA at the image-side sites. Each subject's reference tokens attend only to themselves. The image/text
tokens of every block attend to the reference keys/values of that block (with the routing / ref-mask bias).

The stream does not depend on the image or the step, so its per-block (k, v) are computed once and reused
(``enable_ref_cache``): :func:`reference_kv` returns them for all blocks.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .blocks import apply_rope, merge_heads, modulate, modulation, split_heads
from .lora import StreamLoRA, call

__all__ = ["timestep_embedding", "flux_vec", "ref_position_ids", "reference_kv", "grouped_self_attention",
           "router_stream_input"]


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0):
    """FLUX's sinusoidal embedding [cos, sin] of ``time_factor · t`` (as ComfyUI's flux ``timestep_embedding``)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t) if torch.is_floating_point(t) else emb


def flux_vec(dm, timesteps: torch.Tensor, y: torch.Tensor, guidance: Optional[torch.Tensor], dtype) -> torch.Tensor:
    """The modulation vector of FLUX's ``forward_orig`` (time_in + guidance_in + vector_in) for given t, y, g."""
    vec = dm.time_in(timestep_embedding(timesteps, 256).to(dtype))
    if dm.params.guidance_embed and guidance is not None:
        vec = vec + dm.guidance_in(timestep_embedding(guidance, 256).to(dtype))
    return vec + dm.vector_in(y[:, :dm.params.vec_in_dim])


def ref_position_ids(h: int, w: int, position_delta: Optional[Sequence[int]] = None, device=None) -> torch.Tensor:
    """Position ids (h·w × 3) of one packed reference latent of h × w tokens: (0, row + Δrow, col + Δcol), with
    the authors' default Δ = (0, −w) (``position_delta = [0, -ref_size // 16]``)."""
    dr, dc = (0, -w) if position_delta is None else position_delta
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None] + dr
    ids[..., 2] = torch.arange(w, device=device)[None, :] + dc
    return ids.reshape(h * w, 3)


def grouped_self_attention(q, k, v, groups: int) -> torch.Tensor:
    """Attention of each subject's reference tokens to themselves only (tokens are subject-major)."""
    if groups == 1:
        return merge_heads(F.scaled_dot_product_attention(q, k, v))
    L = q.shape[2] // groups  # one fused attention per subject on views (a 5-d call would take the math kernel)
    spans = [slice(i * L, (i + 1) * L) for i in range(groups)]
    return merge_heads(torch.cat([F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s])
                                  for s in spans], 2))


def reference_kv(dm, ref_tokens: torch.Tensor, ref_pe: torch.Tensor, vec_ref: torch.Tensor, lora: StreamLoRA,
                 num_conds: int, keep: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 subjects: Optional[Sequence[int]] = None) -> list:
    """Per block (double blocks first, then single) {subject: (k, v)} of the reference stream's visible tokens.

    dm: the FLUX model (ComfyUI ``comfy.ldm.flux.model.Flux``: ``img_in``, ``double_blocks``, ``single_blocks``);
    ref_tokens: b × n·Lr × 64 packed, processed latents (subject-major, n = ``num_conds`` streams of Lr tokens);
    ref_pe: their rope (b × 1 × n·Lr × …); vec_ref: the modulation vector at t = 0; keep: per stream the index of
    its visible tokens (device tensors; None: all), taken as each block's k, v are made (the hidden ones are never
    held); subjects: the subject of each stream (default 0…n−1)."""
    subjects = list(range(num_conds)) if subjects is None else list(subjects)
    keep = [None] * num_conds if keep is None else list(keep)
    Lr = ref_tokens.shape[1] // num_conds

    def visible(k, v):
        out = {}
        for i, j in enumerate(subjects):
            ks, vs = k[:, :, i * Lr:(i + 1) * Lr], v[:, :, i * Lr:(i + 1) * Lr]
            if keep[i] is not None:
                ks, vs = ks.index_select(2, keep[i]), vs.index_select(2, keep[i])
            else:
                ks, vs = ks.contiguous(), vs.contiguous()
            out[j] = (ks, vs)
        return out

    h = call(dm.img_in, "img_in", ref_tokens, lora)
    kv = []
    for i, block in enumerate(dm.double_blocks):
        path = f"double_blocks.{i}"
        mods = modulation(block.img_mod, vec_ref, lora, f"{path}.img_mod.lin")
        x = modulate(block.img_norm1(h), mods[0])
        q, k, v = split_heads(call(block.img_attn.qkv, f"{path}.img_attn.qkv", x, lora), block.num_heads)
        q, k = block.img_attn.norm(q, k, v)
        q, k = apply_rope(q, ref_pe), apply_rope(k, ref_pe)
        kv.append(visible(k, v))
        attn = grouped_self_attention(q, k, v, num_conds)
        h = h + mods[0][2] * call(block.img_attn.proj, f"{path}.img_attn.proj", attn, lora)
        x = modulate(block.img_norm2(h), mods[1])
        mlp = block.img_mlp
        h = h + mods[1][2] * call(mlp[2], f"{path}.img_mlp.2", mlp[1](mlp[0](x)), lora)
    for i, block in enumerate(dm.single_blocks):
        path = f"single_blocks.{i}"
        mod = modulation(block.modulation, vec_ref, lora, f"{path}.modulation.lin")[0]
        x = modulate(block.pre_norm(h), mod)
        lin1 = call(block.linear1, f"{path}.linear1", x, lora)
        qkv, mlp = torch.split(lin1, [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, block.num_heads)
        q, k = block.norm(q, k, v)
        q, k = apply_rope(q, ref_pe), apply_rope(k, ref_pe)
        kv.append(visible(k, v))
        if i + 1 < len(dm.single_blocks):  # the last block's output is never used
            attn = grouped_self_attention(q, k, v, num_conds)
            out = call(block.linear2, f"{path}.linear2", torch.cat((attn, block.mlp_act(mlp)), 2), lora)
            h = h + mod[2] * out
    return kv


def router_stream_input(dm, router_tokens: torch.Tensor, lora: StreamLoRA) -> torch.Tensor:
    """The routing tokens (b × n·9 × 4096) through ``txt_in`` (context_embedder) with the router LoRA."""
    return call(dm.txt_in, "txt_in", router_tokens, lora)


def pack_latent(latent: torch.Tensor) -> torch.Tensor:
    """b × c × H × W (processed latent) → b × (H/2·W/2) × 4c tokens (FLUX's 2×2 packing)."""
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
