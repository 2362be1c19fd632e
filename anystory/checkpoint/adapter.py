"""The AnyStory model file ("router loading"): identify, build and save the adapter.

Two kinds are read, the architecture always from the weights' shapes (real or meta tensors):

- native AnyStory SDXL (``format=anystory-sdxl``): ``subject_proj.*`` (the subject QFormer: CLIP-H
  features of subject i → E_i, m × 2048), ``ip_adapter.{N}.to_k_ip/to_v_ip.weight`` (Ŵ_k^l, Ŵ_v^l of eq. 5,
  C × 2048, N = 1, 3, …, 139 for SDXL's 70 cross-attention layers), optionally ``routing_proj.*`` (one
  query → R_i), ``router.{N}.*`` (the router of layer l → the refined map M_i^l) and
  ``reference_proj.{N}.to_k/to_v.weight`` (W̃_k^l, W̃_v^l of eq. 6-8, C × C, for any subset of the layers;
  a layer without them projects G_i^l with the UNet's own attn1 weights);
- IP-Adapter Plus SDXL ViT-H (the public stand-in for the subject branch): ``image_proj.*`` (the same
  Resampler, m read from ``latents``) + the same ``ip_adapter.{N}.*``, as safetensors or as the official
  nested ``.bin``. The plus-face variant has the same shapes and loads the same way.

Anything else is refused by the tables of ``diagnosis`` (foreign files) or by the structural checks here
(a damaged file of the right kind). :func:`save_adapter` never writes a file :func:`load_adapter` would
refuse. :func:`inspect_file` describes any file given to the loader (a ReferenceNet included) cheaply.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from ..adapter import KIND_IPADAPTER_PLUS, KIND_NATIVE, ZERO_IMAGE_META, AnyStoryAdapter
from ..paper.encoder import ZERO_IMAGES
from ..layers import sdxl_layout
from ..paper.encoder import Resampler
from .diagnosis import (
    ADAPTER,
    ADAPTER_FILES,
    ADAPTER_FOREIGN,
    FORMAT_ADAPTER,
    FORMAT_REFNET,
    FORMAT_VERSION,
    IP_LAYER,
    IPADAPTER_FOREIGN,
    REDOWNLOAD,
    REFNET_PREFIX,
    Facts,
    Source,
    diagnose,
    meta_int,
    shape_of,
    shape_str,
    some_keys,
    str_meta,
)
from .io import flatten, prepare_for_save, read_weights, save_safetensors
from .refnet import identify_refnet

_ROUTER_LAYER = re.compile(r"^router\.(\d+)\.")
_REFERENCE_LAYER = re.compile(r"^reference_proj\.(\d+)\.(.+)$")
_RECREATE = f"{REDOWNLOAD}, or pick {ADAPTER_FILES}"


@dataclass
class AdapterPlan:
    """What a file holds: its kind, the prefix of its subject QFormer and the architecture read from it."""

    kind: str
    prefix: str                          # "subject_proj." or "image_proj." in the source
    subject_cfg: dict
    layer_dims: dict                     # {N: C}
    found: str = "an adapter file"       # for the messages: "a native AnyStory file" / "an IP-Adapter file"
    routing_cfg: Optional[dict] = None
    router_dim: int = 256
    router_heads: int = 4
    with_router: bool = False
    reference_layers: list = None        # layers N with W̃_k^l, W̃_v^l (reference_proj.N.*)

    def build_meta(self) -> AnyStoryAdapter:
        """The adapter on the meta device (no memory, no init): its state_dict's shapes are the truth."""
        with torch.device("meta"):
            sp = Resampler(**self.subject_cfg)
            rp = Resampler(**self.routing_cfg) if self.routing_cfg is not None else None
            return AnyStoryAdapter(sp, self.layer_dims, routing_proj=rp, router_dim=self.router_dim,
                                   router_heads=self.router_heads, with_router=self.with_router, kind=self.kind,
                                   reference_layers=self.reference_layers)


