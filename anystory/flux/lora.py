"""LoRA of the AnyStory FLUX streams: the ``ref_lora`` (reference stream) and ``router_lora`` (routing stream).

The authors load both as diffusers/peft adapters of ``FluxTransformer2DModel`` and switch them on with
``enable_lora`` only around the calls that compute the EXTRA token streams — never for the image or text streams.
Here a LoRA is kept as plain tensors and applied as a delta added to the output of the model's own (ComfyUI)
module call, so the model's weights are never changed and per-call weight casting (bf16, fp8) stays ComfyUI's.

peft semantics reproduced (diffusers 0.32.2 + peft 0.14.0, as the authors' code runs):
- delta(x) = (B·(A·x) + b_B) · scale, b_B the optional ``lora_B.bias`` (peft ``lora_bias``);
- scale = α / r with r the rank of the module; α = the most common ``<module>.alpha`` value of the file when it has
  alpha keys (diffusers turns differing alphas into an ``alpha_pattern`` that peft 0.14 does not match against
  FluxTransformer2DModel's module names, so every module gets the common α), else α = the rank of the FIRST
  ``lora_B`` key of the file (diffusers' ``get_peft_kwargs``) — for a file of one rank r that is scale 1.
DoRA (``lora_magnitude_vector``) is refused.

Enable sites (where the authors' ``enable_lora`` puts each adapter; diffusers module names):
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

__all__ = ["LoraWeight", "parse_peft_lora", "peft_alpha", "StreamLoRA", "REF_SITES", "ROUTER_SITES",
           "sites_of", "lora_targets"]

# x_embedder / context_embedder (top level); per double block; per single block
REF_SITES = {
    "top": ("x_embedder",),
    "double": ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2"),
    "single": ("norm.linear", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v", "proj_out"),
}
ROUTER_SITES = {
    "top": ("context_embedder",),
    "double": ("norm1_context.linear", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
               "ff_context.net.2"),
    "single": ("norm.linear", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v", "proj_out"),
}
__doc__ += "\n".join(f"- {k}: {v}" for k, v in (("ref_lora", REF_SITES), ("router_lora", ROUTER_SITES))) + "\n"


@dataclass
class LoraWeight:
    """One low-rank pair on a linear layer: ``delta(x) = (up·(down·x) + bias) · scale``.

    ``down`` is A (r × in), ``up`` is B (out × r), ``bias`` the optional bias of B."""

    down: torch.Tensor
    up: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: float = 1.0
    _cast: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def _weights(self, like: torch.Tensor, keep: bool = True):
        key = (like.dtype, like.device)
        w = self._cast.get(key)
        if w is None:
            w = tuple(None if t is None else t.to(device=like.device, dtype=like.dtype, non_blocking=True)
                      for t in (self.down, self.up, self.bias))
            if keep:
                self._cast[key] = w
        return w

    def delta(self, x: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """``keep``: keep the weights' copy for x's dtype/device until :meth:`release` (else it is dropped after
        this call: a stream used once per sampling run need not hold device memory)."""
        down, up, bias = self._weights(x, keep)
        out = F.linear(F.linear(x, down), up, bias)
        return out if self.scale == 1.0 else out * self.scale

    def add_to(self, x: torch.Tensor, out: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """``out + delta(x)``: two kernels (three with a bias); ``out`` may be a strided view of another module's
        output (read, not changed)."""
        down, up, bias = self._weights(x, keep)
        h = F.linear(x, down).flatten(0, -2)
        res = torch.addmm(out.reshape(h.shape[0], -1).to(h.dtype), h, up.t(), alpha=self.scale)
        if bias is not None:
            res.add_(bias, alpha=self.scale)
        return res.view(out.shape).to(out.dtype)

    def add_into(self, x: torch.Tensor, out: torch.Tensor, keep: bool = True) -> None:
        """``out += delta(x)`` in place (``out``: a view of the module's output; two or three kernels where it is a
        2-d view, as one image's rows are)."""
        down, up, bias = self._weights(x, keep)
        try:
            flat = out.view(-1, out.shape[-1])
        except RuntimeError:
            flat = None
        if flat is None or out.dtype != x.dtype:
            out += self.delta(x, keep).to(out.dtype)
            return
        flat.addmm_(F.linear(x, down).flatten(0, -2), up.t(), alpha=self.scale)
        if bias is not None:
            flat.add_(bias, alpha=self.scale)

    def release(self) -> None:
        """Drop the cast copies (device memory)."""
        self._cast.clear()


def peft_alpha(state_dict: Mapping[str, torch.Tensor]) -> Optional[float]:
    """The α diffusers 0.32 + peft 0.14 give every module of a peft LoRA file (see the module docstring)."""
    alphas = [float(v) for k, v in state_dict.items() if k.endswith(".alpha")]
    if alphas:
        return collections.Counter(alphas).most_common()[0][0]
    for k, v in state_dict.items():
        if ".lora_B." in k and k.endswith(".weight") and v.ndim == 2:
            return float(v.shape[1])
    return None


def parse_peft_lora(state_dict: Mapping[str, torch.Tensor], alpha: Optional[float] = None,
                    prefix: str = "transformer.") -> tuple[dict, list]:
    """A diffusers/peft LoRA state dict of FluxTransformer2DModel → ({module name: LoraWeight}, problems).

    Keys ``[transformer.]<module>.lora_A.weight``, ``.lora_B.weight``, optional ``.lora_B.bias`` and ``.alpha``;
    module names are returned without ``prefix`` (diffusers drops it the same way). ``alpha`` overrides the α read
    from the file (a converted file stores the α resolved from the original key order). ``problems`` lists what
    cannot be used (DoRA, unpaired keys, bad shapes) — the caller turns them into a CheckpointError."""
    problems = []
    if alpha is None:
        alpha = peft_alpha(state_dict)
    parts: dict = {}
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if "lora_magnitude_vector" in name:
            problems.append(f"{key} (DoRA)")
            continue
        for tag, slot in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "bias"),
                          (".alpha", "alpha")):
            if name.endswith(tag):
                parts.setdefault(name[: -len(tag)], {})[slot] = value
                break
        else:
            problems.append(f"{key} (not a LoRA key)")
    out = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            problems.append(f"{module} (lora_A/lora_B pair incomplete: has {sorted(p)})")
            continue
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            problems.append(f"{module} (lora_A {tuple(down.shape)} / lora_B {tuple(up.shape)} do not pair)")
            continue
        bias = p.get("bias")
        if bias is not None and tuple(bias.shape) != (up.shape[0],):
            problems.append(f"{module} (lora_B.bias {tuple(bias.shape)} for {up.shape[0]} outputs)")
            continue
        scale = (alpha if alpha is not None else down.shape[0]) / down.shape[0]
        out[module] = LoraWeight(down.float(), up.float(), None if bias is None else bias.float(), float(scale))
    return out, problems


