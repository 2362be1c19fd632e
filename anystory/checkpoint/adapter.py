"""The adapter file."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from ..adapter import KIND_IPADAPTER_PLUS, KIND_NATIVE, AnyStoryAdapter
from ..encoder import Resampler
from ..layers import sdxl_layout
from .diagnosis import (CLIP_H_DIM, FORMAT_ADAPTER, FORMAT_REFNET, FORMAT_VERSION, REFNET_PREFIX, SDXL_CONTEXT_DIM,
                        _ADAPTER_EXPECTED, _ADAPTER_FIX, _ADAPTER_ROLE, _first, _fmt_shape, _meta_int, _check_version,
                        _reject_foreign_adapter, _shape, _some, _Source)
from .io import _flatten, _prepare_for_save, _read, _atomic_save
from .refnet import _identify_refnet

_IP_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(.+)$")
_ROUTER_LAYER = re.compile(r"^router\.(\d+)\.")


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
