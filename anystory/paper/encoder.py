"""Subject encoding, CLIP branch: QFormers that turn CLIP-H image tokens into E_i and R_i.

F_clip (257×1280, CLIP ViT-H/14 penultimate hidden states of the segmented 224² subject image) goes
through two QFormers of the same architecture (IP-Adapter Plus's "Resampler", whose key names the
checkpoints use):

- the *subject QFormer* with m learned queries → E_i (m × 2048), the tokens routed into attn2 (eq. 5);
- the *routing QFormer* with one query → R_i (1 × 2048), the routing feature the router compares with
  the latent tokens of every layer (§1.2).

The background route N+1 is the same two QFormers applied to the CLIP features of a "zero image":
E_{N+1}, R_{N+1}. E_{N+1} is also the unconditional image embedding for classifier-free guidance. Which
image is zero is a convention of the training code, not of the QFormers (:data:`ZERO_IMAGES`,
:func:`zero_image_pixels`).

Key names (prefix ``subject_proj.`` / ``routing_proj.`` / IP-Adapter's ``image_proj.``): ``latents``
(1×m×dim), ``proj_in``, ``layers.{i}.0`` (norm1, norm2, to_q, to_kv, to_out),
``layers.{i}.1.{0,1,3}`` (LayerNorm, Linear, Linear), ``proj_out``, ``norm_out``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import merge_heads, split_heads


# ------------------------------------------------------------------------------------------------
# the zero image of the background route (and of CFG's unconditional image tokens)
# ------------------------------------------------------------------------------------------------
#: zeros of the CLIP input AFTER its normalisation ((x − mean)/std = 0: a mean-grey image). The pixel
#: convention is not taken from the paper's text (arXiv 2501.09503 gives the background route but not the
#: preprocessing stage at which its image is zero); it follows the reference code the method builds on:
#: IP-Adapter (Ye et al., arXiv 2308.06721; github tencent-ailab/IP-Adapter, ``ip_adapter/ip_adapter.py``
#: ``IPAdapterPlus.get_image_embeds``: ``image_encoder(torch.zeros_like(clip_image))`` of the processed
#: ``clip_image``; ``tutorial_train_plus.py``'s image dropout, the same zeros) and the first author's
#: UniPortrait (github junjiehe96/UniPortrait, ``uniportrait_pipeline.py``,
#: ``torch.zeros_like(face_clip_image)``). IP-Adapter Plus was trained with it: the default.
ZERO_IMAGE_NORMALISED = "normalized_zeros"
#: a pixel-black image pushed through CLIP's normalisation ((0 − mean)/std ≈ −1.79, −1.75, −1.48):
#: what ComfyUI_IPAdapter_plus encodes (``encode_image(torch.zeros([1, 224, 224, 3]))``) and what this pack
#: did before; kept for parity with that pack and for files trained so.
ZERO_IMAGE_PIXEL_BLACK = "pixel_black"
ZERO_IMAGES = (ZERO_IMAGE_NORMALISED, ZERO_IMAGE_PIXEL_BLACK)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP / CLIP-H preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def zero_image_pixels(convention: str = ZERO_IMAGE_NORMALISED, size: int = 224, mean=CLIP_MEAN,
                      std=CLIP_STD) -> torch.Tensor:
    """The zero image as the CLIP vision model receives it — already normalised pixel values
    [1, 3, size, size] (float32): zeros, or (0 − mean)/std for ``pixel_black``."""
    if convention not in ZERO_IMAGES:
        raise ValueError(f"zero image convention must be one of {ZERO_IMAGES}, got {convention!r}")
    px = torch.zeros(1, 3, size, size)
    if convention == ZERO_IMAGE_PIXEL_BLACK:
        m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        sd = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        px = px + (0.0 - m) / sd
    return px


def zero_image_rgb(convention: str = ZERO_IMAGE_NORMALISED, size: int = 224, mean=CLIP_MEAN,
                   std=CLIP_STD) -> torch.Tensor:
    """The zero image in pixel space [1, size, size, 3] in 0..1 (what normalises to
    :func:`zero_image_pixels`: the mean colour, or black), for encoders that only take images. Exact for an
    encoder that normalises without quantising; ComfyUI's ``clip_preprocess`` rounds to 8 bits first (the
    mean grey then normalises to ≈ 0.003, not 0), so the nodes give the model the pixel values directly."""
    px = zero_image_pixels(convention, size, mean, std)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (px * sd + m).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


class PerceiverAttention(nn.Module):
    """Latent queries attend to [image tokens; latents] (both layer-normed)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 20):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        # softmax in fp32, as the checkpoints were trained
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return self.to_out(merge_heads(out))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """QFormer with ``num_queries`` learned queries: [B, T, embedding_dim] → [B, num_queries, output_dim]."""

    def __init__(self, dim: int = 1280, depth: int = 4, dim_head: int = 64, heads: int = 20,
                 num_queries: int = 16, embedding_dim: int = 1280, output_dim: int = 2048, ff_mult: int = 4):
        super().__init__()
        self.config = dict(dim=dim, depth=depth, dim_head=dim_head, heads=heads, num_queries=num_queries,
                           embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth))

    @property
    def num_queries(self) -> int:
        return self.latents.shape[1]

    @property
    def embedding_dim(self) -> int:
        return self.proj_in.in_features

    @property
    def output_dim(self) -> int:
        return self.proj_out.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1).to(x.dtype)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

    @classmethod
    def config_from_state_dict(cls, sd: dict, prefix: str = "") -> dict:
        """Read the architecture from weights: m, widths and depth come from shapes; dim_head is 64."""
        lat = sd[prefix + "latents"]
        dim = lat.shape[-1]
        depth = 0
        while f"{prefix}layers.{depth}.0.to_q.weight" in sd:
            depth += 1
        inner = sd[f"{prefix}layers.0.0.to_q.weight"].shape[0] if depth else dim
        ff_inner = sd[f"{prefix}layers.0.1.1.weight"].shape[0] if depth else dim * 4
        return dict(dim=dim, depth=depth, dim_head=64, heads=max(1, inner // 64), num_queries=lat.shape[1],
                    embedding_dim=sd[prefix + "proj_in.weight"].shape[1],
                    output_dim=sd[prefix + "proj_out.weight"].shape[0], ff_mult=max(1, ff_inner // dim))


@dataclass
class SubjectEmbeddings:
    """E and R for N subjects plus the background route (last row, index N).

    E: [N+1, m, 2048] subject tokens (E_{N+1} = background / unconditional).
    R: [N+1, 1, 2048] routing features, or None when the routing QFormer is absent (public weights).
    """

    E: torch.Tensor
    R: Optional[torch.Tensor]

    @property
    def num_subjects(self) -> int:
        return self.E.shape[0] - 1


def encode_routes(subject_proj: Resampler, routing_proj: Optional[Resampler], clip_subjects: torch.Tensor,
                  clip_background: torch.Tensor) -> SubjectEmbeddings:
    """E_i = subject_proj(F_clip,i), R_i = routing_proj(F_clip,i) for i = 1…N, and route N+1 from the
    CLIP features of the zero image (``clip_background``, [1, T, D]; see :func:`zero_image_pixels`)."""
    if clip_subjects.ndim != 3 or clip_background.ndim != 3:
        raise ValueError("encode_routes: CLIP features must be [N, tokens, dim]")
    if clip_subjects.shape[-1] != subject_proj.embedding_dim:
        raise ValueError(
            f"CLIP vision features have width {clip_subjects.shape[-1]}, but the AnyStory model expects "
            f"{subject_proj.embedding_dim} (CLIP ViT-H/14 gives 1280, ViT-L gives 1024, ViT-bigG 1664). "
            "Load the CLIP vision model the adapter was trained with (CLIP-ViT-H-14-laion2B-s32B-b79K).")
    x = torch.cat([clip_subjects, clip_background.to(clip_subjects)], dim=0)
    E = subject_proj(x)
    R = routing_proj(x) if routing_proj is not None else None
    return SubjectEmbeddings(E=E, R=R)
