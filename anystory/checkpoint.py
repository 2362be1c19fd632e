"""Checkpoints: read and write the AnyStory model ("router loading") and the ReferenceNet.

Two files, so that the large ReferenceNet stays optional (DESIGN.md §3):

**Adapter** (``anystory_sdxl.safetensors``, ``__metadata__`` ``format=anystory-sdxl``), keys exactly
those of :meth:`AnyStoryAdapter.state_dict`:

- ``subject_proj.*``  the subject QFormer (IP-Adapter Resampler names; ``latents`` 1×m×1280) that turns
  the CLIP-H features of subject i into E_i (m × 2048);
- ``ip_adapter.{N}.to_k_ip.weight`` / ``.to_v_ip.weight``  Ŵ_k^l, Ŵ_v^l of eq. 5 (C×2048), N = 1, 3, …
  (IP-Adapter's odd numbering of the cross-attention layers, 1…139 for SDXL's 70);
- ``routing_proj.*``  the routing QFormer (1 query) → R_i;                                [optional]
- ``router.{N}.*``    the router of layer l (coarse map, masked refinement, refined map M_i^l). [optional]

**IP-Adapter Plus SDXL ViT-H** (the public stand-in for the subject branch): ``image_proj.*`` (same
Resampler, m = 16 read from the file) + the same ``ip_adapter.{N}.*``; as ``.safetensors`` or as the
official nested ``.bin`` (``{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}``).
``ip-adapter-plus-face_sdxl_vit-h`` has the same shapes and loads the same way.

**ReferenceNet** (``anystory_sdxl_refnet.safetensors``, ``format=anystory-sdxl-refnet``): ``refnet.*``
in ComfyUI/ldm UNet names, without any ``transformer_blocks.*.attn2.*`` / ``norm2.*`` (no
cross-attention), ``input_blocks.0.0.weight`` 320×5×3×3 (4 latent channels + the subject mask). It gives
G_i^l, the hidden states entering self-attention of layer l, for the routed reference attention.

Safety: files are only ever read with ``safetensors`` or ``torch.load(..., weights_only=True)``; nothing
here unpickles code. Every refusal is a :class:`CheckpointError` that names the file, what was found,
what was expected and how to fix it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch

from .adapter import KIND_IPADAPTER_PLUS, KIND_NATIVE, AnyStoryAdapter
from .layers import LayerLayout, layout_from_state_dict, sdxl_layout
from .paper.encoder import Resampler

__all__ = [
    "CheckpointError", "FORMAT_ADAPTER", "FORMAT_REFNET", "FORMAT_VERSION",
    "load_adapter", "adapter_from_state_dict", "save_adapter",
    "RefNetWeights", "load_refnet", "save_refnet", "build_refnet_state_dict", "inspect_file",
]

FORMAT_ADAPTER = KIND_NATIVE            # "anystory-sdxl"
FORMAT_REFNET = "anystory-sdxl-refnet"
FORMAT_VERSION = 1

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth")
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


# ------------------------------------------------------------------------------------------------
# reading files (safetensors or weights-only torch.load; never arbitrary unpickling)
# ------------------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.float16),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.float16),
}


def _safetensors_header(p: str, src: _Source, role: str, expected: str) -> tuple[dict, dict]:
    """Parse and check the header without reading tensors: (``{key: meta tensor}``, metadata).

    Detects truncation (the header's data offsets must cover the file exactly) and pickles that were
    renamed ``.safetensors``."""
    def corrupt(why: str) -> CheckpointError:
        return src.fail(role, f"a truncated or corrupted safetensors file ({why})", expected,
                        "re-download or re-create the file (a partial download is the usual cause)")

    size = os.path.getsize(p)
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"only {size} bytes, smaller than a safetensors header")
        n = int.from_bytes(head, "little")
        header = None
        if 0 < n <= min(size - 8, 200 * 2 ** 20):
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                header = e
    if not isinstance(header, dict):
        if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise src.fail(role, "a PyTorch pickle/zip file with a .safetensors name", expected,
                           "rename it to .bin (it is then read weights-only) or convert it to safetensors")
        if header is None:
            raise corrupt(f"the header claims {n} bytes but the file has {size}")
        if isinstance(header, Exception):
            raise corrupt(f"unreadable header: {header}")
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    shapes, end = {}, 0
    try:
        for k, info in header.items():
            dt = _ST_DTYPES.get(str(info["dtype"]), torch.float32)
            shapes[k] = torch.empty(tuple(info["shape"]), dtype=dt, device="meta")
            end = max(end, int(info["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise corrupt(f"malformed tensor entry: {e}") from None
    if 8 + n + end != size:
        got = size - 8 - n
        raise corrupt(f"the header describes {end} bytes of tensor data, the file holds {got}")
    return shapes, {str(k): str(v) for k, v in meta.items()}


def _torch_load(p: str, src: _Source, role: str, expected: str, mmap: bool = False):
    """``torch.load(p, map_location="cpu", weights_only=True)`` — the only way a pickle is ever read."""
    def load(use_mmap: bool):
        kw = {"mmap": True} if use_mmap else {}
        return torch.load(p, map_location="cpu", weights_only=True, **kw)

    try:
        try:
            return load(mmap)
        except pickle.UnpicklingError:
            raise
        except Exception:
            if not mmap:
                raise
            return load(False)  # legacy (non-zip) files cannot be memory-mapped
    except pickle.UnpicklingError as e:
        msg = str(e)
        why = re.search(r"WeightsUnpickler error:\s*([^\n]*)", msg)
        why = why.group(1) if why else msg.splitlines()[0] if msg else type(e).__name__
        if re.search(r"Unsupported (global|operand|class)|GLOBAL ", msg):
            obj = re.search(r"GLOBAL (\S+)", msg)
            detail = f" (it references {obj.group(1)})" if obj else f" ({why[:160]})"
            raise src.fail(role, "refused: not a weights-only file — it contains pickled Python objects beyond "
                           f"tensors and dicts{detail}, which could run code, so it was not loaded", expected,
                           "convert it to safetensors from a trusted source, or download the .safetensors "
                           "version of the file") from None
        raise src.fail(role, f"a truncated or corrupted PyTorch file ({why[:200]})", expected,
                       "re-download or re-create the file") from None
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise src.fail(role, f"a truncated or corrupted PyTorch file ({first})", expected,
                       "re-download or re-create the file (or use its .safetensors version)") from None


def _flatten(obj, src: _Source, role: str, expected: str) -> dict:
    """Nested dicts of tensors → flat ``{"a.b.c": tensor}``; non-tensor leaves (counters, strings)
    are ignored."""
    if not isinstance(obj, Mapping):
        raise src.fail(role, f"a file holding a {type(obj).__name__}, not a dict of tensors", expected,
                       "use a weights file (a dict of tensors)")
    out: dict = {}

    def walk(o, prefix):
        for k, v in o.items():
            key = f"{prefix}{k}"
            if torch.is_tensor(v):
                out[key] = v
            elif isinstance(v, Mapping):
                walk(v, key + ".")

    walk(obj, "")
    return out


def _read(path, role: str, expected: str, shapes_only: bool = False) -> tuple[dict, dict, _Source]:
    """Read a file: (flat ``{key: tensor}``, metadata, source). With ``shapes_only`` the tensors are
    meta tensors (safetensors) or memory-mapped (torch zip files) — nothing large is read."""
    if path is None or (isinstance(path, str) and not path):
        raise CheckpointError(f"AnyStory: no file given for {role}. Fix: pick a file.")
    src = _Source.of(path)
    p = src.path
    if not os.path.exists(p):
        raise src.fail(role, "missing: there is no such file", expected,
                       "check the name, and put the file in ComfyUI/models/anystory (or models/ipadapter)")
    if os.path.isdir(p):
        raise src.fail(role, "a directory, not a file", expected, "pick the weights file itself")
    ext = os.path.splitext(p)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        shapes, meta = _safetensors_header(p, src, role, expected)
        if shapes_only:
            return shapes, meta, src
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd = load_file(p, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise src.fail(role, f"a truncated or corrupted safetensors file ({e})", expected,
                           "re-download or re-create the file") from None
        return sd, meta, src
    if ext in PICKLE_EXTENSIONS:
        obj = _torch_load(p, src, role, expected, mmap=shapes_only)
        return _flatten(obj, src, role, expected), {}, src
    raise src.fail(role, f"a file with the unsupported extension '{ext or '(none)'}'", expected,
                   "use a .safetensors file (or an IP-Adapter .bin/.pt/.pth, read weights-only)")


# ------------------------------------------------------------------------------------------------
# identifying an adapter state dict (works on real or meta tensors: only shapes/dtypes are read)
# ------------------------------------------------------------------------------------------------
@dataclass
class _AdapterPlan:
    kind: str
    prefix: str                          # "subject_proj." or "image_proj." in the source
    subject_cfg: dict
    layer_dims: dict                     # {N: C}
    routing_cfg: Optional[dict] = None
    router_dim: int = 256
    router_heads: int = 4
    with_router: bool = False

    def build_meta(self) -> AnyStoryAdapter:
        """The adapter on the meta device (no memory, no init): its state_dict's shapes are the truth."""
        with torch.device("meta"):
            sp = Resampler(**self.subject_cfg)
            rp = Resampler(**self.routing_cfg) if self.routing_cfg is not None else None
            return AnyStoryAdapter(sp, self.layer_dims, routing_proj=rp, router_dim=self.router_dim,
                                   router_heads=self.router_heads, with_router=self.with_router, kind=self.kind)


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


def _resampler_cfg(sd: Mapping, prefix: str, what: str, src: _Source) -> dict:
    role, exp = _ADAPTER_ROLE, _ADAPTER_EXPECTED
    lat = sd.get(prefix + "latents")
    if lat is None:
        raise src.fail(role, f"a file whose {what} ({prefix}*) has no '{prefix}latents'", exp, _ADAPTER_FIX)
    if lat.ndim != 3 or lat.shape[0] != 1:
        raise src.fail(role, f"a file whose '{prefix}latents' has shape {_fmt_shape(lat)} (not 3-D 1×m×dim)",
                       exp, "re-create or re-download the file; " + _ADAPTER_FIX)
    for k in ("proj_in.weight", "proj_out.weight", "norm_out.weight"):
        t = sd.get(prefix + k)
        if t is None:
            raise src.fail(role, f"a file whose {what} is incomplete: '{prefix}{k}' is missing", exp, _ADAPTER_FIX)
        if t.ndim != (2 if k != "norm_out.weight" else 1):
            raise src.fail(role, f"a file whose '{prefix}{k}' has shape {_fmt_shape(t)}", exp, _ADAPTER_FIX)
    if f"{prefix}layers.0.0.to_q.weight" in sd and f"{prefix}layers.0.1.1.weight" not in sd:
        raise src.fail(role, f"a file whose {what} is incomplete: '{prefix}layers.0.1.1.weight' is missing",
                       exp, _ADAPTER_FIX)
    try:
        return Resampler.config_from_state_dict(sd, prefix)
    except (KeyError, IndexError, AttributeError) as e:
        raise src.fail(role, f"a file whose {what} is incomplete (missing {e})", exp, _ADAPTER_FIX) from None


def _read_layers(sd: Mapping, src: _Source, kind_found: str) -> tuple[dict, int]:
    """Ŵ_k^l / Ŵ_v^l per layer: ``{N: C}`` and the route width (2048 for SDXL), with the checks that
    give the most telling message first (SD1.5 context width, then structure)."""
    role, exp, fix = _ADAPTER_ROLE, _ADAPTER_EXPECTED, _ADAPTER_FIX
    ks, vs, other = {}, {}, []
    for k, t in sd.items():
        m = _IP_LAYER.match(k)
        if not m:
            continue
        n, rest = int(m.group(1)), m.group(2)
        if rest == "to_k_ip.weight":
            ks[n] = t
        elif rest == "to_v_ip.weight":
            vs[n] = t
        else:
            other.append(k)
    if not ks and not vs:
        raise src.fail(role, f"{kind_found} without per-layer weights Ŵ_k/Ŵ_v (no ip_adapter.N.to_k_ip.weight)",
                       exp, fix)
    bad = [(f"ip_adapter.{n}.to_k_ip.weight", t) for n, t in ks.items() if t.ndim != 2]
    bad += [(f"ip_adapter.{n}.to_v_ip.weight", t) for n, t in vs.items() if t.ndim != 2]
    if bad:
        k, t = bad[0]
        raise src.fail(role, f"a file whose '{k}' has shape {_fmt_shape(t)} (not 2-D C×2048)", exp,
                       "re-create or re-download the file")
    widths = sorted({int(t.shape[1]) for t in list(ks.values()) + list(vs.values())})
    idx = sorted(set(ks) | set(vs))
    if 768 in widths:
        raise src.fail(role, f"an SD1.5 IP-Adapter (ip_adapter.N.to_k_ip takes 768-d context tokens; {len(idx)} "
                       f"layers numbered {idx[0]}..{idx[-1]}; SDXL has 70 numbered 1..139 with 2048-d context)",
                       exp, "SD1.5 adapters do not fit SDXL; " + fix)
    if 1024 in widths and len(widths) == 1:
        raise src.fail(role, f"an IP-Adapter for SD2.x (1024-d context tokens, {len(idx)} layers)", exp, fix)
    if other:
        raise src.fail(role, f"a file with unexpected per-layer keys ({_some(other)})", exp, fix)
    for n in idx:
        if n not in vs:
            raise src.fail(role, f"a file with 'ip_adapter.{n}.to_k_ip.weight' but no 'ip_adapter.{n}.to_v_ip.weight'",
                           exp, "re-create or re-download the file")
        if n not in ks:
            raise src.fail(role, f"a file with 'ip_adapter.{n}.to_v_ip.weight' but no 'ip_adapter.{n}.to_k_ip.weight'",
                           exp, "re-create or re-download the file")
        if _shape(ks[n]) != _shape(vs[n]):
            raise src.fail(role, f"a file whose layer {n} has to_k_ip {_fmt_shape(ks[n])} but to_v_ip "
                           f"{_fmt_shape(vs[n])} (Ŵ_k^l and Ŵ_v^l must have the same shape)",
                           exp, "re-create or re-download the file")
    if len(widths) != 1:
        raise src.fail(role, f"a file whose per-layer weights take different context widths {widths}", exp, fix)
    want = list(range(1, 2 * len(idx), 2))
    if idx != want:
        missing = sorted(set(want) - set(idx))
        extra = sorted(set(idx) - set(want))
        what = []
        if missing:
            what.append(f"missing {missing[:8]}")
        if extra:
            what.append(f"unexpected {extra[:8]}")
        raise src.fail(role, f"a file whose ip_adapter layers are numbered {idx[:6]}{'…' if len(idx) > 6 else ''} "
                       f"({', '.join(what)}; IP-Adapter numbers the cross-attention layers 1, 3, 5, … "
                       f"without gaps)", exp, "re-create or re-download the file; " + fix)
    return {n: int(ks[n].shape[0]) for n in idx}, widths[0]


def _identify_adapter(sd: Mapping, meta: Mapping, src: _Source) -> _AdapterPlan:
    """What an adapter state dict is (native / IP-Adapter Plus) and its architecture, from shapes only;
    raises :class:`CheckpointError` for everything else."""
    role, exp, fix = _ADAPTER_ROLE, _ADAPTER_EXPECTED, _ADAPTER_FIX
    meta = {str(k): str(v) for k, v in (meta or {}).items()}
    if not sd:
        raise src.fail(role, "empty (no tensors)", exp, "re-download or re-create the file; " + fix)
    _reject_foreign_adapter(sd, meta, src)
    keys = list(sd)
    fmt = meta.get("format", "")
    native = any(k.startswith("subject_proj.") for k in keys)
    ipa = any(k.startswith("image_proj.") for k in keys)
    if native and ipa:
        raise src.fail(role, "a file with both subject_proj.* and image_proj.* keys", exp, fix)
    if fmt.startswith("anystory") and fmt != FORMAT_ADAPTER:
        raise src.fail(role, f"a file whose metadata says format={fmt}", exp, fix)
    if fmt == FORMAT_ADAPTER and not native:
        raise src.fail(role, "a file whose metadata says format=anystory-sdxl but which has no subject_proj.* keys",
                       exp, "re-create the file with anystory.checkpoint.save_adapter")
    if not native and not ipa:
        if any(k.startswith("ip_adapter.") for k in keys):
            raise src.fail(role, "a file with per-layer ip_adapter.* weights but no image projection "
                           "(neither image_proj.* nor subject_proj.*)", exp, fix)
        raise src.fail(role, f"not a known adapter layout (keys such as {_some(keys)})", exp, fix)
    _check_version(meta, src, role, exp)
    bad_dtype = _first(keys, lambda k: not sd[k].is_floating_point())
    if bad_dtype:
        raise src.fail(role, f"a file with a non-float tensor '{bad_dtype}' ({sd[bad_dtype].dtype}; quantised?)",
                       exp, fix)

    prefix = "subject_proj." if native else "image_proj."
    kind = KIND_NATIVE if native else KIND_IPADAPTER_PLUS
    found = "a native AnyStory file" if native else "an IP-Adapter file"
    if ipa and "image_proj.latents" not in sd and ("image_proj.proj.weight" in sd or "image_proj.norm.weight" in sd):
        p = sd.get("image_proj.proj.weight")
        ctx = None
        if "image_proj.norm.weight" in sd:
            ctx = int(sd["image_proj.norm.weight"].shape[0])
        base = {768: "SD1.5", 2048: "SDXL"}.get(ctx, f"a {ctx}-d context model" if ctx else "an unknown model")
        extra = f", image_proj.proj {_fmt_shape(p)}" if p is not None else ""
        raise src.fail(role, f"a non-Plus {base} IP-Adapter (image_proj.proj/image_proj.norm: a few global "
                       f"tokens from the pooled CLIP embedding{extra}; no Resampler latents)", exp,
                       "AnyStory needs the Plus (Resampler) subject tokens; " + fix)

    layer_dims, route_dim = _read_layers(sd, src, found)
    subject_cfg = _resampler_cfg(sd, prefix, "subject QFormer", src)
    if subject_cfg["output_dim"] != route_dim:
        raise src.fail(role, f"a file whose {prefix}proj_out gives {subject_cfg['output_dim']}-d tokens E_i but whose "
                       f"ip_adapter.N.to_k_ip take {route_dim}-d tokens", exp, "re-create or re-download the file")
    if ipa:
        if route_dim != SDXL_CONTEXT_DIM:
            raise src.fail(role, f"an IP-Adapter for a {route_dim}-d context (not SDXL's 2048; "
                           f"{len(layer_dims)} layers)", exp, fix)
        emb = subject_cfg["embedding_dim"]
        if emb == 512:
            raise src.fail(role, "an InstantID-style adapter (image_proj.proj_in takes 512-d face embeddings, "
                           "not CLIP ViT-H image features)", exp, fix)
        if subject_cfg["dim"] == CLIP_H_DIM and emb != CLIP_H_DIM:
            raise src.fail(role, f"an IP-Adapter Plus for {emb}-d image features (e.g. 1024 = CLIP ViT-L, as "
                           "Kolors' adapter; 1664 = ViT-bigG); AnyStory encodes subjects with CLIP ViT-H (1280-d)",
                           exp, fix)

    plan = _AdapterPlan(kind=kind, prefix=prefix, subject_cfg=subject_cfg, layer_dims=layer_dims)
    if native:
        has_rp = any(k.startswith("routing_proj.") for k in keys)
        router_idx = sorted({int(m.group(1)) for k in keys for m in [_ROUTER_LAYER.match(k)] if m})
        if router_idx and not has_rp:
            raise src.fail(role, "an incomplete native file: router.N.* weights without the routing QFormer "
                           "(routing_proj.*) that computes R_i", exp, "re-create the file with save_adapter")
        if has_rp:
            plan.routing_cfg = _resampler_cfg(sd, "routing_proj.", "routing QFormer", src)
            if plan.routing_cfg["num_queries"] != 1:
                raise src.fail(role, f"a file whose routing QFormer has {plan.routing_cfg['num_queries']} queries "
                               "(R_i is one token: routing_proj.latents must be 1×1×dim)", exp,
                               "re-create the file with save_adapter")
        if router_idx:
            if router_idx != sorted(layer_dims):
                missing = sorted(set(layer_dims) - set(router_idx))
                extra = sorted(set(router_idx) - set(layer_dims))
                raise src.fail(role, f"a native file whose router layers do not match its ip_adapter layers "
                               f"(router missing for {missing[:8]}, extra {extra[:8]})", exp,
                               "re-create the file with save_adapter")
            n0 = router_idx[0]
            pz = sd.get(f"router.{n0}.proj_z.weight")
            if pz is None or pz.ndim != 2:
                raise src.fail(role, f"a native file whose router layer {n0} has no 2-D 'router.{n0}.proj_z.weight'",
                               exp, "re-create the file with save_adapter")
            rdim = int(pz.shape[0])
            heads = _meta_int(meta, "router_heads", src, role, exp)
            heads = heads if heads is not None else max(1, rdim // 64)
            if heads <= 0 or rdim % heads:
                raise src.fail(role, f"a native file with router_dim {rdim} and router_heads={heads} (router_dim "
                               "must be divisible by the heads)", exp, "fix the metadata router_heads")
            plan.router_dim, plan.router_heads, plan.with_router = rdim, heads, True
        else:
            for k, default in (("router_dim", 256), ("router_heads", 4)):
                v = _meta_int(meta, k, src, role, exp)
                setattr(plan, k, v if v is not None and v > 0 else default)
            if plan.router_dim % plan.router_heads:
                plan.router_dim, plan.router_heads = 256, 4

    # metadata agrees with the weights
    checks = [("subject_tokens", subject_cfg["num_queries"]), ("layers", len(layer_dims))]
    if plan.with_router:
        checks.append(("router_dim", plan.router_dim))
    for key, actual in checks:
        v = _meta_int(meta, key, src, role, exp)
        if v is not None and native and v != actual:
            raise src.fail(role, f"a file whose metadata says {key}={v} but whose weights have {actual}", exp,
                           "re-create the file with save_adapter (it was edited or damaged)")

    # SDXL itself: 70 layers must have SDXL's widths (other SDXL-family UNets are checked at apply time)
    if len(layer_dims) == 70:
        sig = dict(sdxl_layout().signature())
        for n, c in layer_dims.items():
            if sig.get(n) != c:
                raise src.fail(role, f"a 70-layer file whose ip_adapter.{n}.to_k_ip is {c}×{route_dim}, but SDXL's "
                               f"cross-attention layer {n} has width {sig.get(n)} (SDXL: 640 for input 4-5 and output "
                               "3-5, 1280 elsewhere)", exp, "re-create or re-download the file; " + fix)

    # finally: every key and shape exactly as the module has them
    expected = {k: _shape(v) for k, v in plan.build_meta().state_dict().items()}
    actual = {(("subject_proj." + k[len(prefix):]) if k.startswith(prefix) else k): _shape(v) for k, v in sd.items()}
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and actual[k] != expected[k]]
    if missing or unexpected or wrong:
        back = (lambda k: prefix + k[len("subject_proj."):] if k.startswith("subject_proj.") else k)
        parts = []
        if missing:
            parts.append(f"missing {_some([back(k) for k in missing])}")
        if unexpected:
            parts.append(f"unexpected {_some([back(k) for k in unexpected])}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(
                f"'{back(k)}' {'×'.join(map(str, actual[k]))} (expected {'×'.join(map(str, expected[k]))})"
                for k in wrong[:4]))
        raise src.fail(role, f"{found} whose keys do not fit the architecture read from it ({'; '.join(parts)})",
                       exp, "re-create or re-download the file; " + fix)
    return plan


