"""Routing-map preview: render the recorded M^l as a grid like the paper's Fig. 4, and turn the
maps into per-subject segmentation masks ("reference-prompted segmentation").

The maps come from anystory.recorder (route index and deciding source per layer and step). Subject
order is the colour and index everywhere: subject i has ``PALETTE[i]``; the background route is dark.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F

from .recorder import RunRecord
from .routing import SOURCE_MASK

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


def parse_selection(spec: str, available: list, what: str) -> list:
    """'all', 'last', '' or positions/ranges like '0,5,10-12,-1' (negative = from the end) → items."""

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
    """One row per transformer stage (the first block of each SpatialTransformer), as Fig. 4; for a
    transformer's blocks (2-part keys, FLUX) up to ``max_rows`` blocks spread over the depth."""
    firsts = [k for k in layer_order if len(k) < 3 or k[2] == 0]
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


def mask_decided(run: RunRecord, layers: list, steps: list, image: int = 0) -> bool:
    """Whether a user region mask decided any token of the selected (layer, step) maps of ``image`` (the
    grid's legend names the stripes only then)."""
    for st in steps:
        for key in layers:
            rec = run.steps.get(st, {}).get(key)
            if rec is not None and rec[2] is not None and bool((rec[2][image] == SOURCE_MASK).any()):
                return True
    return False


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