# ------------------------------------------------------------------------------------------------
# identifying an adapter state dict (real or meta tensors: only shapes and dtypes are read)
# ------------------------------------------------------------------------------------------------
def _resampler_cfg(sd: Mapping, prefix: str, what: str, src: Source, found: str) -> dict:
    """The Resampler config (``Resampler.config_from_state_dict``) of ``prefix``, after checking its parts."""
    def damaged(detail: str):
        return src.damaged(ADAPTER, found, f"{what}: {detail}", _RECREATE)

    lat = sd.get(prefix + "latents")
    if lat is None:
        raise damaged(f"no '{prefix}latents'")
    if lat.ndim != 3 or lat.shape[0] != 1:
        raise damaged(f"'{prefix}latents' has shape {shape_str(lat)} (not 3-D 1×m×dim)")
    for k in ("proj_in.weight", "proj_out.weight", "norm_out.weight"):
        t = sd.get(prefix + k)
        if t is None:
            raise damaged(f"'{prefix}{k}' is missing")
        if t.ndim != (2 if k != "norm_out.weight" else 1):
            raise damaged(f"'{prefix}{k}' has shape {shape_str(t)}")
    if f"{prefix}layers.0.0.to_q.weight" in sd and f"{prefix}layers.0.1.1.weight" not in sd:
        raise damaged(f"'{prefix}layers.0.1.1.weight' is missing")
    try:
        return Resampler.config_from_state_dict(sd, prefix)
    except (KeyError, IndexError, AttributeError) as e:
        raise damaged(f"incomplete (missing {e})") from None


def _layer_tensors(sd: Mapping) -> tuple[dict, dict, list]:
    """({N: Ŵ_k^l}, {N: Ŵ_v^l}, other ip_adapter.* keys)."""
    ks, vs, other = {}, {}, []
    for k, t in sd.items():
        m = IP_LAYER.match(k)
        if not m:
            continue
        n, rest = int(m.group(1)), m.group(2)
        if rest == "to_k_ip.weight":
            ks[n] = t
        elif rest == "to_v_ip.weight":
            vs[n] = t
        else:
            other.append(k)
    return ks, vs, other


def _numbering(idx: list) -> str:
    """What is wrong with the layer numbers ``idx`` (IP-Adapter numbers its layers 1, 3, 5, … without gaps)."""
    want = list(range(1, 2 * len(idx), 2))
    missing, extra = sorted(set(want) - set(idx)), sorted(set(idx) - set(want))
    what = ([f"missing {missing[:8]}"] if missing else []) + ([f"unexpected {extra[:8]}"] if extra else [])
    return (f"ip_adapter layers numbered {idx[:6]}{'…' if len(idx) > 6 else ''} ({', '.join(what)}; IP-Adapter "
            "numbers the cross-attention layers 1, 3, 5, … without gaps)")


def _read_layers(sd: Mapping, src: Source, found: str) -> tuple[dict, int]:
    """Ŵ_k^l / Ŵ_v^l per layer: ``{N: C}`` and the route width (2048 for SDXL)."""
    ks, vs, other = _layer_tensors(sd)
    if not ks and not vs:
        raise src.fail(ADAPTER, f"{found} without its per-layer weights", _RECREATE,
                       "no ip_adapter.N.to_k_ip.weight")
    bad = [(f"ip_adapter.{n}.{w}.weight", t) for w, d in (("to_k_ip", ks), ("to_v_ip", vs))
           for n, t in d.items() if t.ndim != 2]
    if bad:
        raise src.damaged(ADAPTER, found, f"'{bad[0][0]}' has shape {shape_str(bad[0][1])} (not 2-D C×2048)")
    if other:
        raise src.fail(ADAPTER, "an adapter variant AnyStory does not know", None,
                       f"unexpected per-layer keys ({some_keys(other)})")
    idx = sorted(set(ks) | set(vs))
    for n in idx:
        if n not in vs or n not in ks:
            has, lacks = ("to_k_ip", "to_v_ip") if n not in vs else ("to_v_ip", "to_k_ip")
            raise src.damaged(ADAPTER, found, f"'ip_adapter.{n}.{has}.weight' but no 'ip_adapter.{n}.{lacks}.weight'")
        if shape_of(ks[n]) != shape_of(vs[n]):
            raise src.damaged(ADAPTER, found, f"layer {n} has to_k_ip {shape_str(ks[n])} but to_v_ip "
                              f"{shape_str(vs[n])} (Ŵ_k^l and Ŵ_v^l must have the same shape)")
    widths = sorted({int(t.shape[1]) for t in list(ks.values()) + list(vs.values())})
    if len(widths) != 1:
        raise src.damaged(ADAPTER, found, f"per-layer weights take different context widths {widths}", _RECREATE)
    if idx != list(range(1, 2 * len(idx), 2)):
        raise src.damaged(ADAPTER, found, _numbering(idx), _RECREATE)
    return {n: int(ks[n].shape[0]) for n in idx}, widths[0]


