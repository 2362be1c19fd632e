"""The CLIP branch of subject encoding (§1.1): F_clip, the CLIP ViT-H/14 penultimate hidden states of the
segmented 224² subject, and of the background route's zero image (by default zeros of the normalised CLIP
input, as IP-Adapter: ``anystory.paper.encoder.ZERO_IMAGES``)."""
from __future__ import annotations

import weakref

import torch

import comfy.clip_vision
import comfy.model_management as mm

from ..anystory.fast.graphs import env_flag
from ..anystory.paper.encoder import CLIP_MEAN, CLIP_STD, ZERO_IMAGE_NORMALISED, zero_image_pixels, zero_image_rgb
from . import state


@torch.no_grad()
def clip_features(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """F_clip: CLIP ViT-H/14 penultimate hidden states [B, 257, 1280] of 224² images [B, 224, 224, 3]
    (on the GPU when it ran there)."""
    run = _graphed_model(clip_vision)
    if run is not None:
        model_call, device, dtype = run
        pixels = comfy.clip_vision.clip_preprocess(images.to(device), size=clip_vision.image_size,
                                                   mean=clip_vision.image_mean, std=clip_vision.image_std,
                                                   crop=False).to(dtype)
        return model_call(pixels)
    out = clip_vision.encode_image(images, crop=False)
    return _penultimate(out)


def _penultimate(out) -> torch.Tensor:
    feats = getattr(out, "penultimate_hidden_states", None)
    return feats if feats is not None else out["penultimate_hidden_states"]


def _is_comfy_clip(clip_vision) -> bool:
    """ComfyUI's ClipVisionModel of a CLIP (not SigLIP: all hidden states) vision model: its ``model`` can be
    called on pixel values the way ``encode_image`` calls it."""
    return (getattr(clip_vision, "model", None) is not None and getattr(clip_vision, "patcher", None) is not None
            and not getattr(clip_vision, "return_all_hidden_states", True)
            and all(hasattr(clip_vision, a) for a in ("load_device", "image_size", "image_mean", "image_std")))


def _graphed_model(clip_vision):
    """ComfyUI's ``encode_image`` model call (same preprocessing, same model call) through a CUDA graph kept
    across encodes: the ViT's ~1 000 launches are host-bound. Returns (call(pixel values) → F_clip fp32,
    device, compute dtype), with the model loaded; None where this does not apply (another kind of CLIP
    vision object, not on CUDA): the caller then takes ``encode_image``.

    It computes in the weights' dtype when they are fp16 (ComfyUI's default for CLIP vision on a GPU),
    as the IP-Adapter and AnyStory reference code run their image encoder, where ``encode_image`` casts
    them to fp32 at every layer (≈ 1.8e-3 relative difference in F_clip). ``ANYSTORY_CLIP_FP32=1`` keeps
    fp32."""
    if not _is_comfy_clip(clip_vision):
        return None
    device = torch.device(clip_vision.load_device)
    if device.type != "cuda":
        return None
    model = clip_vision.model
    mm.load_model_gpu(clip_vision.patcher)
    weight_dtype = next(model.parameters()).dtype
    fp32 = env_flag("ANYSTORY_CLIP_FP32", False)
    dtype = torch.float16 if weight_dtype == torch.float16 and not fp32 else torch.float32
    key = ("CLIP vision", id(model), dtype)

    def call(pixels: torch.Tensor) -> torch.Tensor:
        out = state.ENCODER_GRAPHS.run(key, lambda px: model(pixel_values=px, intermediate_output=-2)[1],
                                       (pixels.to(device, dtype),), model)
        return out.float()  # a copy: the graph's output is rewritten by its next replay
    return call, device, dtype


@torch.no_grad()
def zero_image_features(clip_vision, convention: str = ZERO_IMAGE_NORMALISED) -> torch.Tensor:
    """F_clip of the zero image of ``convention`` (``anystory.paper.encoder.ZERO_IMAGES``) [1, 257, 1280].

    ``normalized_zeros`` (IP-Adapter's, the default) is zeros of the ALREADY-NORMALISED CLIP input, so the
    model is called on the pixel values themselves, not through ``encode_image`` (whose 8-bit rounding would
    turn a mean-grey image into ≈ 0.003, not 0); ``pixel_black`` is (0 − mean)/std, bit for bit what
    ``encode_image`` of a black image gives the model (ComfyUI_IPAdapter_plus's). A CLIP vision object that is
    not ComfyUI's (a stand-in with only ``encode_image``) gets the pixel image that normalises to it."""
    if _is_comfy_clip(clip_vision):
        px = zero_image_pixels(convention, clip_vision.image_size, clip_vision.image_mean, clip_vision.image_std)
        run = _graphed_model(clip_vision)
        if run is not None:
            return run[0](px)
        mm.load_model_gpu(clip_vision.patcher)  # encode_image's model call, on the pixel values (fp32, as it does)
        out = clip_vision.model(pixel_values=px.to(clip_vision.load_device).float(), intermediate_output=-2)
        return out[1].to(mm.intermediate_device())
    size = int(getattr(clip_vision, "image_size", 224))
    mean = getattr(clip_vision, "image_mean", CLIP_MEAN)
    std = getattr(clip_vision, "image_std", CLIP_STD)
    return _penultimate(clip_vision.encode_image(zero_image_rgb(convention, size, mean, std), crop=False))


def background_features(clip_vision, convention: str = ZERO_IMAGE_NORMALISED) -> torch.Tensor:
    """F_clip of the background route's zero image (route N+1; also CFG's unconditional image tokens), once
    per CLIP vision model and convention (:func:`zero_image_features`)."""
    cache = state.BACKGROUND_FEATURES
    mid = id(clip_vision.model) if hasattr(clip_vision, "model") else id(clip_vision)
    hit = cache.get((mid, convention))
    if hit is None or hit[0]() is not clip_vision:
        try:
            ref = weakref.ref(clip_vision)
        except TypeError:
            ref = lambda: clip_vision  # noqa: E731
        hit = (ref, zero_image_features(clip_vision, convention))
        for k in [k for k, v in cache.items() if k[0] != mid or v[0]() is not clip_vision]:
            del cache[k]  # another CLIP vision model: its entries go
        cache[(mid, convention)] = hit
    return hit[1]
