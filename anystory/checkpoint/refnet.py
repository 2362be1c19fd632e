"""The ReferenceNet file: identify, load, save, and build one from an SDXL UNet.

The ReferenceNet (paper §3.2) is a copy of the UNet without cross-attention that sees the subject's
latent plus its mask and gives G_i^l, the hidden states entering self-attention of every layer l, for the
routed reference attention (eq. 6-8). Its file (``anystory_sdxl_refnet.safetensors``,
``format=anystory-sdxl-refnet``) holds ``refnet.*`` in ComfyUI/ldm UNet names, without any
``transformer_blocks.*.attn2.*`` / ``norm2.*``, and ``input_blocks.0.0.weight`` of 320×5×3×3 (4 latent
channels + the subject mask; 4 channels only when the metadata says ``refnet_in_channels=4``). It stays a
separate, optional file: without it the SDXL MODEL itself serves as ReferenceNet ("shared" mode).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..layers import LayerLayout, layout_from_state_dict
from .diagnosis import (
    CONV_IN,
    CROSS_ATTN,
    DIFFUSERS_UNET_ROOTS,
    FORMAT_REFNET,
    FORMAT_VERSION,
    REDOWNLOAD,
    REFNET,
    REFNET_FOREIGN,
    REFNET_PREFIX,
    SDXL_CONTEXT_DIM,
    UNET_PREFIX,
    UNET_ROOTS,
    UNET_SOURCE,
    Facts,
    Source,
    diagnose,
    first_key,
    meta_int,
    shape_str,
    some_keys,
    str_meta,
)
from .io import prepare_for_save, read_weights, save_safetensors


@dataclass
class RefNetWeights:
    """The ReferenceNet's weights: an SDXL-family UNet without cross-attention that maps the subject's
    latent + mask (``in_channels`` = 5) to G_i^l, the hidden states entering self-attention of every
    layer l.

    state_dict: ComfyUI/ldm UNet names WITHOUT the ``refnet.`` prefix (``input_blocks.0.0.weight`` …).
    in_channels: input channels of conv_in (5 = 4 latent + 1 mask; 4 only when the file says so).
    meta: the file's metadata."""

    state_dict: dict
    in_channels: int
    meta: dict = field(default_factory=dict)

    def layout(self) -> LayerLayout:
        """The transformer blocks (attn1 only) of this ReferenceNet."""
        return layout_from_state_dict(self.state_dict)


def identify_refnet(sd: Mapping, meta: Optional[Mapping], src: Source) -> tuple[int, int]:
    """Check a ``refnet.*`` state dict (shapes only): returns (in_channels, number of transformer blocks)."""
    meta = str_meta(meta)
    diagnose(REFNET_FOREIGN, Facts(sd, meta, src, REFNET))
    inner = {k[len(REFNET_PREFIX):]: v for k, v in sd.items()}
    conv = inner.get(CONV_IN)
    if conv is None or conv.ndim != 4:
        why = (f"conv_in 'refnet.{CONV_IN}' has shape {shape_str(conv)}" if conv is not None
               else f"a file without conv_in ('refnet.{CONV_IN}' is missing)")
        raise src.damaged(REFNET, "a ReferenceNet file", why, f"{REDOWNLOAD}, or {REFNET.fix}")
    cin = int(conv.shape[1])
    meta_cin = meta_int(meta, "refnet_in_channels", src, REFNET)
    if meta_cin is not None and meta_cin != cin:
        raise src.fail(REFNET, "a ReferenceNet whose metadata does not match its weights (edited or damaged)",
                       REDOWNLOAD, f"metadata refnet_in_channels={meta_cin} but conv_in takes {cin} channels "
                       f"({shape_str(conv)})")
    if not (cin == 5 or (cin == 4 and meta_cin == 4)):
        raise src.fail(REFNET, "a UNet whose input does not take the latent and the subject mask (not a "
                       "ReferenceNet made for AnyStory)", None, f"conv_in 'refnet.input_blocks.0.0.weight' is "
                       f"{shape_str(conv)} ({cin} input channels; a ReferenceNet takes 5 = 4 latent + 1 mask, or 4 "
                       "when its metadata says refnet_in_channels=4)")
    bad = first_key(inner, lambda k: not inner[k].is_floating_point())
    if bad:
        raise src.fail(REFNET, "a quantised file (integer weights)", None, f"non-float tensor 'refnet.{bad}'")
    n = len(layout_from_state_dict(inner))
    if n == 0:
        raise src.fail(REFNET, "a UNet without attention blocks, not a ReferenceNet", None,
                       "a UNet without transformer blocks (no transformer_blocks.N.attn1.to_q.weight)")
    return cin, n


def is_refnet_file(path) -> bool:
    """Cheap guess for file lists: a safetensors file whose header says format=anystory-sdxl-refnet or whose keys
    are ``refnet.*`` (only the header is read); another format only by its name (``…refnet…``). Never raises."""
    p = str(path)
    if not p.lower().endswith((".safetensors", ".sft")):
        return "refnet" in os.path.basename(p).lower()
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 200 * 2 ** 20:
                return False
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(header, dict):
        return False
    meta = header.get("__metadata__") or {}
    if isinstance(meta, dict) and meta.get("format") == FORMAT_REFNET:
        return True
    keys = [k for k in header if k != "__metadata__"]
    return bool(keys) and all(k.startswith(REFNET_PREFIX) for k in keys)


