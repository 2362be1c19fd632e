"""One device buffer for the recorded routing maps of every step after a run's first (see StepSlab)."""
from __future__ import annotations

from typing import Optional

import torch


class StepSlab:
    """Room on the device for the maps of every step after a run's first, allocated once.

    A map kept in a fresh allocation per layer and step would move the device addresses of everything
    the sampler allocates after it, step after step; the hook bodies' CUDA graphs then stop finding their
    inputs where they were captured and end on variants that copy their inputs before every replay.
    Instead, the first recorded step allocates per map (and fixes the layout: one offset per layer and
    part); before the first model call of a later step (:meth:`RoutingRecorder.reserve`), or else at its
    first record, one [steps, size] uint8 buffer is made for the rest of the run; a map is then a view of
    its row. A map the layout does not know (a layer first recorded later, another shape or device) or a
    step beyond the run's length gets its own allocation."""

    def __init__(self, steps: int):
        self.steps = max(int(steps), 0)
        self.first: Optional[int] = None
        self.layout: dict = {}   # (layer key, part) → (offset, shape)
        self.size = 0
        self.buf: Optional[torch.Tensor] = None
        self.device: Optional[torch.device] = None
        self.rows: dict = {}     # step → row of buf
        self._memo: dict = {}    # id(map) → (map, step, version, its copy): one copy per map and call

    def reserve(self, step: int) -> None:
        """Before each model call: a new call (maps passed again are copied again), and the buffer made
        before the first call of a step after the first (made at that step's first record instead, it
        would move the addresses of whatever the call allocates after it)."""
        self._memo.clear()
        if self.first is not None and step != self.first:
            self._allocate()

    def _allocate(self) -> None:
        if self.buf is None and self.size and self.steps:
            self.buf = torch.empty(self.steps, self.size, dtype=torch.uint8, device=self.device)

    def keep(self, step: int, key, part: int, t: torch.Tensor) -> torch.Tensor:
        """A uint8 copy of map ``t`` of (step, layer ``key``, ``part`` 0 index / 1 source) that stays valid
        after the caller overwrites ``t``. Within a call, a map passed for several layers (masks and the
        attention router decide once per grid) is copied once and shared, as before the buffer."""
        version = _version(t)
        hit = self._memo.get(id(t))
        if hit is not None and hit[0] is t and hit[1] == step and hit[2] == version:
            return hit[3]
        out = self._keep(step, key, part, t)
        self._memo[id(t)] = (t, step, version, out)
        return out

    def _keep(self, step: int, key, part: int, t: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = step
            self.device = t.device
        if step == self.first:
            if (key, part) not in self.layout:
                self.layout[(key, part)] = (self.size, tuple(t.shape))
                self.size += t.numel()
            return t.to(torch.uint8, copy=True)
        ent = self.layout.get((key, part))
        self._allocate()
        row = self.rows.get(step)
        if row is None and self.buf is not None and len(self.rows) < self.buf.shape[0]:
            row = self.rows[step] = len(self.rows)
        if ent is None or row is None or ent[1] != tuple(t.shape) or t.device != self.buf.device:
            return t.to(torch.uint8, copy=True)
        off, shape = ent
        view = self.buf[row, off:off + t.numel()].view(shape)
        view.copy_(t)
        return view


def _version(t: torch.Tensor) -> Optional[int]:
    """The in-place write counter of ``t``; None for an inference tensor (ComfyUI samples under
    ``torch.inference_mode()``, whose tensors keep none: a map is then known by its identity alone)."""
    try:
        return t._version
    except RuntimeError:
        return None