def _pick_dtype(sd: Mapping, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    count: dict = {}
    for t in sd.values():
        count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    dt = max(count, key=count.get)
    return dt if dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float16


def _build_adapter(sd: Mapping, meta: Optional[Mapping], src: _Source, device, dtype, owned: bool) -> AnyStoryAdapter:
    meta = {str(k): str(v) for k, v in (meta or {}).items()}
    plan = _identify_adapter(sd, meta, src)
    target = _pick_dtype(sd, dtype)
    tensors = {}
    for k, v in sd.items():
        if k.startswith(plan.prefix):
            k = "subject_proj." + k[len(plan.prefix):]
        tensors[k] = v.detach().to(device=device, dtype=target, copy=not owned)
    adapter = plan.build_meta()
    try:
        adapter.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:  # pre-checked above; kept as a safety net
        raise src.fail(_ADAPTER_ROLE, f"a file that does not load ({str(e).splitlines()[-1].strip()})",
                       _ADAPTER_EXPECTED, "re-create or re-download the file") from None
    left = [n for n, t in list(adapter.named_parameters()) + list(adapter.named_buffers()) if t.is_meta]
    if left:
        raise src.fail(_ADAPTER_ROLE, f"a file without {_some(left)}", _ADAPTER_EXPECTED, _ADAPTER_FIX)
    out_meta = dict(meta)
    if meta.get("format") and meta.get("format") != plan.kind:
        out_meta["file_format"] = meta["format"]
    out_meta.update(format=plan.kind, file=src.name)
    if src.path:
        out_meta["path"] = src.path
    if plan.kind == KIND_IPADAPTER_PLUS:
        out_meta["variant"] = "plus-face" if "face" in src.name.lower() else "plus"
    adapter.kind = plan.kind
    adapter.meta = out_meta
    return adapter.eval()


# ------------------------------------------------------------------------------------------------
# public API: adapter
# ------------------------------------------------------------------------------------------------
def load_adapter(path, device="cpu", dtype: Optional[torch.dtype] = None) -> AnyStoryAdapter:
    """Load the AnyStory model from a file: native AnyStory SDXL (``.safetensors``) or IP-Adapter Plus
    SDXL ViT-H (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with ``weights_only=True``).

    The architecture is read from the weights: m (tokens of E_i) from ``latents``, the width C of each
    layer's Ŵ_k^l/Ŵ_v^l from ``to_k_ip``, ``router_dim`` from ``router.N.proj_z`` (heads from the
    metadata, default router_dim // 64). ``dtype`` None keeps the file's dtype (fp16 for the official
    IP-Adapter). Anything else raises :class:`CheckpointError` naming what the file is."""
    sd, meta, src = _read(path, _ADAPTER_ROLE, _ADAPTER_EXPECTED)
    return _build_adapter(sd, meta, src, device, dtype, owned=True)


def adapter_from_state_dict(sd: dict, meta: Optional[dict] = None, name: str = "<state dict>", *,
                            device="cpu", dtype: Optional[torch.dtype] = None) -> AnyStoryAdapter:
    """:func:`load_adapter` on an in-memory state dict (flat, or nested like the official IP-Adapter
    ``.bin``: ``{"image_proj": {...}, "ip_adapter": {...}}``). The tensors are copied, so the adapter
    never shares storage with ``sd``. ``name`` is used in error messages."""
    src = _Source(name)
    flat = _flatten(sd, src, _ADAPTER_ROLE, _ADAPTER_EXPECTED)
    return _build_adapter(flat, meta, src, device, dtype, owned=False)


def _prepare_for_save(sd: Mapping) -> dict:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().to("cpu").contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _atomic_save(tensors: dict, path, meta: dict, role: str) -> None:
    from safetensors.torch import save_file
    p = os.path.abspath(os.fspath(path))
    if os.path.splitext(p)[1].lower() not in SAFETENSORS_EXTENSIONS:
        raise _Source.of(p).fail(role, "a target name without the .safetensors extension", "a .safetensors path",
                                 "name the file *.safetensors")
    d = os.path.dirname(p)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = f"{p}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(adapter: AnyStoryAdapter, path, extra_meta: Optional[dict] = None) -> None:
    """Write ``adapter`` as a native AnyStory SDXL file (safetensors, written atomically).

    Keys are ``adapter.state_dict()``'s (subject_proj.*, ip_adapter.N.* = Ŵ_k^l/Ŵ_v^l, and when present
    routing_proj.* / router.N.*). Metadata (strings): format=anystory-sdxl, version, subject_tokens (m),
    router_dim, router_heads, layers, has_router, plus ``extra_meta``. An adapter loaded from an
    IP-Adapter file is written as native without router (``derived_from`` records its origin)."""
    src = _Source.of(path)
    tensors = _prepare_for_save(adapter.state_dict())
    meta = {str(k): str(v) for k, v in (extra_meta or {}).items()}
    meta.update({
        "format": FORMAT_ADAPTER,
        "version": str(FORMAT_VERSION),
        "subject_tokens": str(adapter.num_tokens),
        "router_dim": str(adapter.router_dim),
        "router_heads": str(adapter.router_heads),
        "layers": str(len(adapter.ip_adapter)),
        "has_router": "1" if adapter.has_router else "0",
    })
    if adapter.kind != KIND_NATIVE:
        meta.setdefault("derived_from", adapter.kind)
    _identify_adapter(tensors, meta, src)  # never write a file that load_adapter would refuse
    _atomic_save(tensors, path, meta, _ADAPTER_ROLE)


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


# ------------------------------------------------------------------------------------------------
# inspection for the UI
# ------------------------------------------------------------------------------------------------
def inspect_file(path) -> dict:
    """Describe a file cheaply (safetensors header / memory-mapped weights-only torch file), with the
    same recognition and refusals as :func:`load_adapter` / :func:`load_refnet`:

    ``{"kind": "anystory-sdxl" | "ip-adapter-plus-sdxl" | "anystory-sdxl-refnet", "layers": n,
    "subject_tokens": m (0 for a ReferenceNet), "has_router": bool, "file": basename}``, plus
    ``in_channels`` for a ReferenceNet."""
    sd, meta, src = _read(path, _ADAPTER_ROLE, _ADAPTER_EXPECTED, shapes_only=True)
    if sd and (meta.get("format") == FORMAT_REFNET or all(k.startswith(REFNET_PREFIX) for k in sd)):
        cin, n = _identify_refnet(sd, meta, src)
        return {"kind": FORMAT_REFNET, "layers": n, "subject_tokens": 0, "has_router": False,
                "file": src.name, "in_channels": cin}
    plan = _identify_adapter(sd, meta, src)
    return {"kind": plan.kind, "layers": len(plan.layer_dims), "subject_tokens": plan.subject_cfg["num_queries"],
            "has_router": plan.with_router, "file": src.name}