def load_refnet(path, device="cpu", dtype: Optional[torch.dtype] = None) -> RefNetWeights:
    """Load a native ReferenceNet file (safetensors, ``refnet.*`` keys). The returned state dict has
    the ``refnet.`` prefix removed, ready for a ComfyUI/ldm UNet without attn2."""
    sd, meta, src = read_weights(path, REFNET)
    cin, _ = identify_refnet(sd, meta, src)
    out = {k[len(REFNET_PREFIX):]: v.to(device=device, dtype=dtype) if dtype is not None else v.to(device)
           for k, v in sd.items()}
    m = dict(meta)
    m.update(file=src.name, path=src.path)
    return RefNetWeights(state_dict=out, in_channels=cin, meta=m)


def save_refnet(state_dict: dict, path, meta: Optional[dict] = None) -> None:
    """Write a ReferenceNet (keys without ``refnet.``; a prefix already there is kept once) as
    safetensors with metadata format=anystory-sdxl-refnet, version, refnet_in_channels, layers."""
    src = Source.of(path)
    tensors = prepare_for_save({(k if k.startswith(REFNET_PREFIX) else REFNET_PREFIX + k): v
                                for k, v in state_dict.items()})
    conv = tensors.get(REFNET_PREFIX + CONV_IN)
    m = {str(k): str(v) for k, v in (meta or {}).items()}
    m.update(format=FORMAT_REFNET, version=str(FORMAT_VERSION))
    if conv is not None and conv.ndim == 4:
        m["refnet_in_channels"] = str(int(conv.shape[1]))
    _, n = identify_refnet(tensors, m, src)
    m["layers"] = str(n)
    save_safetensors(tensors, path, m, REFNET)


def _unet_items(unet_sd: Mapping, src: Source) -> dict:
    """The UNet tensors of a UNet or whole-checkpoint state dict, without the ``model.diffusion_model.`` prefix."""
    if any(k.startswith(REFNET_PREFIX) for k in unet_sd):
        raise src.fail(UNET_SOURCE, "already a ReferenceNet",
                       "load it as it is: pick it as refnet_name in AnyStory Model Loader", "refnet.* keys")
    if any(k.startswith(UNET_PREFIX) for k in unet_sd):
        items = {k[len(UNET_PREFIX):]: v for k, v in unet_sd.items() if k.startswith(UNET_PREFIX)}
    else:
        items = {k: v for k, v in unet_sd.items() if k.startswith(UNET_ROOTS)}
    items = {k: v for k, v in items.items() if torch.is_tensor(v)}
    if not items:
        k = first_key(unet_sd, lambda k: k.startswith(DIFFUSERS_UNET_ROOTS))
        if k:
            raise src.fail(UNET_SOURCE, "a diffusers-format UNet", None, f"diffusers key '{k}'")
        raise src.fail(UNET_SOURCE, "not a UNet", None, f"keys such as {some_keys(unet_sd)}")
    return items


def build_refnet_state_dict(unet_sd: dict, name: str = "<state dict>") -> dict:
    """Initialise a ReferenceNet from an SDXL-family UNet (the paper's ReferenceNet is a copy of the
    UNet without cross-attention that also sees the subject mask).

    ``unet_sd``: ldm-named UNet weights, with or without the ``model.diffusion_model.`` prefix (a whole
    checkpoint is fine: VAE/text-encoder keys are ignored). Returns keys without prefix, with every
    ``…transformer_blocks.N.attn2.*`` and ``…transformer_blocks.N.norm2.*`` dropped and conv_in
    (``input_blocks.0.0.weight``) widened from C×4×3×3 to C×5×3×3 with a zero 5th (mask) channel, so the
    ReferenceNet initially equals the UNet on the image channels. Other tensors are shared, not copied."""
    src = Source(name)
    items = _unet_items(unet_sd, src)
    conv = items.get(CONV_IN)
    if conv is None or conv.ndim != 4:
        raise src.damaged(UNET_SOURCE, "a UNet", "no 4-D conv_in (input_blocks.0.0.weight)")
    if conv.shape[1] != 4:
        raise src.fail(UNET_SOURCE, "not a plain SDXL UNet (its input does not take the 4 latent channels)", None,
                       f"conv_in is {shape_str(conv)} ({conv.shape[1]} input channels; an SDXL UNet takes 4)")
    if conv.shape[0] == 320:  # real-size model: refuse SD1.x/SD2.x by their context width
        ctx = {int(v.shape[1]) for k, v in items.items() if re.search(r"attn2\.to_k\.weight$", k) and v.ndim == 2}
        other = sorted(ctx - {SDXL_CONTEXT_DIM})
        if other and other[0] in (768, 1024):
            base = "SD1.x" if other[0] == 768 else "SD2.x"
            raise src.fail(UNET_SOURCE, f"an {base} UNet", None, f"cross-attention context width {other[0]}")
    out = {k: v for k, v in items.items() if not CROSS_ATTN.search(k)}
    wide = torch.zeros((conv.shape[0], 5, *conv.shape[2:]), dtype=conv.dtype, device=conv.device)
    wide[:, :4] = conv
    out[CONV_IN] = wide
    return out
