"""The routing recorder: during sampling, the route index (argmax of M^l) of every cond row for every
layer l and step t, plus which source decided each token (learned router, user mask, attention router);
read afterwards by the routing preview (anystory.preview) and, step by step, by listeners such as the
editor's live preview. Layer keys are whatever the model family's patch records (SDXL: transformer
blocks); the recorder does not interpret them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .fast.slab import StepSlab
from .fast.transfer import move_together


@dataclass
class RunRecord:
    """The maps of one sampling run. steps: step → {layer key: (hw, index [B, L] uint8, source)}."""

    steps: dict = field(default_factory=dict)
    layer_order: list = field(default_factory=list)
    sigmas: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None  # the sampler's output latent, to match a LATENT later
    meta: dict = field(default_factory=dict)
    slab: Optional["StepSlab"] = None  # where the maps of the steps after the first are kept on the device

    @property
    def step_ids(self) -> list:
        return sorted(self.steps)

    @property
    def batch(self) -> int:
        for rec in self.steps.values():
            for _, idx, _ in rec.values():
                return idx.shape[0]
        return 0



def to_host(run: "RunRecord") -> None:
    """Move every recorded map of a run to the CPU in ONE device→host transfer. Layers of one grid often
    share one tensor (masks and the attention router decide per grid), so each tensor is moved once."""
    distinct: dict = {}
    for rec in run.steps.values():
        for hw, idx, src in rec.values():
            for t in (idx, src):
                if t.device.type != "cpu":
                    distinct.setdefault(id(t), t)
    if not distinct:
        return
    host = dict(zip(distinct, move_together(list(distinct.values()), "cpu")))
    for rec in run.steps.values():
        for key, (hw, idx, src) in rec.items():
            rec[key] = (hw, host.get(id(idx), idx), host.get(id(src), src))


class RoutingRecorder:
    """ANYSTORY_ROUTING: filled by the patch during sampling, read by AnyStoryRoutingPreview."""

    def __init__(self, num_subjects: int, labels: Optional[list] = None, keep_runs: int = 8, enabled: bool = True):
        self.num_subjects = num_subjects
        self.labels = list(labels or [f"subject {i + 1}" for i in range(num_subjects)])
        self.keep_runs = keep_runs
        self.enabled = enabled
        self.runs: list[RunRecord] = []
        self.idle: Optional[RunRecord] = None  # the last sampling in which AnyStory never acted (no maps)
        self._current: Optional[RunRecord] = None
        self.listeners: list = []  # callables(run, step) after each completed step (live preview)
        self.no_maps_reason: Optional[str] = None  # why a run records no maps by design (for the preview)

    def __deepcopy__(self, memo):  # shared by every clone of the patched MODEL
        return self

    def begin_run(self, sigmas=None, **meta) -> None:
        self._current = RunRecord(sigmas=None if sigmas is None else sigmas.detach().float().cpu(), meta=dict(meta))

    def record(self, step: int, key, hw, index: torch.Tensor, source: torch.Tensor) -> None:
        run = self._current
        if run is None or not self.enabled:
            return
        if step not in run.steps and run.steps and self.listeners:
            prev = max(run.steps)
            for cb in self.listeners:
                cb(self, run, prev)
        rec = run.steps.setdefault(step, {})
        if key not in run.layer_order:
            run.layer_order.append(key)
        if run.slab is None:
            steps = run.sigmas.numel() - 1 if run.sigmas is not None else 0
            run.slab = StepSlab(steps)
        rec[key] = (tuple(hw), run.slab.keep(step, key, 0, index), run.slab.keep(step, key, 1, source))

    def reserve(self, step: int) -> None:
        """Called before each model call: see :meth:`StepSlab.reserve`."""
        run = self._current
        if run is not None and self.enabled and run.slab is not None:
            run.slab.reserve(step)

    def end_run(self, output: Optional[torch.Tensor] = None, **meta) -> None:
        run = self._current
        self._current = None
        if run is None:
            return
        to_host(run)  # one transfer at the end of the run, none per step
        run.slab = None
        if output is not None:
            run.output = output.detach().float().cpu()
        run.meta.update(meta)
        if not run.steps and self.enabled:  # e.g. no step inside start/end percent: say so, don't mislead
            self.idle = run
        if run.steps:
            self.runs.append(run)
            del self.runs[:-self.keep_runs]
            if self.listeners:
                for cb in self.listeners:
                    cb(self, run, max(run.steps))

    def current(self) -> Optional[RunRecord]:
        return self._current

    def find_run(self, latent: Optional[torch.Tensor] = None) -> tuple[Optional[RunRecord], bool]:
        """The run whose output is ``latent`` (exact match first, then closest), else the latest.
        Returns (run, matched)."""
        if not self.runs:
            return None, False
        if latent is not None:
            lat = latent.detach().float().cpu()
            best, best_err = None, None
            for run in reversed(self.runs):
                if run.output is None or run.output.shape != lat.shape:
                    continue
                err = float((run.output - lat).abs().max())
                if best_err is None or err < best_err:
                    best, best_err = run, err
            if best is not None and best_err <= 1e-3 * (1.0 + float(lat.abs().max())):
                return best, True
        return self.runs[-1], False
