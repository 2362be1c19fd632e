"""Refusals: what a file given to one of the loader's two slots really is, and which file to pick instead.

The two slots are the AnyStory model (the subject QFormer → E_i, the per-layer Ŵ_k^l / Ŵ_v^l of eq. 5,
optionally the routing QFormer → R_i and the routers that give M_i^l) and the ReferenceNet (→ G_i^l, the
hidden states entering self-attention of layer l, for the routed reference attention). People put every
kind of file there: SD1.5, FaceID, non-Plus or Flux IP-Adapters, whole checkpoints, LoRAs, the
ReferenceNet in the model slot and the reverse.

Every refusal is a :class:`CheckpointError` whose message is ONE sentence in the user's words — which file,
what it is, what to do ("AnyStory: cannot use 'x' as the AnyStory model: it is an SD1.5 IP-Adapter —
SD1.5 adapters do not fit SDXL: pick …") — followed only by the full path. The evidence (key names,
shapes, lists) is the exception's ``detail`` and goes to the ``anystory`` logger.

The foreign files are recognised by tables of :class:`Diagnosis` rows (what gives the file away → what
it is → the fix), walked in order by :func:`diagnose`:

- :data:`ADAPTER_FOREIGN`: the model slot, on key names / dtypes / metadata, before the architecture is read;
- :data:`IPADAPTER_FOREIGN`: the model slot, an IP-Adapter Plus once its widths are read (another base
  model's context, face embeddings, another image encoder);
- :data:`REFNET_FOREIGN`: the ReferenceNet slot.

Truncated or corrupted files are refused while reading (``io``); damaged adapters and ReferenceNets by
the structural checks of ``adapter`` / ``refnet``: all with the messages made here.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional

from ..adapter import KIND_NATIVE

log = logging.getLogger("anystory")

FORMAT_ADAPTER = KIND_NATIVE            # "anystory-sdxl"
FORMAT_REFNET = "anystory-sdxl-refnet"
FORMAT_VERSION = 1

SDXL_CONTEXT_DIM = 2048     # width of E_i and of SDXL's text context
CLIP_H_DIM = 1280           # CLIP ViT-H/14 hidden width (F_clip: 257×1280)
UNET_PREFIX = "model.diffusion_model."
REFNET_PREFIX = "refnet."
CONV_IN = "input_blocks.0.0.weight"

IP_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(.+)$")
CROSS_ATTN = re.compile(r"transformer_blocks\.\d+\.(attn2|norm2)\.")
UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
DIFFUSERS_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "time_embedding.")
ADAPTER_ROOTS = ("subject_proj.", "image_proj.", "ip_adapter.", "router.", "routing_proj.", "reference_proj.")


# ------------------------------------------------------------------------------------------------
# the error and its message
# ------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A file (or state dict) that cannot be used where it was given.

    The message is one sentence — the file's base name, what it is, what to do — then the full path once.
    Attributes: ``path`` (None for a state dict), ``found`` (what the file is, in the user's words),
    ``detail`` (the evidence: key names, shapes; also logged), ``expected`` (the accepted format)."""

    def __init__(self, message: str, path: Optional[str] = None, found: Optional[str] = None,
                 detail: str = "", expected: str = ""):
        super().__init__(message)
        self.path = path
        self.found = found
        self.detail = detail
        self.expected = expected


@dataclass(frozen=True)
class Slot:
    """Where a file was given: its role in the message, the usual fix, the accepted format (technical)."""

    role: str
    fix: str
    expected: str


ADAPTER_FILES = ("ip-adapter-plus_sdxl_vit-h.safetensors (models/ipadapter) or a native "
                 "anystory_sdxl.safetensors (models/anystory)")
ADAPTER = Slot(
    "the AnyStory model", f"pick {ADAPTER_FILES}",
    "a native AnyStory SDXL file (subject_proj.*, ip_adapter.N.to_k_ip/to_v_ip.weight, optionally "
    "routing_proj.*, router.N.* and reference_proj.N.to_k/to_v.weight) or IP-Adapter Plus SDXL ViT-H "
    "(image_proj.* Resampler with latents 1×m×1280 and proj_out 2048×1280, plus 70 "
    "ip_adapter.N.to_k_ip/to_v_ip.weight of shape C×2048, N = 1, 3, …, 139)")
