"""Reading the authors' AnyStory FLUX file (``anystory_flux.bin``) and its safetensors conversion.

**The released file** is a torch pickle of tensors only — read ONLY with ``torch.load(path, weights_only=True,
map_location="cpu")`` — holding a dict of three state dicts:

- ``ref``: the reference LoRA (``ref_lora``), diffusers/peft keys of FluxTransformer2DModel
  (``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` [/ ``.lora_B.bias``, ``.alpha``]);
- ``redux``: the subject encoder's additions to FLUX.1-Redux (``redux_up_lora_{A,B}``, ``redux_down_lora_{A,B}``,
  ``gate_proj``; any ``redux_up``/``redux_down`` there replace the Redux weights);
- ``router``: ``router_embedder.*`` (the router embedder, same structure as ``redux``),
  ``transformer.{transformer_blocks,single_transformer_blocks}.<i>.attn.processor.to_{q,k}_routing_map_lora_{A,B}.*``
  (per-block routing-map LoRA, B with bias) and the router LoRA (``router_lora``, peft keys like ``ref``).

**The converted file** (``scripts/convert_anystory_flux.py``) is a ``.safetensors`` with the same tensors under
``ref.`` / ``redux.`` / ``router.`` and ``__metadata__`` ``format=anystory-flux``, ``version``, and the peft α of
each adapter as the authors' loader resolves it from the pickle's key order (``alpha.ref``, ``alpha.router``).

Every refusal is a :class:`CheckpointError` naming the file, what was found, what was expected and the fix.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from .lora import LoraWeight, parse_peft_lora, peft_alpha

log = logging.getLogger("anystory")

__all__ = ["CheckpointError", "AnyStoryFluxWeights", "FORMAT", "load_flux_checkpoint", "flux_weights_from_parts",
           "save_flux_safetensors", "read_flux_parts", "is_flux_parts"]

FORMAT = "anystory-flux"
FORMAT_VERSION = 1
EMBEDDER_KEYS = ("redux_up_lora_A.weight", "redux_up_lora_B.weight", "redux_down_lora_A.weight",
                 "redux_down_lora_B.weight", "gate_proj.weight", "gate_proj.bias")
EMBEDDER_OPTIONAL = ("redux_up_lora_B.bias", "redux_down_lora_B.bias", "redux_up.weight", "redux_up.bias",
                     "redux_down.weight", "redux_down.bias")
_ROUTING = re.compile(r"^(?:transformer\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.processor\."
                      r"to_([qk])_routing_map_lora_([AB])\.(weight|bias)$")
_EXPECTED = ("the AnyStory FLUX file: a torch pickle (anystory_flux.bin) of {'ref': peft LoRA of the FLUX "
             "transformer, 'redux': redux_up/redux_down LoRA + gate_proj, 'router': router_embedder.* + "
             "transformer.*.attn.processor.to_{q,k}_routing_map_lora_* + router LoRA}, or its .safetensors "
             "conversion (ref./redux./router. keys, metadata format=anystory-flux)")
_FIX = "pick anystory_flux.bin (junjiehe96/AnyStory) or its .safetensors conversion in models/anystory"
_SHORT = 60  # what was found goes into the message only when this short; always to the log


class CheckpointError(ValueError):
    """A file that cannot be used as the AnyStory FLUX model; ``path`` and ``found`` kept for the UI."""

    def __init__(self, message: str, path: Optional[str] = None, found: Optional[str] = None, detail: str = ""):
        super().__init__(message)
        self.path = path
        self.found = found
        self.detail = detail


def _fail(source: str, found: str, path: Optional[str] = None, expected: str = _EXPECTED, fix: str = _FIX):
    """The refusal: one sentence (the file, what it is when that is short, the fix); what was found and what is
    expected (key names, shapes) go to the log and to ``detail``."""
    name = os.path.basename(source)
    detail = f"found {found}; expected {expected}"
    log.warning("AnyStory FLUX: '%s' refused as the AnyStory FLUX model: %s", path or source, detail)
    what = found if len(found) <= _SHORT and "[" not in found else "another file (details in the console)"
    raise CheckpointError(f"AnyStory: cannot use '{name}' as the AnyStory FLUX model: it is {what} — {fix}.",
                          path=path, found=found, detail=detail)


@dataclass
class AnyStoryFluxWeights:
    """Everything of the AnyStory FLUX file, parsed.

    ref_lora / router_lora: {diffusers module name: LoraWeight}; redux / router_embedder: the encoder additions
    (state dict of AnyStoryReduxImageEncoder without the Redux base unless the file overrides it); routing:
    {("double"|"single", i): {"q": LoraWeight, "k": LoraWeight}} (the per-block routing-map LoRA);
    depth / depth_single: block counts the file was made for; alphas: the peft α of each adapter."""

    ref_lora: dict
    router_lora: dict
    redux: dict
    router_embedder: dict
    routing: dict
    depth: int
    depth_single: int
    alphas: dict = field(default_factory=dict)
    source: str = "<state dict>"

    def describe(self) -> str:
        return (f"AnyStory FLUX ({self.source}): ref LoRA on {len(self.ref_lora)} modules (rank "
                f"{_ranks(self.ref_lora)}), router LoRA on {len(self.router_lora)} (rank {_ranks(self.router_lora)}), "
                f"routing-map LoRA in {len(self.routing)} blocks ({self.depth} double + {self.depth_single} single)")


def _ranks(loras: Mapping[str, LoraWeight]) -> str:
    ranks = sorted({w.rank for w in loras.values()})
    return "/".join(map(str, ranks)) or "-"


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def load_flux_checkpoint(path: str) -> AnyStoryFluxWeights:
    """Read ``anystory_flux.bin`` (weights-only pickle) or its ``.safetensors`` conversion."""
    parts, alphas = read_flux_parts(path)
    return flux_weights_from_parts(parts, alphas=alphas, source=os.path.basename(path), path=path)


def read_flux_parts(path: str) -> tuple[dict, dict]:
    """({"ref": sd, "redux": sd, "router": sd}, {adapter: α}) from either file kind; refuses anything else."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        _fail(name, "no such file", path)
    ext = os.path.splitext(name)[1].lower()
    if ext in (".safetensors", ".sft"):
        return _read_safetensors(path)
    if ext in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            _fail(name, f"a file torch.load(weights_only=True) refuses ({type(e).__name__}: {str(e)[:200]})", path)
        if not is_flux_parts(obj):
            _fail(name, _describe(obj), path)
        alphas = {k: peft_alpha(obj[k]) for k in ("ref",)}
        alphas["router"] = peft_alpha(_router_lora_part(obj["router"]))
        return {k: dict(obj[k]) for k in ("ref", "redux", "router")}, alphas
    _fail(name, f"a '{ext or 'extension-less'}' file", path)


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if meta.get("format") != FORMAT:
                _fail(name, f"a safetensors file with metadata format={meta.get('format')!r} and keys like "
                            f"{keys[:4]}", path)
            parts = {"ref": {}, "redux": {}, "router": {}}
            for k in keys:
                head, _, rest = k.partition(".")
                if head not in parts or not rest:
                    _fail(name, f"key {k!r} outside ref./redux./router.", path)
                parts[head][rest] = f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for broken headers
        _fail(name, f"an unreadable safetensors file ({type(e).__name__}: {str(e)[:200]})", path)
    alphas = {}
    for k in ("ref", "router"):
        v = meta.get(f"alpha.{k}")
        alphas[k] = None if v in (None, "", "null") else float(v)
    return parts, alphas