def sites_of(sites: dict, depth: int, depth_single: int) -> list:
    """Every diffusers module name where an adapter with these enable ``sites`` is switched on."""
    names = list(sites["top"])
    names += [f"transformer_blocks.{i}.{s}" for i in range(depth) for s in sites["double"]]
    names += [f"single_transformer_blocks.{i}.{s}" for i in range(depth_single) for s in sites["single"]]
    return names


def lora_targets(loras: Mapping[str, LoraWeight], sites: dict, depth: int, depth_single: int,
                 key_map: Mapping[str, object]) -> tuple["StreamLoRA", list]:
    """Place the LoRAs of one adapter onto the model's modules.

    ``key_map`` maps ``"transformer.<diffusers module>"`` to the model's weight key, or to ``(weight key, (dim,
    offset, size))`` when the diffusers module is a slice of a fused weight (ComfyUI's
    ``comfy.lora.model_lora_keys_unet`` for a FLUX model gives exactly this). Only modules at the adapter's enable
    sites are placed; the others are returned as ``ignored`` (the authors' code never switches them on)."""
    enabled = set(sites_of(sites, depth, depth_single))
    placed = StreamLoRA()
    ignored = []
    for name, w in loras.items():
        if name not in enabled:
            ignored.append(name)
            continue
        target = key_map.get(f"transformer.{name}")
        if target is None:
            raise KeyError(f"no model weight for LoRA module {name!r}")
        if isinstance(target, tuple):
            key, (dim, offset, size) = target[0], target[1]
            if dim != 0 or size != w.out_features:
                raise ValueError(f"LoRA module {name!r}: {w.out_features} outputs for a slice of {size} on dim {dim}")
        else:
            key, offset = target, 0
        placed.add(_module_path(key), offset, w)
    return placed, sorted(ignored)


def _module_path(weight_key: str) -> str:
    key = weight_key[len("diffusion_model."):] if weight_key.startswith("diffusion_model.") else weight_key
    return key[: -len(".weight")] if key.endswith(".weight") else key


class StreamLoRA:
    """The LoRA deltas of one stream, by module path of the (ComfyUI) model, e.g. ``double_blocks.0.img_attn.qkv``;
    a fused module may carry several (offset in its output, LoraWeight)."""

    def __init__(self):
        self.by_module: dict = {}
        self.keep = True  # keep the LoRA weights' device copies between calls (see LoraWeight.delta)

    def add(self, path: str, offset: int, w: LoraWeight) -> None:
        self.by_module.setdefault(path, []).append((int(offset), w))

    def __contains__(self, path: str) -> bool:
        return path in self.by_module

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_module.values())

    def apply(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the module's own output for input ``x``) plus this stream's deltas at ``path``."""
        entries = self.by_module.get(path)
        if not entries:
            return out
        out = out.clone()
        for offset, w in entries:
            out[..., offset: offset + w.out_features] += w.delta(x, self.keep).to(out.dtype)
        return out

    def add_(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out += `` this stream's deltas at ``path``, in place (``out``: the module's own output for ``x``, or the
        rows of it that ``x`` gives)."""
        for offset, w in self.by_module.get(path, ()):
            w.add_into(x, out[..., offset: offset + w.out_features], self.keep)
        return out

    def release(self) -> None:
        for entries in self.by_module.values():
            for _, w in entries:
                w.release()


def call(module, path: str, x: torch.Tensor, lora: Optional[StreamLoRA]) -> torch.Tensor:
    """``module(x)`` (the model's own call: its weight casting, its patches) plus the stream's LoRA at ``path``."""
    out = module(x)
    return out if lora is None else lora.apply(path, x, out)