REFNET = Slot(
    "the AnyStory ReferenceNet",
    "choose refnet_name none (the SDXL MODEL then serves as ReferenceNet) or anystory_sdxl_refnet.safetensors",
    "an AnyStory ReferenceNet file: refnet.* keys in ComfyUI/ldm UNet names, no transformer_blocks.*.attn2.* / "
    "norm2.* (no cross-attention), refnet.input_blocks.0.0.weight of shape 320×5×3×3 (4 latent channels + 1 "
    "mask channel), metadata format=anystory-sdxl-refnet")
UNET_SOURCE = Slot(
    "the source of a ReferenceNet", "use an SDXL-family checkpoint in single-file (ComfyUI) format",
    "an SDXL-family UNet state dict in ComfyUI/ldm names (input_blocks.0.0.weight …)")

REDOWNLOAD = "re-download or re-create the file"


@dataclass
class Source:
    """The file (or in-memory state dict) being read, for the messages."""

    name: str                   # base name, or "<state dict>"
    path: Optional[str] = None  # full path when read from disk

    @classmethod
    def of(cls, path) -> "Source":
        p = os.path.abspath(os.fspath(path))
        return cls(os.path.basename(p), p)

    def fail(self, slot: Slot, found: str, fix: Optional[str] = None, detail: str = "") -> CheckpointError:
        """The refusal: "AnyStory: cannot use '<name>' as <role>: it is <found> — <fix>. (file: <path>)"."""
        where = f" (file: {self.path})" if self.path else ""
        message = f"AnyStory: cannot use '{self.name}' as {slot.role}: it is {found} — {fix or slot.fix}.{where}"
        if detail:
            log.warning("AnyStory: '%s' refused as %s: %s", self.path or self.name, slot.role, detail)
        return CheckpointError(message, path=self.path, found=found, detail=detail, expected=slot.expected)

    def damaged(self, slot: Slot, what: str, detail: str, fix: str = REDOWNLOAD) -> CheckpointError:
        """A file of the right kind whose contents do not hold together (``what``: "an IP-Adapter file" …)."""
        return self.fail(slot, f"{what} that is damaged or incomplete", fix, detail)


def shape_of(t) -> tuple:
    return tuple(int(s) for s in t.shape)


def shape_str(t) -> str:
    return "×".join(str(s) for s in shape_of(t)) or "scalar"


def some_keys(keys, n: int = 4) -> str:
    keys = list(keys)
    s = ", ".join(f"'{k}'" for k in keys[:n])
    return s + (f" … ({len(keys)} in all)" if len(keys) > n else "")


def first_key(keys, pred) -> Optional[str]:
    for k in keys:
        if pred(k):
            return k
    return None


def str_meta(meta: Optional[Mapping]) -> dict:
    return {str(k): str(v) for k, v in (meta or {}).items()}


def meta_int(meta: Mapping, key: str, src: Source, slot: Slot) -> Optional[int]:
    """An integer metadata entry (None when absent); a refusal when it is not an integer."""
    if key not in meta or meta[key] in (None, ""):
        return None
    try:
        return int(str(meta[key]).strip())
    except ValueError:
        raise src.fail(slot, "a file with damaged metadata", REDOWNLOAD,
                       f"metadata {key}={meta[key]!r} is not an integer") from None


# ------------------------------------------------------------------------------------------------
# the tables
# ------------------------------------------------------------------------------------------------
class Facts:
    """What the rows look at: the state dict (real or meta tensors: only names, shapes and dtypes are read),
    its metadata, and in ``arch`` what was read of the architecture (for the later rows)."""

    def __init__(self, sd: Mapping, meta: Mapping, src: Source, slot: Slot):
        self.sd, self.meta, self.src, self.slot = sd, meta, src, slot
        self.keys = list(sd)
        self.fmt = meta.get("format", "")
        self.arch: dict = {}

    def first(self, pred) -> Optional[str]:
        return first_key(self.keys, pred)

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)

    def meta_int(self, key: str) -> Optional[int]:
        return meta_int(self.meta, key, self.src, self.slot)

    @cached_property
    def layers(self) -> dict:
        """{N: 2-D Ŵ_k^l / Ŵ_v^l tensors of ip_adapter.N}."""
        out: dict = {}
        for k, t in self.sd.items():
            m = IP_LAYER.match(k)
            if m and m.group(2) in ("to_k_ip.weight", "to_v_ip.weight") and t.ndim == 2:
                out.setdefault(int(m.group(1)), []).append(t)
        return out

    @cached_property
    def layer_widths(self) -> list:
        """The context widths the per-layer Ŵ_k / Ŵ_v take (SDXL: [2048])."""
        return sorted({int(t.shape[1]) for ts in self.layers.values() for t in ts})