def is_flux_parts(obj) -> bool:
    return (isinstance(obj, Mapping) and all(isinstance(obj.get(k), Mapping) for k in ("ref", "redux", "router"))
            and all(torch.is_tensor(v) for k in ("ref", "redux", "router") for v in obj[k].values()))


def _describe(obj) -> str:
    if not isinstance(obj, Mapping):
        return f"a pickled {type(obj).__name__}"
    keys = list(obj.keys())
    nested = {k: (list(v.keys())[:3] if isinstance(v, Mapping) else type(v).__name__) for k, v in list(obj.items())[:4]}
    if keys and all(torch.is_tensor(v) for v in obj.values()):
        return f"a flat state dict of {len(keys)} tensors, keys like {keys[:4]}"
    return f"a dict with top-level keys {keys[:8]} ({nested})"


def _router_lora_part(router: Mapping) -> dict:
    return {k: v for k, v in router.items() if not k.startswith("router_embedder.") and "attn.processor" not in k}


def flux_weights_from_parts(parts: Mapping, alphas: Optional[Mapping] = None, source: str = "<state dict>",
                            path: Optional[str] = None) -> AnyStoryFluxWeights:
    """Parse the three state dicts (see the module docstring); ``alphas`` overrides the peft α per adapter."""
    alphas = dict(alphas or {})
    problems = []
    ref_lora, p = parse_peft_lora(parts["ref"], alpha=alphas.get("ref"))
    problems += [f"ref: {x}" for x in p]
    router = parts["router"]
    router_lora, p = parse_peft_lora(_router_lora_part(router), alpha=alphas.get("router"))
    problems += [f"router: {x}" for x in p]
    redux = {k: v for k, v in parts["redux"].items()}
    router_embedder = {k[len("router_embedder."):]: v for k, v in router.items() if k.startswith("router_embedder.")}
    for label, sd in (("redux", redux), ("router_embedder", router_embedder)):
        missing = [k for k in EMBEDDER_KEYS if k not in sd]
        extra = [k for k in sd if k not in EMBEDDER_KEYS + EMBEDDER_OPTIONAL]
        if missing or extra:
            problems.append(f"{label}: missing {missing[:4]} unexpected {extra[:4]}")
    routing, p = _routing_lora({k: v for k, v in router.items() if "attn.processor" in k})
    problems += p
    if not ref_lora:
        problems.append("ref: no LoRA modules")
    if problems:
        _fail(source, "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""), path)
    depth = 1 + max([i for (kind, i) in routing if kind == "double"] + [-1])
    depth_single = 1 + max([i for (kind, i) in routing if kind == "single"] + [-1])
    for name in list(ref_lora) + list(router_lora):
        m = re.match(r"^(single_transformer_blocks|transformer_blocks)\.(\d+)\.", name)
        if m:
            n = int(m.group(2)) + 1
            if m.group(1) == "transformer_blocks":
                depth = max(depth, n)
            else:
                depth_single = max(depth_single, n)
    alphas.setdefault("ref", peft_alpha(parts["ref"]))
    alphas.setdefault("router", peft_alpha(_router_lora_part(router)))
    return AnyStoryFluxWeights(ref_lora, router_lora, redux, router_embedder, routing, depth, depth_single,
                               alphas, source)


def _routing_lora(sd: Mapping) -> tuple[dict, list]:
    parts, problems = {}, []
    for k, v in sd.items():
        m = _ROUTING.match(k)
        if not m:
            problems.append(f"router: {k} (not a routing-map LoRA key)")
            continue
        kind = "double" if m.group(1) == "transformer_blocks" else "single"
        parts.setdefault((kind, int(m.group(2)), m.group(3)), {})[(m.group(4), m.group(5))] = v
    out = {}
    for (kind, i, qk), p in sorted(parts.items()):
        a, b = p.get(("A", "weight")), p.get(("B", "weight"))
        if a is None or b is None or a.shape[0] != b.shape[1]:
            problems.append(f"router: {kind} block {i} to_{qk}_routing_map_lora incomplete or mismatched")
            continue
        bias = p.get(("B", "bias"))
        out.setdefault((kind, i), {})[qk] = LoraWeight(a.float(), b.float(), None if bias is None else bias.float())
    for key, d in out.items():
        if set(d) != {"q", "k"}:
            problems.append(f"router: {key[0]} block {key[1]} has routing-map LoRA for {sorted(d)} only")
    return out, problems


# ------------------------------------------------------------------------------------------------
# writing the conversion
# ------------------------------------------------------------------------------------------------
def save_flux_safetensors(parts: Mapping, path: str, alphas: Optional[Mapping] = None) -> dict:
    """Write the three state dicts as one ``.safetensors`` (``ref.``/``redux.``/``router.`` + metadata)."""
    from safetensors.torch import save_file
    if not is_flux_parts(parts):
        _fail("<state dict>", _describe(parts))
    flux_weights_from_parts(parts, alphas=alphas)  # refuse what would not load
    if alphas is None:
        alphas = {"ref": peft_alpha(parts["ref"]), "router": peft_alpha(_router_lora_part(parts["router"]))}
    tensors = {f"{head}.{k}": v.detach().contiguous() for head in ("ref", "redux", "router")
               for k, v in parts[head].items()}
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION)}
    for k in ("ref", "router"):
        meta[f"alpha.{k}"] = json.dumps(alphas.get(k))
    save_file(tensors, path, metadata=meta)
    return meta
