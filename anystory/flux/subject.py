"""One encoded subject for AnyStory FLUX (what the subject-encode node makes, what the patch consumes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["FluxSubject", "FluxReference"]


@dataclass
class FluxSubject:
    """redux_tokens: 1 × 81 × 4096 (the Redux subject tokens E_i, unscaled); router_tokens: 1 × 9 × 4096 (routing
    tokens) or None; ref_tokens: 1 × h·w × 64, the packed processed VAE latent of the masked subject, or None (no
    reference for this subject); ref_hw: (h, w) of that token grid; ref_mask: 1 × h·w × 1 (1 = subject token) or
    None; label: for messages/preview."""

    redux_tokens: torch.Tensor
    ref_tokens: Optional[torch.Tensor]
    ref_hw: tuple
    router_tokens: Optional[torch.Tensor] = None
    ref_mask: Optional[torch.Tensor] = None
    label: str = ""

    def __post_init__(self):
        h, w = self.ref_hw
        if self.ref_tokens is None:
            return
        if self.ref_tokens.ndim != 3 or self.ref_tokens.shape[1] != h * w:
            raise ValueError(f"ref_tokens {tuple(self.ref_tokens.shape)} is not 1 × {h}·{w} × 64")
        if self.ref_mask is not None and self.ref_mask.shape[1] != h * w:
            raise ValueError(f"ref_mask {tuple(self.ref_mask.shape)} does not cover {h}·{w} reference tokens")


@dataclass
class FluxReference:
    """The reference of one encoded subject: tokens 1 × h·w × 64 (packed, processed FLUX VAE latent of the masked
    subject), hw = (h, w), mask 1 × h·w × 1 (1 = subject token). ``source`` names the kind for the UI."""

    tokens: torch.Tensor
    hw: tuple
    mask: Optional[torch.Tensor] = None
    source: str = "flux"