def _plan_router(plan: AdapterPlan, sd: Mapping, meta: Mapping, src: Source) -> None:
    """A native file's routing QFormer (→ R_i) and routers (→ M_i^l): checked, and recorded in ``plan``."""
    keys = list(sd)
    has_rp = any(k.startswith("routing_proj.") for k in keys)
    router_idx = sorted({int(m.group(1)) for k in keys for m in [_ROUTER_LAYER.match(k)] if m})
    if router_idx and not has_rp:
        raise src.fail(ADAPTER, "an incomplete AnyStory model (its router has no routing encoder)", REDOWNLOAD,
                       "router.N.* weights without the routing QFormer (routing_proj.*) that computes R_i")
    if has_rp:
        plan.routing_cfg = _resampler_cfg(sd, "routing_proj.", "routing QFormer", src, plan.found)
        if plan.routing_cfg["num_queries"] != 1:
            raise src.damaged(ADAPTER, plan.found, f"the routing QFormer has {plan.routing_cfg['num_queries']} "
                              "queries (R_i is one token: routing_proj.latents must be 1×1×dim)")
    if not router_idx:
        for k, default in (("router_dim", 256), ("router_heads", 4)):
            v = meta_int(meta, k, src, ADAPTER)
            setattr(plan, k, v if v is not None and v > 0 else default)
        if plan.router_dim % plan.router_heads:
            plan.router_dim, plan.router_heads = 256, 4
        return
    if router_idx != sorted(plan.layer_dims):
        missing = sorted(set(plan.layer_dims) - set(router_idx))
        extra = sorted(set(router_idx) - set(plan.layer_dims))
        raise src.damaged(ADAPTER, plan.found, "router layers do not match the ip_adapter layers (router missing "
                          f"for {missing[:8]}, extra {extra[:8]})")
    n0 = router_idx[0]
    pz = sd.get(f"router.{n0}.proj_z.weight")
    if pz is None or pz.ndim != 2:
        raise src.damaged(ADAPTER, plan.found, f"router layer {n0} has no 2-D 'router.{n0}.proj_z.weight'")
    rdim = int(pz.shape[0])
    heads = meta_int(meta, "router_heads", src, ADAPTER)
    heads = heads if heads is not None else max(1, rdim // 64)
    if heads <= 0 or rdim % heads:
        raise src.fail(ADAPTER, "an AnyStory model whose metadata does not fit its router", REDOWNLOAD,
                       f"router_dim {rdim} and metadata router_heads={heads} (router_dim must be divisible by "
                       "the heads)")
    plan.router_dim, plan.router_heads, plan.with_router = rdim, heads, True


def _plan_reference_proj(plan: AdapterPlan, sd: Mapping, src: Source) -> None:
    """A native file's reference projections W̃_k^l, W̃_v^l (``reference_proj.N.to_k/to_v.weight``): per
    layer both or neither, C × C for a layer of width C, only for layers the file has; recorded in ``plan``."""
    found: dict = {}
    for k, t in sd.items():
        m = _REFERENCE_LAYER.match(k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = (k, t)
    if found and plan.kind != KIND_NATIVE:
        k = next(iter(next(iter(found.values())).values()))[0]
        raise src.fail(ADAPTER, "an adapter variant AnyStory does not know (an IP-Adapter with reference "
                       "projections)", None, f"reference_proj.* keys (e.g. '{k}') next to image_proj.*")
    for n, parts in sorted(found.items()):
        if n not in plan.layer_dims:
            raise src.damaged(ADAPTER, plan.found, f"reference projections for layer {n}, which has no "
                              f"ip_adapter.{n}.* weights (layers {sorted(plan.layer_dims)[:6]}…)", _RECREATE)
        c = plan.layer_dims[n]
        for name in ("to_k.weight", "to_v.weight"):
            if name not in parts:
                other = next(iter(parts))
                raise src.damaged(ADAPTER, plan.found, f"'reference_proj.{n}.{other}' but no "
                                  f"'reference_proj.{n}.{name}' (W̃_k^l and W̃_v^l come together)")
            key, t = parts[name]
            if shape_of(t) != (c, c):
                raise src.damaged(ADAPTER, plan.found, f"'{key}' has shape {shape_str(t)}, but layer {n} is {c} wide "
                                  f"(W̃_k^l, W̃_v^l are {c}×{c})", _RECREATE)
        extra = sorted(set(parts) - {"to_k.weight", "to_v.weight"})
        if extra:
            keys = some_keys(f"reference_proj.{n}.{e}" for e in extra)
            raise src.fail(ADAPTER, "an adapter variant AnyStory does not know", None,
                           f"unexpected reference projection keys ({keys})")
    plan.reference_layers = sorted(found)


def _check_meta(plan: AdapterPlan, meta: Mapping, src: Source) -> None:
    """A native file's metadata (subject_tokens, layers, router_dim) agrees with its weights; its zero image
    (``zero_image``, see :func:`~anystory.adapter.zero_image_of`) is one this pack knows."""
    zero = meta.get(ZERO_IMAGE_META)
    if zero is not None and zero not in ZERO_IMAGES:
        raise src.fail(ADAPTER, "an AnyStory model whose metadata names an unknown zero image",
                       f"set its metadata {ZERO_IMAGE_META} to one of {', '.join(ZERO_IMAGES)} (the convention its "
                       "background route was trained with), or re-create the file",
                       f"metadata {ZERO_IMAGE_META}={zero!r}")
    checks = [("subject_tokens", plan.subject_cfg["num_queries"]), ("layers", len(plan.layer_dims))]
    if plan.with_router:
        checks.append(("router_dim", plan.router_dim))
    checks.append(("reference_layers", len(plan.reference_layers or [])))
    for key, actual in checks:
        v = meta_int(meta, key, src, ADAPTER)
        if v is not None and plan.kind == KIND_NATIVE and v != actual:
            raise src.fail(ADAPTER, "an AnyStory model whose metadata does not match its weights (edited or damaged)",
                           REDOWNLOAD, f"metadata {key}={v} but the weights have {actual}")


def _check_sdxl_widths(layer_dims: dict, route_dim: int, src: Source) -> None:
    """70 layers must have SDXL's widths (other SDXL-family UNets are checked when the model is applied)."""
    if len(layer_dims) != 70:
        return
    sig = dict(sdxl_layout().signature())
    for n, c in layer_dims.items():
        if sig.get(n) != c:
            raise src.fail(ADAPTER, "an adapter made for another UNet than SDXL (its layer widths differ)", _RECREATE,
                           f"ip_adapter.{n}.to_k_ip is {c}×{route_dim}, but SDXL's cross-attention layer {n} has "
                           f"width {sig.get(n)} (SDXL: 640 for input 4-5 and output 3-5, 1280 elsewhere)")


def _check_keys(plan: AdapterPlan, sd: Mapping, src: Source) -> None:
    """Every key and shape exactly as the module built from ``plan`` has them."""
    prefix = plan.prefix
    expected = {k: shape_of(v) for k, v in plan.build_meta().state_dict().items()}
    actual = {(("subject_proj." + k[len(prefix):]) if k.startswith(prefix) else k): shape_of(v) for k, v in sd.items()}
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and actual[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    back = (lambda k: prefix + k[len("subject_proj."):] if k.startswith("subject_proj.") else k)
    parts = [f"missing {some_keys([back(k) for k in missing])}"] if missing else []
    parts += [f"unexpected {some_keys([back(k) for k in unexpected])}"] if unexpected else []
    if wrong:
        parts.append("wrong shapes " + ", ".join(
            f"'{back(k)}' {'×'.join(map(str, actual[k]))} (expected {'×'.join(map(str, expected[k]))})"
            for k in wrong[:4]))
    raise src.damaged(ADAPTER, plan.found, f"keys do not fit the architecture read from it ({'; '.join(parts)})",
                      _RECREATE)


def identify_adapter(sd: Mapping, meta: Optional[Mapping], src: Source) -> AdapterPlan:
    """What an adapter state dict is (native / IP-Adapter Plus) and its architecture, from shapes only;
    raises :class:`CheckpointError` for everything else."""
    meta = str_meta(meta)
    facts = Facts(sd, meta, src, ADAPTER)
    diagnose(ADAPTER_FOREIGN, facts)
    native = facts.has("subject_proj.")
    prefix = "subject_proj." if native else "image_proj."
    found = "a native AnyStory file" if native else "an IP-Adapter file"
    layer_dims, route_dim = _read_layers(sd, src, found)
    subject_cfg = _resampler_cfg(sd, prefix, "subject QFormer", src, found)
    if subject_cfg["output_dim"] != route_dim:
        raise src.damaged(ADAPTER, found, f"{prefix}proj_out gives {subject_cfg['output_dim']}-d tokens E_i but "
                          f"ip_adapter.N.to_k_ip take {route_dim}-d tokens")
    if not native:
        facts.arch.update(route_dim=route_dim, layers=len(layer_dims), dim=subject_cfg["dim"],
                          embedding_dim=subject_cfg["embedding_dim"])
        diagnose(IPADAPTER_FOREIGN, facts)
    plan = AdapterPlan(KIND_NATIVE if native else KIND_IPADAPTER_PLUS, prefix, subject_cfg, layer_dims, found)
    if native:
        _plan_router(plan, sd, meta, src)
    _plan_reference_proj(plan, sd, src)
    _check_meta(plan, meta, src)
    _check_sdxl_widths(layer_dims, route_dim, src)
    _check_keys(plan, sd, src)
    return plan


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------
def _pick_dtype(sd: Mapping, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    count: dict = {}
    for t in sd.values():
        count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    dt = max(count, key=count.get)
    return dt if dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float16


def _adapter_meta(meta: dict, plan: AdapterPlan, src: Source) -> dict:
    """The loaded adapter's ``meta``: the file's, with format = the kind read, file (and path), variant."""
    out = dict(meta)
    if meta.get("format") and meta.get("format") != plan.kind:
        out["file_format"] = meta["format"]
    out.update(format=plan.kind, file=src.name)
    if src.path:
        out["path"] = src.path
    if plan.kind == KIND_IPADAPTER_PLUS:
        out["variant"] = "plus-face" if "face" in src.name.lower() else "plus"
    return out


def _build_adapter(sd: Mapping, meta: Optional[Mapping], src: Source, device, dtype, owned: bool) -> AnyStoryAdapter:
    meta = str_meta(meta)
    plan = identify_adapter(sd, meta, src)
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
        raise src.damaged(ADAPTER, plan.found, f"does not load ({str(e).splitlines()[-1].strip()})") from None
    left = [n for n, t in list(adapter.named_parameters()) + list(adapter.named_buffers()) if t.is_meta]
    if left:
        raise src.damaged(ADAPTER, plan.found, f"without {some_keys(left)}", _RECREATE)
    adapter.kind = plan.kind
    adapter.meta = _adapter_meta(meta, plan, src)
    return adapter.eval()


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def load_adapter(path, device="cpu", dtype: Optional[torch.dtype] = None) -> AnyStoryAdapter:
    """Load the AnyStory model from a file: native AnyStory SDXL (``.safetensors``) or IP-Adapter Plus
    SDXL ViT-H (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with ``weights_only=True``).

    The architecture is read from the weights: m (tokens of E_i) from ``latents``, the width C of each
    layer's Ŵ_k^l/Ŵ_v^l from ``to_k_ip``, ``router_dim`` from ``router.N.proj_z`` (heads from the
    metadata, default router_dim // 64). ``dtype`` None keeps the file's dtype (fp16 for the official
    IP-Adapter). Anything else raises :class:`CheckpointError` saying what the file is."""
    sd, meta, src = read_weights(path, ADAPTER)
    return _build_adapter(sd, meta, src, device, dtype, owned=True)


def adapter_from_state_dict(sd: dict, meta: Optional[dict] = None, name: str = "<state dict>", *,
                            device="cpu", dtype: Optional[torch.dtype] = None) -> AnyStoryAdapter:
    """:func:`load_adapter` on an in-memory state dict (flat, or nested like the official IP-Adapter
    ``.bin``: ``{"image_proj": {...}, "ip_adapter": {...}}``). The tensors are copied, so the adapter
    never shares storage with ``sd``. ``name`` is used in error messages."""
    src = Source(name)
    return _build_adapter(flatten(sd, src, ADAPTER), meta, src, device, dtype, owned=False)


def save_adapter(adapter: AnyStoryAdapter, path, extra_meta: Optional[dict] = None) -> None:
    """Write ``adapter`` as a native AnyStory SDXL file (safetensors, written atomically).

    Keys are ``adapter.state_dict()``'s (subject_proj.*, ip_adapter.N.* = Ŵ_k^l/Ŵ_v^l, and when present
    routing_proj.* / router.N.* / reference_proj.N.* = W̃_k^l/W̃_v^l). Metadata (strings): format=anystory-sdxl,
    version, subject_tokens (m), router_dim, router_heads, layers, has_router, reference_layers (how many layers
    have W̃), zero_image (the background route's zero image it was trained with: ``extra_meta``'s, else
    ``adapter.zero_image``), plus ``extra_meta``. An adapter loaded from an IP-Adapter file is written as native
    without router (``derived_from`` records its origin)."""
    src = Source.of(path)
    tensors = prepare_for_save(adapter.state_dict())
    meta = {str(k): str(v) for k, v in (extra_meta or {}).items()}
    meta.update({
        "format": FORMAT_ADAPTER,
        "version": str(FORMAT_VERSION),
        "subject_tokens": str(adapter.num_tokens),
        "router_dim": str(adapter.router_dim),
        "router_heads": str(adapter.router_heads),
        "layers": str(len(adapter.ip_adapter)),
        "has_router": "1" if adapter.has_router else "0",
        "reference_layers": str(len(adapter.reference_layers)),
    })
    meta.setdefault(ZERO_IMAGE_META, adapter.zero_image)
    if adapter.kind != KIND_NATIVE:
        meta.setdefault("derived_from", adapter.kind)
    identify_adapter(tensors, meta, src)  # never write a file that load_adapter would refuse
    save_safetensors(tensors, path, meta, ADAPTER)


def inspect_file(path) -> dict:
    """Describe a file cheaply (safetensors header / memory-mapped weights-only torch file), with the
    same recognition and refusals as :func:`load_adapter` / :func:`~.refnet.load_refnet`:

    ``{"kind": "anystory-sdxl" | "ip-adapter-plus-sdxl" | "anystory-sdxl-refnet", "layers": n,
    "subject_tokens": m (0 for a ReferenceNet), "has_router": bool, "file": basename}``, plus
    ``reference_layers`` (layers with W̃) for an adapter and ``in_channels`` for a ReferenceNet."""
    sd, meta, src = read_weights(path, ADAPTER, shapes_only=True)
    if sd and (meta.get("format") == FORMAT_REFNET or all(k.startswith(REFNET_PREFIX) for k in sd)):
        cin, n = identify_refnet(sd, meta, src)
        return {"kind": FORMAT_REFNET, "layers": n, "subject_tokens": 0, "has_router": False,
                "file": src.name, "in_channels": cin}
    plan = identify_adapter(sd, meta, src)
    return {"kind": plan.kind, "layers": len(plan.layer_dims), "subject_tokens": plan.subject_cfg["num_queries"],
            "has_router": plan.with_router, "reference_layers": len(plan.reference_layers or []), "file": src.name}
