"""Refusals: what a file given to the AnyStory loader is when it is not what was asked for, and how to fix it."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from ..adapter import KIND_NATIVE

FORMAT_ADAPTER = KIND_NATIVE            # "anystory-sdxl"
FORMAT_REFNET = "anystory-sdxl-refnet"
FORMAT_VERSION = 1

SDXL_CONTEXT_DIM = 2048     # width of E_i and of SDXL's text context
CLIP_H_DIM = 1280           # CLIP ViT-H/14 hidden width (F_clip: 257×1280)
UNET_PREFIX = "model.diffusion_model."
REFNET_PREFIX = "refnet."
CONV_IN = "input_blocks.0.0.weight"

_ADAPTER_ROLE = "the AnyStory model"
_REFNET_ROLE = "the AnyStory ReferenceNet"
_ADAPTER_EXPECTED = (
    "a native AnyStory SDXL file (subject_proj.*, ip_adapter.N.to_k_ip/to_v_ip.weight, optionally "
    "routing_proj.* and router.N.*) or IP-Adapter Plus SDXL ViT-H (image_proj.* Resampler with latents "
    "1×m×1280 and proj_out 2048×1280, plus 70 ip_adapter.N.to_k_ip/to_v_ip.weight of shape C×2048, "
    "N = 1, 3, …, 139)")
_ADAPTER_FIX = ("use ip-adapter-plus_sdxl_vit-h.safetensors (or ip-adapter-plus-face_sdxl_vit-h) or a "
                "native AnyStory SDXL file (anystory_sdxl.safetensors)")
_REFNET_EXPECTED = (
    "an AnyStory ReferenceNet file: refnet.* keys in ComfyUI/ldm UNet names, no "
    "transformer_blocks.*.attn2.* / norm2.* (no cross-attention), refnet.input_blocks.0.0.weight of shape "
    "320×5×3×3 (4 latent channels + 1 mask channel), metadata format=anystory-sdxl-refnet")
_REFNET_FIX = ("use a native anystory_sdxl_refnet.safetensors, or the 'shared' ReferenceNet mode (the loaded "
               "SDXL MODEL itself, no file needed); a ReferenceNet can be made from an SDXL UNet with "
               "anystory.checkpoint.build_refnet_state_dict() + save_refnet()")

_IP_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(.+)$")
_ROUTER_LAYER = re.compile(r"^router\.(\d+)\.")
_CROSS_ATTN = re.compile(r"transformer_blocks\.\d+\.(attn2|norm2)\.")
_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_DIFFUSERS_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "time_embedding.")

class CheckpointError(ValueError):
    """A file (or state dict) that cannot be used where it was given.

    The message names the file (its base name, and the full path once), what was found in it, what
    was expected there and how to fix it. ``path`` and ``found`` are kept as attributes for the UI."""

    def __init__(self, message: str, path: Optional[str] = None, found: Optional[str] = None):
        super().__init__(message)
        self.path = path
        self.found = found


# ------------------------------------------------------------------------------------------------
# sources and messages
# ------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    name: str                   # base name, or "<state dict>"
    path: Optional[str] = None  # full path when read from disk

    @classmethod
    def of(cls, path) -> "_Source":
        p = os.path.abspath(os.fspath(path))
        return cls(os.path.basename(p), p)

    def fail(self, role: str, found: str, expected: str, fix: str) -> CheckpointError:
        where = f" (file: {self.path})" if self.path else ""
        return CheckpointError(
            f"AnyStory: cannot use '{self.name}' as {role}: it is {found}. Expected {expected}. "
            f"Fix: {fix}.{where}", path=self.path, found=found)


def _shape(t) -> tuple:
    return tuple(int(s) for s in t.shape)


def _fmt_shape(t) -> str:
    return "×".join(str(s) for s in _shape(t)) or "scalar"


def _some(keys, n: int = 4) -> str:
    keys = list(keys)
    s = ", ".join(f"'{k}'" for k in keys[:n])
    return s + (f" … ({len(keys)} in all)" if len(keys) > n else "")


def _meta_int(meta: Mapping, key: str, src: _Source, role: str, expected: str) -> Optional[int]:
    if key not in meta or meta[key] in (None, ""):
        return None
    try:
        return int(str(meta[key]).strip())
    except ValueError:
        raise src.fail(role, f"a file whose metadata {key}={meta[key]!r} is not an integer", expected,
                       "re-create the file with anystory.checkpoint") from None


def _check_version(meta: Mapping, src: _Source, role: str, expected: str) -> None:
    v = _meta_int(meta, "version", src, role, expected)
    if v is not None and v > FORMAT_VERSION:
        raise src.fail(role, f"format version {v} (this pack reads version ≤ {FORMAT_VERSION})", expected,
                       "update comfyui-anystory to a version that reads this file")


def _first(keys, pred) -> Optional[str]:
    for k in keys:
        if pred(k):
            return k
    return None


def _reject_foreign_adapter(sd: Mapping, meta: Mapping, src: _Source) -> None:
    """Recognise files that are something else than an adapter and say what they are."""
    keys = list(sd)
    role, exp, fix = _ADAPTER_ROLE, _ADAPTER_EXPECTED, _ADAPTER_FIX

    k = _first(keys, lambda k: k.startswith(REFNET_PREFIX))
    if k or meta.get("format") == FORMAT_REFNET:
        raise src.fail(role, f"the AnyStory ReferenceNet file (refnet.* keys, e.g. '{k}')", exp,
                       "pick this file in the ReferenceNet slot, and the adapter file "
                       "(anystory_sdxl.safetensors or ip-adapter-plus_sdxl_vit-h.safetensors) here")
    k = _first(keys, lambda k: k.startswith(UNET_PREFIX))
    if k:
        n = sum(1 for x in keys if x.startswith(UNET_PREFIX))
        raise src.fail(role, f"a whole SD/SDXL checkpoint ({n} model.diffusion_model.* UNet tensors, e.g. '{k}')",
                       exp, "load it with Load Checkpoint; " + fix)
    k = _first(keys, lambda k: k.startswith(_UNET_ROOTS[:3]) or k.startswith(_DIFFUSERS_UNET_ROOTS))
    if k and not _first(keys, lambda k: k.startswith(("ip_adapter.", "image_proj.", "subject_proj."))):
        raise src.fail(role, f"a bare UNet (e.g. key '{k}')", exp, "load it with Load Diffusion Model; " + fix)
    k = _first(keys, lambda k: ("double_blocks." in k or "single_blocks." in k or "ip_adapter_double" in k
                                or "ip_adapter_single" in k or "ip_adapter_proj_model" in k))
    if k:
        raise src.fail(role, f"a Flux IP-Adapter or Flux model file (e.g. key '{k}')", exp,
                       "Flux files do not fit SDXL; " + fix)
    k = _first(keys, lambda k: ("faceid" in k.lower() or "perceiver_resampler" in k
                                or k.startswith(("image_proj.proj.0.", "image_proj.proj.2."))
                                or (k.startswith("ip_adapter.") and "_lora." in k)))
    if k:
        raise src.fail(role, f"an IP-Adapter FaceID file (e.g. key '{k}'; FaceID takes InsightFace face "
                       "embeddings through an MLP projection and LoRA weights, which AnyStory does not use)",
                       exp, fix)
    k = _first(keys, lambda k: ("lora_unet_" in k or "lora_te" in k or ".lora_down." in k or ".lora_up." in k
                                or ".lora_A." in k or ".lora_B." in k))
    if k:
        raise src.fail(role, f"a LoRA (e.g. key '{k}')", exp, "load it with a LoRA loader; " + fix)
    k = _first(keys, lambda k: k.startswith(("vision_model.", "visual.")) or ".vision_model." in k)
    if k:
        raise src.fail(role, f"a CLIP vision model (e.g. key '{k}')", exp,
                       "load it with Load CLIP Vision and connect it to AnyStorySubjectEncode; " + fix)
    k = _first(keys, lambda k: k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")))
    if k:
        raise src.fail(role, f"a VAE (e.g. key '{k}')", exp, "load it with Load VAE; " + fix)
