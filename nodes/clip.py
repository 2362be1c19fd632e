"""The CLIP branch of subject encoding (§1.1): F_clip, the CLIP ViT-H/14 penultimate hidden states of the
segmented 224² subject, and of the background route's zero image."""
from __future__ import annotations

import weakref

import torch

import comfy.clip_vision
import comfy.model_management as mm

from ..anystory.fast.graphs import env_flag
from . import state


@torch.no_grad()
def clip_features(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """F_clip: CLIP ViT-H/14 penultimate hidden states [B, 257, 1280] of 224² images [B, 224, 224, 3]
    (on the GPU when it ran there)."""
    feats = _clip_graphed(clip_vision, images)
    if feats is not None:
        return feats
    out = clip_vision.encode_image(images, crop=False)
    feats = getattr(out, "penultimate_hidden_states", None)
    if feats is None:
        feats = out["penultimate_hidden_states"]
    return feats


def _clip_graphed(clip_vision, images: torch.Tensor):
    """ComfyUI's ``encode_image`` (same preprocessing, same model call) with the model call through a CUDA
    graph kept across encodes: the ViT's ~1 000 launches are host-bound.

    It computes in the weights' dtype when they are fp16 (ComfyUI's default for CLIP vision on a GPU),
    as the IP-Adapter and AnyStory reference code run their image encoder, where ``encode_image`` casts
    them to fp32 at every layer (≈ 1.8e-3 relative difference in F_clip). ``ANYSTORY_CLIP_FP32=1`` keeps
    fp32. None where this does not apply (another kind of CLIP vision object, not on CUDA): the caller
    then takes ``encode_image``."""
    model, patcher = getattr(clip_vision, "model", None), getattr(clip_vision, "patcher", None)
    if model is None or patcher is None or getattr(clip_vision, "return_all_hidden_states", True):
        return None
    if not all(hasattr(clip_vision, a) for a in ("load_device", "image_size", "image_mean", "image_std")):
        return None
    device = torch.device(clip_vision.load_device)
    if device.type != "cuda":
        return None
    mm.load_model_gpu(patcher)
    weight_dtype = next(model.parameters()).dtype
    fp32 = env_flag("ANYSTORY_CLIP_FP32", False)
    dtype = torch.float16 if weight_dtype == torch.float16 and not fp32 else torch.float32
    pixels = comfy.clip_vision.clip_preprocess(images.to(device), size=clip_vision.image_size,
                                               mean=clip_vision.image_mean, std=clip_vision.image_std,
                                               crop=False).to(dtype)
    key = ("CLIP vision", id(model), dtype)
    out = state.ENCODER_GRAPHS.run(key, lambda px: model(pixel_values=px, intermediate_output=-2)[1], (pixels,), model)
    return out.float()  # a copy: the graph's output is rewritten by its next replay


def background_features(clip_vision) -> torch.Tensor:
    """F_clip of the all-zero image (the background route N+1), once per CLIP vision model."""
    cache = state.BACKGROUND_FEATURES
    key = id(clip_vision.model) if hasattr(clip_vision, "model") else id(clip_vision)
    hit = cache.get(key)
    if hit is None or hit[0]() is not clip_vision:
        try:
            ref = weakref.ref(clip_vision)
        except TypeError:
            ref = lambda: clip_vision  # noqa: E731
        hit = (ref, clip_features(clip_vision, torch.zeros(1, 224, 224, 3)))
        cache.clear()
        cache[key] = hit
    return hit[1]
