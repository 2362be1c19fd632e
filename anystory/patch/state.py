"""What one AnyStory Apply fixes for every sampling run (:class:`RoutingInputs`) and what one model call
carries from layer to layer (:class:`CallState`) — the same for every model family."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..paper.reference import ReferenceFeatures

# What CFG's unconditional (negative-prompt) rows get. The paper trains with the CLIP image condition dropped
# in 10 % of the samples (its tokens replaced by those of the zero image) and never drops the reference
# features; the unconditional branch of CFG is the prediction without the conditions the guidance amplifies.
# - NEGATIVE_BACKGROUND (default): the unconditional rows get the background route E_{N+1} (the zero image's
#   tokens) everywhere in cross-attention and no reference attention: CFG then amplifies the subjects' tokens
#   AND their reference features (the strongest likeness; half the reference attention work);
# - NEGATIVE_REFERENCES: the unconditional rows are routed like the positive rows and attend to the same
#   references (eq. 6-8) — the condition the paper never drops — while their cross-attention still gets E_{N+1}
#   only (the dropped CLIP condition, as in training): CFG then amplifies the text and the subject tokens, not
#   the references (milder details, the training distribution on both branches; costs the reference attention
#   and, with the learned router, the routing of the unconditional rows).
NEGATIVE_BACKGROUND = "background only"
NEGATIVE_REFERENCES = "same references as positive"
NEGATIVE_ROWS = (NEGATIVE_BACKGROUND, NEGATIVE_REFERENCES)


@dataclass
class RoutingInputs:
    """What AnyStoryApply fixes for a sampling run.

    E: [K, m, 2048] subject tokens, K = N+1 (last = background route N+1).
    eta: [K] η per route (η × per-subject strength; the background route gets η).
    gamma: [N] γ per subject (reference strength; 0 = no reference).
    refs: G_i^l of the N subjects (None: no reference attention).
    negative_rows: what CFG's unconditional rows get (:data:`NEGATIVE_ROWS`, see there).
    """

    E: torch.Tensor
    eta: torch.Tensor
    gamma: torch.Tensor
    refs: Optional[ReferenceFeatures] = None
    negative_rows: str = NEGATIVE_BACKGROUND

    def __post_init__(self):
        if self.negative_rows not in NEGATIVE_ROWS:
            raise ValueError(f"negative_rows must be one of {NEGATIVE_ROWS}, got {self.negative_rows!r}")

    @property
    def references_on_negative(self) -> bool:
        """The unconditional rows are routed and attend to the references (:data:`NEGATIVE_REFERENCES`)."""
        return self.negative_rows == NEGATIVE_REFERENCES and self.refs is not None

    @property
    def num_routes(self) -> int:
        return self.E.shape[0]

    @property
    def num_subjects(self) -> int:
        return self.E.shape[0] - 1


@dataclass
class CallState:
    """Per model call (one sampler step, one cond/uncond batch). chunks: (row slice, is_cond) in batch
    order; step: sampler step index (of ``steps``); active: AnyStory acts in this call (start/end window, no cropped
    area)."""

    chunks: list
    active: bool = True
    step: int = 0
    steps: Optional[int] = None  # steps of the run when the sampler gives them
    uuids: Optional[list] = None  # conditioning uuid per chunk, when ComfyUI gives them
    last_index: Optional[torch.Tensor] = None  # [B, L] route index of the previous layer for eq. 6-8, all rows
    last_hw: Optional[tuple] = None
    index: dict = field(default_factory=dict)  # layer key → [B, L] route index of this call
    weight: dict = field(default_factory=dict)  # layer key → [B, L] per-token factor (feathered masks)
    layer_hw: dict = field(default_factory=dict)  # layer key → (h, w) token grid
    labels: Optional[list] = None  # per chunk: None or N lists of label token positions (attention router)
    cache: dict = field(default_factory=dict)  # per-call values shared by the layers of one grid

    @property
    def batch(self) -> int:
        return self.chunks[-1][0].stop if self.chunks else 0

    @property
    def any_cond(self) -> bool:
        return any(c for _, c in self.chunks)

    def cond_rows(self) -> Optional[slice]:
        """The cond rows as one slice when they are contiguous and uncond rows exist (those then get the
        plain attention); None: every row through the fused call."""
        hit = self.cache.get("cond_rows", False)
        if hit is False:
            cond = [sl for sl, c in self.chunks if c]
            hit = None
            if cond and len(cond) < len(self.chunks) and all(a.stop == b.start for a, b in zip(cond, cond[1:])):
                hit = slice(cond[0].start, cond[-1].stop)
            self.cache["cond_rows"] = hit
        return hit


def chunks_from_roles(roles: list, rows_per_chunk: int) -> list:
    """[True, False] + 2 rows per chunk → [(slice(0,2), True), (slice(2,4), False)]."""
    return [(slice(i * rows_per_chunk, (i + 1) * rows_per_chunk), bool(c)) for i, c in enumerate(roles)]
