"""The AnyStory FLUX weights as one module, so that ComfyUI's model management loads and offloads them with the
MODEL they patch (``nodes/flux``) and counts their memory: the LoRA tensors needed at every step (router LoRA,
routing-map LoRA) become parameters of this module, and the :class:`anystory.flux.lora.LoraWeight` objects hold
those same parameter objects (``Module.to`` moves a parameter's data in place, so they always see where it is).

The reference LoRA runs once per sampling run (the reference pass, when the reference cache is on): it stays in
host memory (page-locked where CUDA is present) and each module's weights go to the device just for their call
(:meth:`host_reference`). The subject encoders' additions (``redux`` / ``router_embedder``) stay host tensors:
they run once per subject.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import AnyStoryFluxWeights

__all__ = ["FluxAdapter"]


class FluxAdapter(nn.Module):
    family = "FLUX"

    def __init__(self, weights: AnyStoryFluxWeights):
        super().__init__()
        self.weights = weights
        self.lora = nn.ParameterList()
        for w in weights.router_lora.values():
            self._own(w)
        for pair in weights.routing.values():
            for w in pair.values():
                self._own(w)

    def _own(self, w) -> None:
        for attr in ("down", "up", "bias"):
            t = getattr(w, attr)
            if t is None:
                continue
            p = t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)
            self.lora.append(p)
            setattr(w, attr, p)
        w.release()

    def host_reference(self, dtype) -> None:
        """The reference LoRA in ``dtype`` on the host, page-locked when CUDA is there (its copies to the device
        then do not wait for the device)."""
        pin = torch.cuda.is_available()
        for w in self.weights.ref_lora.values():
            for attr in ("down", "up", "bias"):
                t = getattr(w, attr)
                if t is not None:
                    t = t.detach().to("cpu", dtype)
                    setattr(w, attr, t.pin_memory() if pin else t)
            w.release()

    def reference_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.weights.ref_lora.values()
                   for t in (w.down, w.up, w.bias) if t is not None)

    def release(self) -> None:
        """Drop the LoRA weights' cast copies (kept per dtype and device during a run)."""
        for group in (self.weights.ref_lora, self.weights.router_lora):
            for w in group.values():
                w.release()
        for pair in self.weights.routing.values():
            for w in pair.values():
                w.release()

    @property
    def slots(self) -> dict:
        w = self.weights
        rank = lambda d: "/".join(map(str, sorted({x.rank for x in d.values()}))) or "-"  # noqa: E731
        return {
            "family": f"FLUX.1 ({w.depth} double + {w.depth_single} single blocks)",
            "subject encoder": "FLUX.1 Redux (STYLE_MODEL) + AnyStory LoRA and gate: 81 tokens per subject",
            "router": f"native AnyStory (9 routing tokens per subject, routing-map LoRA in {len(w.routing)} blocks, "
                      f"router LoRA on {len(w.router_lora)} modules, rank {rank(w.router_lora)})",
            "reference": f"the FLUX MODEL's own blocks at t = 0 with the reference LoRA on {len(w.ref_lora)} modules "
                         f"(rank {rank(w.ref_lora)})",
        }

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"{len(self.lora)} LoRA tensors, {self.nbytes() / 2 ** 20:.1f} MiB; reference LoRA on the host "
                f"{self.reference_nbytes() / 2 ** 20:.1f} MiB")
