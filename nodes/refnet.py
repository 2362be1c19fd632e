"""ReferenceNet pass (§1.1, ReferenceNet branch), run once per subject at encode time.

The segmented 512² subject → VAE latent (+ mask channel for the native 5-channel ReferenceNet) → a
UNet without cross-attention, no noise (timestep 0), SDXL's vector conditioning y = the positive prompt's
pooled embedding + the reference's size (``anystory.paper.reference.reference_y``) → the hidden states
entering every self-attention layer, G_i^l (after norm1). Two sources:

- native: the AnyStory ReferenceNet file, built as ComfyUI's own UNetModel with its attn2 removed;
- shared (training-free stand-in): the connected SDXL MODEL itself with attn2 zeroed.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..anystory.fast.transfer import move_together
from ..anystory.layers import block_key, discover_layout
from ..anystory.paper.reference import ReferenceFeatures, reference_token_mask, reference_y
from . import state
from .types import AnyStoryError, AnyStoryModel

log = logging.getLogger("anystory")


def _zero_attn2_replace(q, k, v, extra_options):
    return torch.zeros_like(q)


def _zero_attn2_output(n, extra_options):
    return torch.zeros_like(n)


class _AllCaptured(Exception):
    """Raised by the capture hook at the last self-attention layer: the rest of the UNet (the full-
    resolution output blocks, the out conv) would compute nothing that is kept."""


def capture_features(unet: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, store_device,
                     shared: bool, y: Optional[torch.Tensor] = None) -> tuple[dict, dict]:
    """Run ``unet`` once on x (timestep 0, vector conditioning ``y`` [B, adm] for a UNet that takes one:
    :func:`anystory.paper.reference.reference_y`; None: zeros) up to its last self-attention layer and return
    ({key: norm1 output [B, L, C]}, {key: (h, w)})."""
    feats, grids = {}, {}
    expected = 0  # self-attention layers: the capture is complete after this many
    ctx_dim = None  # irrelevant when attn2 is removed or zeroed, but the shape must fit
    for mod in unet.modules():
        if getattr(mod, "attn1", None) is not None:
            expected += 1
        if ctx_dim is None and getattr(mod, "attn2", None) is not None:
            ctx_dim = mod.attn2.to_k.weight.shape[1]
    ctx_dim = ctx_dim or 2048

    def grab(n, context, value, extra_options):
        key = block_key(extra_options)
        feats[key] = n.detach().to(store_device)
        shape = extra_options.get("activations_shape")
        if shape is not None:
            grids[key] = (int(shape[-2]), int(shape[-1]))
        if len(feats) == expected:
            raise _AllCaptured
        return n, context, value

    to = {"patches": {"attn1_patch": [grab], "attn2_output_patch": [_zero_attn2_output]},
          "patches_replace": {}, "anystory_capture": True}
    if shared:  # skip the text cross-attention (its output is zeroed anyway)
        keys = [s.key for s in discover_layout(unet)]
        to["patches_replace"]["attn2"] = {k: _zero_attn2_replace for k in keys}
    b = x.shape[0]
    context = torch.zeros(b, 1, ctx_dim, device=x.device, dtype=dtype)
    kwargs = {}
    if getattr(unet, "num_classes", None) is not None:
        kwargs["y"] = (torch.zeros(b, unet.label_emb[0][0].in_features, device=x.device, dtype=dtype) if y is None
                       else y.to(x.device, dtype))
    t = torch.zeros(b, device=x.device, dtype=torch.float32)
    with torch.no_grad():
        try:
            unet(x.to(dtype), timesteps=t, context=context, transformer_options=to, **kwargs)
        except _AllCaptured:
            pass
    if shape_missing := [k for k in feats if k not in grids]:
        raise AnyStoryError(f"ComfyUI gave no activations_shape for layers {shape_missing[:3]}; "
                            "AnyStory needs ComfyUI 0.3.30 or newer")
    return feats, grids


def native_unet(model: AnyStoryModel):
    """ComfyUI's UNetModel with the native ReferenceNet weights, attn2 removed; a ModelPatcher."""
    if model._refnet_module is not None:
        return model._refnet_module
    sd = model.refnet.state_dict
    stub = dict(sd)
    for k, w in sd.items():  # detection reads attn2.to_k shapes to find the context dim
        if k.endswith(".attn1.to_k.weight"):
            stub[k.replace(".attn1.", ".attn2.")] = torch.empty(w.shape[0], 2048, device="meta")
    cfg = comfy.model_detection.detect_unet_config(stub, "")
    if cfg is None:
        raise AnyStoryError(f"cannot read the UNet architecture of the ReferenceNet {model.refnet_name!r}")
    cfg = {k: v for k, v in cfg.items() if k != "disable_unet_model_creation"}
    if cfg.get("num_heads", -1) == -1 and cfg.get("num_head_channels", -1) == -1:
        cfg["num_head_channels"] = 64  # every SDXL-family UNet (ComfyUI's supported_models set it so too)
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    manual = mm.unet_manual_cast(dtype, load_device)
    ops = comfy.ops.pick_operations(dtype, manual)
    unet = UNetModel(**cfg, dtype=dtype, device="cpu", operations=ops)
    for mod in unet.modules():
        if hasattr(mod, "attn2") and hasattr(mod, "attn1"):
            mod.attn2 = None  # a UNet without cross-attention
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    missing = [k for k in missing if ".norm2." not in k]
    if missing or unexpected:
        raise AnyStoryError(f"the ReferenceNet {model.refnet_name!r} does not fit its own architecture: "
                            f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    unet.eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(unet, load_device=load_device, offload_device=mm.unet_offload_device())
    model._refnet_module = (patcher, manual or dtype)
    return model._refnet_module


def _to_device(feats: dict, device, copy: bool = False) -> dict:
    """All captured layers to ``device`` in ONE transfer (a copy per layer would wait for the GPU each time);
    ``copy``: a copy even where they already are there (features of a graph's pool are rewritten by its
    next replay)."""
    moved = move_together(list(feats.values()), device, copy=copy, staging=state.HOST_STAGING)
    return feats if all(a is b for a, b in zip(moved, feats.values())) else dict(zip(feats, moved))


def reference_pass(unet: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, shared: bool,
                   y: Optional[torch.Tensor] = None) -> tuple[dict, dict]:
    """:func:`capture_features` on the GPU through a CUDA graph kept across encodes (every subject has the
    same 512² shape; see anystory.fast.graphs.ForwardGraphs): one replay instead of the UNet's host-bound
    launches. The features returned lie in the graph's memory: copy them before the next
    pass."""
    key = ("ReferenceNet pass", id(unet), bool(shared), dtype, y is not None)
    inputs = (x,) if y is None else (x, y.to(x.device))  # y is a graph input: a new prompt replays the same graph
    return state.ENCODER_GRAPHS.run(
        key, lambda x, y=None: capture_features(unet, x, dtype, x.device, shared=shared, y=y), inputs, unet)


def reference_features(model: AnyStoryModel, vae, ref_image: torch.Tensor, ref_mask: torch.Tensor,
                       unet_model=None, pooled: Optional[torch.Tensor] = None) -> ReferenceFeatures:
    """G^l of ONE subject (``ref_image`` [V, S, S, 3] are views of it; their tokens are concatenated).

    ``pooled``: the positive prompt's pooled text embedding (AnyStory Subject Encode's ``conditioning``), which
    conditions the pass together with the reference's size S × S through SDXL's y (:func:`reference_y`;
    without it: zeros there, the size embedding still set)."""
    # G_i^l (≈50 MB per 512² subject for SDXL) is kept on ComfyUI's intermediate device (the CPU), not in
    # VRAM while ComfyUI caches this node's output: a sampling run moves each layer's subject tokens to
    # the GPU once, when it projects them (AnyStory Apply's reference attention)
    store = mm.intermediate_device()
    if model.refnet is not None:
        patcher, dtype = native_unet(model)
        mm.load_models_gpu([patcher])
        unet = patcher.model
        source = "native"
        latent_format_model = unet_model
    elif unet_model is not None:
        mm.load_models_gpu([unet_model])
        unet = unet_model.model.diffusion_model
        dtype = unet_model.model.manual_cast_dtype or unet_model.model.get_dtype()
        source = "shared"
        latent_format_model = unet_model
    else:
        return None
    latent = vae.encode(ref_image[..., :3])
    if latent_format_model is not None:
        latent = latent_format_model.model.process_latent_in(latent)
    else:  # native ReferenceNet without a MODEL: SDXL's latent scale
        latent = latent * 0.13025
    device = mm.get_torch_device()
    x = latent.to(device)
    in_ch = unet.input_blocks[0][0].in_channels
    if in_ch == x.shape[1] + 1:
        m = F.interpolate(ref_mask[:, None].float(), size=x.shape[-2:], mode="area").to(device)
        x = torch.cat([x, m.to(x.dtype)], dim=1)
    elif in_ch != x.shape[1]:
        raise AnyStoryError(f"the ReferenceNet takes {in_ch} input channels but the VAE gives {x.shape[1]}: "
                            "use the SDXL VAE")
    y = None
    if getattr(unet, "num_classes", None) is not None:
        adm = unet.label_emb[0][0].in_features
        try:
            y = reference_y(pooled, tuple(ref_image.shape[1:3]), batch=x.shape[0], adm_dim=adm)
        except ValueError as e:
            raise AnyStoryError(f"AnyStory Subject Encode's conditioning does not fit the ReferenceNet: {e}. Connect "
                                "the positive prompt made with this SDXL model's CLIP") from None
    feats, grids = reference_pass(unet, x, dtype, shared=(source == "shared"), y=y)
    feats = _to_device(feats, store, copy=True)
    features, valid, by_grid = {}, {}, {}
    mask = ref_mask.to(store)
    for key, f in feats.items():
        v = f.shape[0]
        features[key] = f.reshape(1, v * f.shape[1], f.shape[2])  # views → more tokens of one subject
        hw = grids[key]
        if hw not in by_grid:  # a handful of grids for ~70 layers
            by_grid[hw] = reference_token_mask(mask, hw).reshape(1, -1)
        valid[key] = by_grid[hw]
    return ReferenceFeatures(features, grids, source, valid)
