"""Routing-map preview: record M^l during sampling, render a grid like the paper's Fig. 4, and turn the
maps into per-subject segmentation masks ("reference-prompted segmentation").

The recorder keeps, per sampling run, the route index (argmax of M^l) of every cond row for every
layer l and step t, plus which source decided each token (learned router, user mask, attention
router). Subject order is the colour and index everywhere: subject i has ``PALETTE[i]``; the
background route is dark.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .reference import move_together

PALETTE_HEX = ["#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#42d4f4", "#f032e6"]
BACKGROUND_HEX = "#1c1c22"
MAX_SUBJECTS = len(PALETTE_HEX)


def hex_to_rgb(h: str) -> tuple[float, float, float]:
    h = h.lstrip("#")
    return tuple(int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def palette(num_subjects: int) -> torch.Tensor:
    """[N+1, 3] colours: subjects in order, background last."""
    cols = [hex_to_rgb(PALETTE_HEX[i % MAX_SUBJECTS]) for i in range(num_subjects)]
    return torch.tensor(cols + [hex_to_rgb(BACKGROUND_HEX)], dtype=torch.float32)


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


def _to_host(run: "RunRecord") -> None:
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
        _to_host(run)  # one transfer at the end of the run, none per step
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


def parse_selection(spec: str, available: list, what: str) -> list:
    """'all', 'last', '' or positions/ranges like '0,5,10-12,-1' (negative = from the end) → items."""
    import re

    spec = (spec or "").strip().lower()
    n = len(available)
    if n == 0:
        return []
    if spec in ("", "all"):
        return list(available)
    if spec == "last":
        return [available[-1]]

    def pos(tok: str) -> int:
        i = int(tok)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"{what} {i} does not exist: there are {n} ({what}s 0…{n - 1}, or -1 for the last)")
        return j

    out = []
    for part in re.split(r"[,;\s]+", spec):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if m is None:
            raise ValueError(f"cannot read the {what} selection {spec!r}: use 'all', 'last' or positions and "
                             f"ranges like '0,5,10-12,-1'")
        a = pos(m.group(1))
        b = pos(m.group(2)) if m.group(2) is not None else a
        out.extend(available[i] for i in range(a, b + 1))
    return out


def default_layers(layer_order: list, max_rows: int = 12) -> list:
    """One row per transformer stage (the first block of each SpatialTransformer), as Fig. 4."""
    firsts = [k for k in layer_order if k[2] == 0]
    if len(firsts) > max_rows:
        step = len(firsts) / max_rows
        firsts = [firsts[int(i * step)] for i in range(max_rows)]
    return firsts


def default_steps(step_ids: list, max_cols: int = 8) -> list:
    if len(step_ids) <= max_cols:
        return list(step_ids)
    return [step_ids[round(i * (len(step_ids) - 1) / (max_cols - 1))] for i in range(max_cols)]


def index_image(hw, index: torch.Tensor, source: Optional[torch.Tensor], colors: torch.Tensor,
                size: tuple, stripes: bool = True) -> torch.Tensor:
    """One map → [h, w, 3] image at ``size`` (nearest); tokens decided by a user mask are striped."""
    h, w = hw
    idx = index.long().view(h, w)
    img = colors[idx.clamp_max(colors.shape[0] - 1)]  # [h, w, 3]
    img = F.interpolate(img.permute(2, 0, 1)[None], size=size, mode="nearest")[0].permute(1, 2, 0)
    if stripes and source is not None and bool((source == 1).any()):
        src = F.interpolate(source.view(1, 1, h, w).float(), size=size, mode="nearest")[0, 0] == 1
        yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
        band = ((yy + xx) // 3) % 4 == 0
        img = torch.where((src & band)[..., None], img * 0.55, img)
    return img


def render_grid(run: RunRecord, layers: list, steps: list, num_subjects: int, image: int = 0,
                cell: int = 96, gap: int = 2) -> torch.Tensor:
    """Rows = layers (execution order), columns = steps → [H, W, 3] float image (gap lines dark)."""
    colors = palette(num_subjects)
    rows, cols = len(layers), len(steps)
    any_hw = next(iter(run.steps[steps[0]].values()))[0] if steps else (1, 1)
    aspect = any_hw[1] / max(1, any_hw[0])
    ch, cw = (cell, max(8, round(cell * aspect))) if aspect <= 1 else (max(8, round(cell / aspect)), cell)
    H, W = rows * ch + (rows + 1) * gap, cols * cw + (cols + 1) * gap
    out = torch.full((H, W, 3), 0.04)
    for r, key in enumerate(layers):
        for c, st in enumerate(steps):
            rec = run.steps.get(st, {}).get(key)
            y, x = gap + r * (ch + gap), gap + c * (cw + gap)
            if rec is None:
                out[y:y + ch, x:x + cw] = 0.25
                continue
            hw, idx, src = rec
            out[y:y + ch, x:x + cw] = index_image(hw, idx[image], src[image], colors, (ch, cw))
    return out


def subject_masks(run: RunRecord, layers: list, steps: list, num_subjects: int, size: tuple,
                  image: int = 0) -> torch.Tensor:
    """Per-subject soft masks [N, H, W]: the share of selected (layer, step) maps that route each pixel
    to subject i (maps resized bilinearly to ``size``)."""
    acc = torch.zeros(num_subjects + 1, *size)
    count = 0
    for st in steps:
        for key in layers:
            rec = run.steps.get(st, {}).get(key)
            if rec is None:
                continue
            hw, idx, _ = rec
            oh = F.one_hot(idx[image].long().clamp_max(num_subjects), num_subjects + 1).float()
            oh = oh.T.reshape(num_subjects + 1, 1, *hw)
            acc += F.interpolate(oh, size=size, mode="bilinear", align_corners=False)[:, 0]
            count += 1
    if count == 0:
        return torch.zeros(num_subjects, *size)
    return (acc / count)[:num_subjects].clamp(0, 1)
