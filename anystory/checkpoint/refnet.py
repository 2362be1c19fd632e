"""The ReferenceNet file."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..layers import LayerLayout, layout_from_state_dict
from .diagnosis import (CONV_IN, FORMAT_REFNET, FORMAT_VERSION, REFNET_PREFIX, SDXL_CONTEXT_DIM, UNET_PREFIX,
                        _CROSS_ATTN, _DIFFUSERS_UNET_ROOTS, _REFNET_EXPECTED, _REFNET_FIX, _REFNET_ROLE, _UNET_ROOTS,
                        _check_version, _first, _fmt_shape, _meta_int, _some, _Source)
from .io import _atomic_save, _prepare_for_save, _read


# ------------------------------------------------------------------------------------------------
# ReferenceNet
# ------------------------------------------------------------------------------------------------
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


def _identify_refnet(sd: Mapping, meta: Mapping, src: _Source) -> tuple[int, int]:
    """Check a ``refnet.*`` state dict (shapes only): returns (in_channels, number of transformer blocks)."""
    role, exp, fix = _REFNET_ROLE, _REFNET_EXPECTED, _REFNET_FIX
    meta = {str(k): str(v) for k, v in (meta or {}).items()}
    if not sd:
        raise src.fail(role, "empty (no tensors)", exp, fix)
    keys = list(sd)
    outside = [k for k in keys if not k.startswith(REFNET_PREFIX)]
    if outside:
        if len(outside) == len(keys):
            if _first(keys, lambda k: k.startswith(("subject_proj.", "image_proj.", "ip_adapter.", "router."))):
                found = "an adapter file (subject_proj/image_proj/ip_adapter keys), not a ReferenceNet"
                fix2 = "pick it as the AnyStory model (adapter), and " + fix
            elif _first(keys, lambda k: k.startswith(UNET_PREFIX) or k.startswith(_UNET_ROOTS)):
                k = _first(keys, lambda k: bool(_CROSS_ATTN.search(k))) or outside[0]
                found = (f"a normal SD/SDXL UNet or checkpoint (e.g. key '{k}', no refnet.* keys; it has "
                         "cross-attention and a 4-channel conv_in)")
                fix2 = fix
            else:
                found = f"not a ReferenceNet (keys such as {_some(keys)})"
                fix2 = fix
            raise src.fail(role, found, exp, fix2)
        raise src.fail(role, f"a file with keys outside refnet.* ({_some(outside)})", exp, fix)
    fmt = meta.get("format", "")
    if fmt.startswith("anystory") and fmt != FORMAT_REFNET:
        raise src.fail(role, f"a file whose metadata says format={fmt}", exp, fix)
    _check_version(meta, src, role, exp)
    inner = {k[len(REFNET_PREFIX):]: v for k, v in sd.items()}
    cross = [k for k in inner if _CROSS_ATTN.search(k)]
    if cross:
        raise src.fail(role, f"a UNet with cross-attention weights (e.g. 'refnet.{cross[0]}', {len(cross)} "
                       "attn2/norm2 tensors)", exp,
                       "rebuild it with build_refnet_state_dict(), which drops attn2/norm2; " + fix)
    conv = inner.get(CONV_IN)
    if conv is None:
        raise src.fail(role, "a file without conv_in ('refnet.input_blocks.0.0.weight' is missing)", exp, fix)
    if conv.ndim != 4:
        raise src.fail(role, f"a file whose conv_in 'refnet.input_blocks.0.0.weight' has shape {_fmt_shape(conv)}",
                       exp, fix)
    cin = int(conv.shape[1])
    meta_cin = _meta_int(meta, "refnet_in_channels", src, role, exp)
    if meta_cin is not None and meta_cin != cin:
        raise src.fail(role, f"a file whose metadata says refnet_in_channels={meta_cin} but whose conv_in takes "
                       f"{cin} channels ({_fmt_shape(conv)})", exp, "re-create the file with save_refnet")
    if not (cin == 5 or (cin == 4 and meta_cin == 4)):
        raise src.fail(role, f"a file whose conv_in 'refnet.input_blocks.0.0.weight' is {_fmt_shape(conv)} "
                       f"({cin} input channels; a ReferenceNet takes 5 = 4 latent + 1 mask, or 4 when its "
                       "metadata says refnet_in_channels=4)", exp, fix)
    bad = _first(inner, lambda k: not inner[k].is_floating_point())
    if bad:
        raise src.fail(role, f"a file with a non-float tensor 'refnet.{bad}'", exp, fix)
    n = len(layout_from_state_dict({k: v for k, v in inner.items()}))
    if n == 0:
        raise src.fail(role, "a UNet without transformer blocks (no transformer_blocks.N.attn1.to_q.weight)", exp, fix)
    return cin, n


def load_refnet(path, device="cpu", dtype: Optional[torch.dtype] = None) -> RefNetWeights:
    """Load a native ReferenceNet file (safetensors, ``refnet.*`` keys). The returned state dict has
    the ``refnet.`` prefix removed, ready for a ComfyUI/ldm UNet without attn2."""
    sd, meta, src = _read(path, _REFNET_ROLE, _REFNET_EXPECTED)
    cin, _ = _identify_refnet(sd, meta, src)
    out = {k[len(REFNET_PREFIX):]: v.to(device=device, dtype=dtype) if dtype is not None else v.to(device)
           for k, v in sd.items()}
    m = dict(meta)
    m.update(file=src.name, path=src.path)
    return RefNetWeights(state_dict=out, in_channels=cin, meta=m)


def save_refnet(state_dict: dict, path, meta: Optional[dict] = None) -> None:
    """Write a ReferenceNet (keys without ``refnet.``; a prefix already there is kept once) as
    safetensors with metadata format=anystory-sdxl-refnet, version, refnet_in_channels, layers."""
    src = _Source.of(path)
    tensors = _prepare_for_save({(k if k.startswith(REFNET_PREFIX) else REFNET_PREFIX + k): v
                                 for k, v in state_dict.items()})
    conv = tensors.get(REFNET_PREFIX + CONV_IN)
    m = {str(k): str(v) for k, v in (meta or {}).items()}
    m.update(format=FORMAT_REFNET, version=str(FORMAT_VERSION))
    if conv is not None and conv.ndim == 4:
        m["refnet_in_channels"] = str(int(conv.shape[1]))
    _, n = _identify_refnet(tensors, m, src)
    m["layers"] = str(n)
    _atomic_save(tensors, path, m, _REFNET_ROLE)


def build_refnet_state_dict(unet_sd: dict, name: str = "<state dict>") -> dict:
    """Initialise a ReferenceNet from an SDXL-family UNet (the paper's ReferenceNet is a copy of the
    UNet without cross-attention that also sees the subject mask).

    ``unet_sd``: ldm-named UNet weights, with or without the ``model.diffusion_model.`` prefix (a whole
    checkpoint is fine: VAE/text-encoder keys are ignored). Returns keys without prefix, with every
    ``…transformer_blocks.N.attn2.*`` and ``…transformer_blocks.N.norm2.*`` dropped and conv_in
    (``input_blocks.0.0.weight``) widened from C×4×3×3 to C×5×3×3 with a zero 5th (mask) channel, so the
    ReferenceNet initially equals the UNet on the image channels. Other tensors are shared, not copied."""
    src = _Source(name)
    role = "the source of a ReferenceNet"
    exp = "an SDXL-family UNet state dict in ComfyUI/ldm names (input_blocks.0.0.weight …)"
    fix = "pass the UNet (or whole checkpoint) state dict of an SDXL model"
    if any(k.startswith(REFNET_PREFIX) for k in unet_sd):
        raise src.fail(role, "already a ReferenceNet (refnet.* keys)", exp, "use load_refnet on it")
    if any(k.startswith(UNET_PREFIX) for k in unet_sd):
        items = {k[len(UNET_PREFIX):]: v for k, v in unet_sd.items() if k.startswith(UNET_PREFIX)}
    else:
        items = {k: v for k, v in unet_sd.items() if k.startswith(_UNET_ROOTS)}
    items = {k: v for k, v in items.items() if torch.is_tensor(v)}
    if not items:
        k = _first(unet_sd, lambda k: k.startswith(_DIFFUSERS_UNET_ROOTS))
        if k:
            raise src.fail(role, f"a diffusers-format UNet (e.g. key '{k}')", exp,
                           "use the single-file (ComfyUI/ldm) SDXL checkpoint")
        raise src.fail(role, f"not a UNet (keys such as {_some(unet_sd)})", exp, fix)
    conv = items.get(CONV_IN)
    if conv is None or conv.ndim != 4:
        raise src.fail(role, "a UNet without a 4-D conv_in (input_blocks.0.0.weight)", exp, fix)
    if conv.shape[1] != 4:
        raise src.fail(role, f"a UNet whose conv_in is {_fmt_shape(conv)} ({conv.shape[1]} input channels; an "
                       "SDXL UNet takes 4 latent channels)", exp, fix)
    if conv.shape[0] == 320:  # real-size model: refuse SD1.x/SD2.x by their context width
        ctx = {int(v.shape[1]) for k, v in items.items() if re.search(r"attn2\.to_k\.weight$", k) and v.ndim == 2}
        other = sorted(ctx - {SDXL_CONTEXT_DIM})
        if other and other[0] in (768, 1024):
            base = "SD1.x" if other[0] == 768 else "SD2.x"
            raise src.fail(role, f"an {base} UNet (cross-attention context width {other[0]})", exp, fix)
    out = {k: v for k, v in items.items() if not _CROSS_ATTN.search(k)}
    wide = torch.zeros((conv.shape[0], 5, *conv.shape[2:]), dtype=conv.dtype, device=conv.device)
    wide[:, :4] = conv
    out[CONV_IN] = wide
    return out