@dataclass(frozen=True)
class Diagnosis:
    """One row: ``test(facts)`` gives a witness when the row applies (a key, or a dict of fields for the
    texts), else None/False; ``found`` says what the file is, ``fix`` what to do (None: the slot's usual
    fix), ``detail`` the evidence for the log. The texts are ``str.format`` templates over the witness."""

    test: Callable[[Facts], Any]
    found: str
    fix: Optional[str] = None
    detail: str = ""


def diagnose(rows, facts: Facts) -> None:
    """Walk ``rows`` in order; the first that applies is raised as a :class:`CheckpointError`."""
    for row in rows:
        hit = row.test(facts)
        if hit:
            w = hit if isinstance(hit, dict) else {"key": hit}
            raise facts.src.fail(facts.slot, row.found.format(**w), row.fix.format(**w) if row.fix else None,
                                 row.detail.format(**w))


def _refnet_keys(f: Facts):
    k = f.first(lambda k: k.startswith(REFNET_PREFIX))
    return {"key": k or "(none: the metadata says so)"} if k or f.fmt == FORMAT_REFNET else None


def _whole_checkpoint(f: Facts):
    k = f.first(lambda k: k.startswith(UNET_PREFIX))
    return k and {"key": k, "n": sum(1 for x in f.keys if x.startswith(UNET_PREFIX))}


def _bare_unet(f: Facts):
    k = f.first(lambda k: k.startswith(UNET_ROOTS[:3]) or k.startswith(DIFFUSERS_UNET_ROOTS))
    return k if k and not f.first(lambda k: k.startswith(("ip_adapter.", "image_proj.", "subject_proj."))) else None


def _is_flux(k: str) -> bool:
    return any(s in k for s in ("double_blocks.", "single_blocks.", "ip_adapter_double", "ip_adapter_single",
                                "ip_adapter_proj_model"))


def _is_faceid(k: str) -> bool:
    return ("faceid" in k.lower() or "perceiver_resampler" in k
            or k.startswith(("image_proj.proj.0.", "image_proj.proj.2."))
            or (k.startswith("ip_adapter.") and "_lora." in k))


