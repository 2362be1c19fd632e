"""The reference branch in training (eq. 6-8): the ReferenceNet pass that gives G_i^l with gradients, and
the ReferenceNet that stage 1 trains.

The ReferenceNet (paper §3.2) is a UNet without cross-attention run once per reference at t = 0 (no
noise); G_i^l are the hidden states entering its self-attention of layer l (after norm1). At inference
nodes/refnet.py computes them once per subject; here :func:`capture_reference_features` runs the same pass
inside the training step, with gradients when the ReferenceNet trains (stage 1) and without when it is
frozen (stage 2, or the shared mode where the frozen UNet itself serves as ReferenceNet).

Everything is duck-typed on ComfyUI's ldm ``UNetModel`` (``transformer_options`` with an ``attn1_patch``
that sees norm1's output; ``attn2`` replaced by zeros in the shared mode); no ComfyUI import.

Training simplifications (stated where they matter): the ReferenceNet sees the instance's reference view
(the segmented 224² crop the CLIP branch sees, augmented the same way) resized to ``ref_size``, without a
mask channel (a 4-channel ReferenceNet, ``refnet_in_channels=4``), and every reference token counts as on
the subject.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint.diagnosis import CROSS_ATTN
from ..layers import block_key


def make_refnet(unet: nn.Module) -> nn.Module:
    """A trainable ReferenceNet initialised from ``unet`` (the paper's: a copy of the UNet without
    cross-attention): a deep copy with every ``attn2`` removed, in float32, requires_grad on."""
    refnet = copy.deepcopy(unet)
    for mod in refnet.modules():
        if getattr(mod, "attn2", None) is not None and getattr(mod, "attn1", None) is not None:
            mod.attn2 = None
    return refnet.float().train().requires_grad_(True)


def load_refnet_weights(refnet: nn.Module, state_dict: dict) -> nn.Module:
    """Put a ReferenceNet file's weights (``RefNetWeights.state_dict``) into ``refnet`` (from
    :func:`make_refnet`), widening its conv_in to the file's 4 or 5 input channels."""
    conv = refnet.input_blocks[0][0]
    w = state_dict.get("input_blocks.0.0.weight")
    if w is not None and tuple(w.shape) != tuple(conv.weight.shape):
        conv.weight = nn.Parameter(torch.zeros(w.shape, dtype=conv.weight.dtype, device=conv.weight.device),
                                   requires_grad=conv.weight.requires_grad)
        conv.in_channels = int(w.shape[1])
    missing, unexpected = refnet.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not CROSS_ATTN.search(k)]
    if missing or unexpected:
        raise ValueError(f"the ReferenceNet weights do not fit the UNet they were meant for (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    return refnet


def refnet_state_dict(refnet: nn.Module) -> dict:
    """The ReferenceNet's weights for :func:`anystory.checkpoint.save_refnet` (CPU copies, without the
    cross-attention / norm2 keys a ReferenceNet file must not have)."""
    return {k: v.detach().cpu().clone() for k, v in refnet.state_dict().items() if not CROSS_ATTN.search(k)}


def _zeros_attn2(q, k, v, extra_options):
    return torch.zeros_like(q)


class _AllCaptured(Exception):
    """Raised at the last self-attention layer: the rest of the ReferenceNet computes nothing G^l needs."""


def capture_reference_features(refnet: nn.Module, x: torch.Tensor, shared: bool = False,
                               context_dim: int = 2048, adm: Optional[int] = None) -> dict:
    """G^l of a batch of references: {layer key: [B, L_ref, C]} from one pass of ``refnet`` on latents x
    [B, 4, h, w] at t = 0 (context zeros). Gradients flow when autograd records (a ReferenceNet in
    training). ``shared``: ``refnet`` is the denoising UNet itself, whose cross-attention is replaced by
    zeros for this pass (as nodes/refnet.py does at inference). ``adm``: width of SDXL's ``y`` (zeros), or
    None for a UNet without class conditioning."""
    feats: dict = {}
    expected = sum(1 for m in refnet.modules() if getattr(m, "attn1", None) is not None)

    def grab(n, context, value, extra_options):
        feats[block_key(extra_options)] = n
        if len(feats) == expected:
            raise _AllCaptured  # the tensors kept so far keep their autograd graph
        return n, context, value

    to: dict = {"patches": {"attn1_patch": [grab]}, "patches_replace": {}}
    if shared:
        keys = {(name, idx, j) for name, idx, j in _block_keys(refnet)}
        to["patches_replace"]["attn2"] = {k: _zeros_attn2 for k in keys}
    b = x.shape[0]
    dtype = next(refnet.parameters()).dtype
    conv = refnet.input_blocks[0][0]
    if conv.weight.shape[1] == x.shape[1] + 1:  # a 5-channel ReferenceNet: the mask channel, all subject here
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    kwargs = {}
    if adm is not None:
        kwargs["y"] = torch.zeros(b, adm, device=x.device, dtype=dtype)
    context = torch.zeros(b, 1, context_dim, device=x.device, dtype=dtype)
    t = torch.zeros(b, device=x.device, dtype=torch.float32)
    try:
        refnet(x.to(dtype), timesteps=t, context=context, transformer_options=to, **kwargs)
    except _AllCaptured:
        pass
    return feats


def _block_keys(unet) -> list:
    out = []
    for name, seq in (("input", getattr(unet, "input_blocks", [])), ("output", getattr(unet, "output_blocks", []))):
        for i, blk in enumerate(seq):
            for mod in blk:
                out += [(name, i, j) for j, _ in enumerate(getattr(mod, "transformer_blocks", None) or [])]
    for mod in getattr(unet, "middle_block", None) or []:
        out += [("middle", 0, j) for j, _ in enumerate(getattr(mod, "transformer_blocks", None) or [])]
    return out


def reference_latents(views: torch.Tensor, vae: Callable, size: int) -> torch.Tensor:
    """Latents [V, 4, size/8, size/8] of reference views [V, S, S, 3] (0..1) resized to ``size``, through
    the frozen VAE (``vae``: images → latents scaled for the UNet)."""
    if views.shape[1] != size:
        views = F.interpolate(views.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1).clamp(0, 1)
    with torch.no_grad():
        return vae(views).detach().float()