def _is_lora(k: str) -> bool:
    return any(s in k for s in ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B."))


def _other_format(own: str):
    def test(f: Facts):
        return {"fmt": f.fmt} if f.fmt.startswith("anystory") and f.fmt != own else None
    return test


def _newer_version(f: Facts):
    v = f.meta_int("version")
    return {"v": v, "mine": FORMAT_VERSION} if v is not None and v > FORMAT_VERSION else None


def _non_float(f: Facts):
    k = f.first(lambda k: not f.sd[k].is_floating_point())
    return k and {"key": k, "dtype": f.sd[k].dtype}


def _non_plus(f: Facts):
    sd = f.sd
    if not (f.has("image_proj.") and "image_proj.latents" not in sd
            and ("image_proj.proj.weight" in sd or "image_proj.norm.weight" in sd)):
        return None
    ctx = int(sd["image_proj.norm.weight"].shape[0]) if "image_proj.norm.weight" in sd else None
    base = {768: "SD1.5", 2048: "SDXL"}.get(ctx, f"{ctx}-d context" if ctx else "unknown-model")
    p = sd.get("image_proj.proj.weight")
    return {"base": base, "proj": f", image_proj.proj {shape_str(p)}" if p is not None else ""}


def _context_width(width: int, only: bool = False):
    def test(f: Facts):
        widths = f.layer_widths
        if width not in widths or (only and len(widths) != 1):
            return None
        idx = sorted(f.layers)
        return {"n": len(idx), "lo": idx[0], "hi": idx[-1]}
    return test


ADAPTER_FOREIGN = (
    Diagnosis(lambda f: not f.sd, "an empty file (no weights)", f"{REDOWNLOAD}, or pick {ADAPTER_FILES}"),
    Diagnosis(_refnet_keys, "the AnyStory ReferenceNet file",
              "pick it in the ReferenceNet slot (refnet_name), and here the adapter file (anystory_sdxl.safetensors "
              "or ip-adapter-plus_sdxl_vit-h.safetensors)", "refnet.* keys, e.g. '{key}'"),
    Diagnosis(_whole_checkpoint, "a whole SD/SDXL checkpoint",
              f"load it with Load Checkpoint, and pick {ADAPTER_FILES} here",
              "{n} model.diffusion_model.* UNet tensors, e.g. '{key}'"),
    Diagnosis(_bare_unet, "a bare UNet (diffusion model)",
              f"load it with Load Diffusion Model, and pick {ADAPTER_FILES} here", "UNet key '{key}', no adapter keys"),
    Diagnosis(lambda f: f.first(_is_flux), "a Flux IP-Adapter or Flux model",
              f"Flux files do not fit SDXL: pick {ADAPTER_FILES}", "Flux key '{key}'"),
    Diagnosis(lambda f: f.first(_is_faceid),
              "an IP-Adapter FaceID file (it takes InsightFace face embeddings, which AnyStory does not use)", None,
              "FaceID key '{key}' (MLP projection of face embeddings, LoRA weights)"),
    Diagnosis(lambda f: f.first(_is_lora), "a LoRA", f"load it with a LoRA loader, and pick {ADAPTER_FILES} here",
              "LoRA key '{key}'"),
    Diagnosis(lambda f: f.first(lambda k: k.startswith(("vision_model.", "visual.")) or ".vision_model." in k),
              "a CLIP vision model",
              f"load it with Load CLIP Vision and connect it to AnyStory Subject Encode, and pick {ADAPTER_FILES} here",
              "CLIP vision key '{key}'"),
    Diagnosis(lambda f: f.first(lambda k: k.startswith(("encoder.down.", "decoder.up.", "first_stage_model."))),
              "a VAE", f"load it with Load VAE, and pick {ADAPTER_FILES} here", "VAE key '{key}'"),
    Diagnosis(lambda f: f.has("subject_proj.") and f.has("image_proj."),
              "a damaged file that mixes an AnyStory model and an IP-Adapter", f"{REDOWNLOAD}, or pick {ADAPTER_FILES}",
              "both subject_proj.* and image_proj.* keys"),
    Diagnosis(_other_format(FORMAT_ADAPTER), "another kind of AnyStory file", None, "metadata format={fmt}"),
    Diagnosis(lambda f: f.fmt == FORMAT_ADAPTER and not f.has("subject_proj."),
              "a damaged AnyStory model (it has no subject encoder)", REDOWNLOAD,
              "metadata format=anystory-sdxl but which has no subject_proj.* keys"),
    Diagnosis(lambda f: f.has("ip_adapter.") and not f.has("image_proj.") and not f.has("subject_proj."),
              "an incomplete IP-Adapter (per-layer weights without the image projection)",
              f"{REDOWNLOAD}, or pick {ADAPTER_FILES}",
              "ip_adapter.* weights but no image projection (neither image_proj.* nor subject_proj.*)"),
    Diagnosis(lambda f: not f.has("image_proj.") and not f.has("subject_proj.") and {"keys": some_keys(f.keys)},
              "not a known adapter file", None, "not a known adapter layout (keys such as {keys})"),
    Diagnosis(_newer_version, "a file of a newer format (version {v})", "update comfyui-anystory",
              "format version {v}; this pack reads version ≤ {mine}"),
    Diagnosis(_non_float, "a quantised file (integer weights)", f"pick the fp16/fp32 file: {ADAPTER_FILES}",
              "non-float tensor '{key}' ({dtype})"),
    Diagnosis(_non_plus, "a non-Plus {base} IP-Adapter (a few global image tokens, no Resampler)",
              f"AnyStory needs the Plus (Resampler) subject tokens: pick {ADAPTER_FILES}",
              "image_proj.proj/image_proj.norm tokens from the pooled CLIP embedding{proj}; no image_proj.latents"),
    Diagnosis(_context_width(768), "an SD1.5 IP-Adapter", f"SD1.5 adapters do not fit SDXL: pick {ADAPTER_FILES}",
              "ip_adapter.N.to_k_ip takes 768-d context tokens; {n} layers numbered {lo}..{hi}; SDXL has 70 "
              "numbered 1..139 with 2048-d context"),
    Diagnosis(_context_width(1024, only=True), "an IP-Adapter for SD2.x",
              f"SD2.x adapters do not fit SDXL: pick {ADAPTER_FILES}", "1024-d context tokens, {n} layers"),
)

_IMAGE_ENCODERS = {1024: "CLIP ViT-L, as Kolors' adapter", 1664: "CLIP ViT-bigG"}

IPADAPTER_FOREIGN = (  # arch: route_dim, layers, embedding_dim, dim (of the subject QFormer)
    Diagnosis(lambda f: f.arch["route_dim"] != SDXL_CONTEXT_DIM and f.arch,
              "an IP-Adapter for another base model (not SDXL)", None,
              "{route_dim}-d context (not SDXL's 2048); {layers} layers"),
    Diagnosis(lambda f: f.arch["embedding_dim"] == 512 and f.arch,
              "an InstantID-style adapter (it takes face embeddings, not CLIP ViT-H image features)", None,
              "image_proj.proj_in takes {embedding_dim}-d face embeddings"),
    Diagnosis(lambda f: (f.arch["dim"] == CLIP_H_DIM and f.arch["embedding_dim"] != CLIP_H_DIM
                         and dict(f.arch, encoder=_IMAGE_ENCODERS.get(f.arch["embedding_dim"], "another encoder"))),
              "an IP-Adapter Plus for another image encoder ({encoder}; AnyStory encodes subjects with CLIP ViT-H)",
              None, "image_proj.proj_in takes {embedding_dim}-d image features; CLIP ViT-H gives 1280"),
)


def _outside_refnet(f: Facts, kind: Callable[[str], bool]):
    """All keys outside refnet.* and one of them of ``kind``."""
    if not f.keys or f.first(lambda k: k.startswith(REFNET_PREFIX)):
        return None
    return f.first(kind)


def _unet_not_refnet(f: Facts):
    k = _outside_refnet(f, lambda k: k.startswith(UNET_PREFIX) or k.startswith(UNET_ROOTS))
    return k and (f.first(lambda k: bool(CROSS_ATTN.search(k))) or k)


def _refnet_cross_attention(f: Facts):
    cross = [k for k in f.keys if k.startswith(REFNET_PREFIX) and CROSS_ATTN.search(k)]
    return cross and {"key": cross[0], "n": len(cross)}


REFNET_FOREIGN = (
    Diagnosis(lambda f: not f.sd, "an empty file (no weights)", f"{REDOWNLOAD}, or " + REFNET.fix),
    Diagnosis(lambda f: _outside_refnet(f, lambda k: k.startswith(ADAPTER_ROOTS)),
              "an adapter file, not a ReferenceNet",
              "pick it as the AnyStory model (model_name), and here a native anystory_sdxl_refnet.safetensors or "
              "none (the SDXL MODEL connected to AnyStory Subject Encode then serves as ReferenceNet)",
              "adapter keys such as '{key}', no refnet.* keys"),
    Diagnosis(_unet_not_refnet, "a normal SD/SDXL UNet or checkpoint, not a ReferenceNet", None,
              "key '{key}', no refnet.* keys; it has cross-attention (attn2) and a 4-channel conv_in"),
    Diagnosis(lambda f: _outside_refnet(f, bool) and {"keys": some_keys(f.keys)}, "not a ReferenceNet", None,
              "keys such as {keys}, no refnet.* keys"),
    Diagnosis(lambda f: (f.first(lambda k: not k.startswith(REFNET_PREFIX))
                         and {"keys": some_keys(k for k in f.keys if not k.startswith(REFNET_PREFIX))}),
              "a ReferenceNet mixed with other weights", None, "keys outside refnet.* ({keys})"),
    Diagnosis(_other_format(FORMAT_REFNET), "another kind of AnyStory file", None, "metadata format={fmt}"),
    Diagnosis(_newer_version, "a file of a newer format (version {v})", "update comfyui-anystory",
              "format version {v}; this pack reads version ≤ {mine}"),
    Diagnosis(_refnet_cross_attention, "a UNet with cross-attention weights, not a ReferenceNet made for AnyStory",
              None, "{n} attn2/norm2 tensors, e.g. '{key}'"),
)
