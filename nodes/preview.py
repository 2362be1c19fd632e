"""AnyStoryRoutingPreview: the routing maps M^l of a sampling run as a labelled grid (rows = layers in
execution order, columns = steps, one colour per subject, background dark — like the paper's Fig. 4)
and as one MASK per subject (reference-prompted segmentation)."""
from __future__ import annotations

import logging
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..anystory.preview import (
    BACKGROUND_HEX,
    PALETTE_HEX,
    default_layers,
    default_steps,
    mask_decided,
    parse_selection,
    render_grid,
    subject_masks,
)
from ..anystory.recorder import RoutingRecorder
from .types import ANYSTORY_ROUTING, AnyStoryError
from .ui import preview_images

log = logging.getLogger("anystory")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _layer_name(key) -> str:
    if len(key) == 2:  # a transformer's blocks: ("double", 3) → dbl3, ("single", 12) → sgl12
        kind, idx = key
        return {"double": "dbl", "single": "sgl"}.get(kind, str(kind)[:3]) + str(idx)
    name, idx, j = key
    return f"{name[:3]}{idx}.{j}" if name != "middle" else f"mid.{j}"


def labelled_grid(grid: torch.Tensor, layers: list, steps: list, labels: list, cell_hw: tuple, gap: int,
                  note: str = "") -> torch.Tensor:
    """Add row names (layers), column names (steps) and a colour legend to the grid image."""
    g = (grid.clamp(0, 1).numpy() * 255).astype(np.uint8)
    left, top, fs = 70, 22, 12
    W = max(g.shape[1] + left, 420)
    note_lines = textwrap.wrap(note, max(40, (W - 8) // 7)) if note else []
    legend_h = 22 + 18 * ((len(labels) + 3) // 4) + 14 * max(0, len(note_lines) - 1)
    H = g.shape[0] + top + legend_h
    canvas = Image.new("RGB", (W, H), (12, 12, 16))
    canvas.paste(Image.fromarray(g), (left, top))
    d = ImageDraw.Draw(canvas)
    font = _font(fs)
    ch, cw = cell_hw
    for r, key in enumerate(layers):
        d.text((4, top + gap + r * (ch + gap) + ch // 2 - fs // 2), _layer_name(key), fill=(220, 220, 220), font=font)
    for c, st in enumerate(steps):
        d.text((left + gap + c * (cw + gap) + 2, 4), f"step {st}", fill=(220, 220, 220), font=font)
    y = top + g.shape[0] + 6
    items = [(lab, PALETTE_HEX[i % len(PALETTE_HEX)]) for i, lab in enumerate(labels)]
    items.append(("background", BACKGROUND_HEX))
    for i, (lab, col) in enumerate(items):
        x = 4 + (i % 4) * 150
        yy = y + (i // 4) * 18
        d.rectangle([x, yy, x + 12, yy + 12], fill=col, outline=(200, 200, 200))
        d.text((x + 17, yy), lab[:20], fill=(230, 230, 230), font=font)
    for i, line in enumerate(note_lines):
        d.text((4, H - 14 * (len(note_lines) - i)), line, fill=(170, 170, 170), font=font)
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)


def _same_latent(output, samples) -> bool:
    if output is None or samples is None or tuple(output.shape) != tuple(samples.shape):
        return False
    lat = samples.detach().float().cpu()
    return float((output - lat).abs().max()) <= 1e-3 * (1.0 + float(lat.abs().max()))


class AnyStoryRoutingPreview:
    CATEGORY = "AnyStory"
    FUNCTION = "preview"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("routing_grid", "subject_masks")
    OUTPUT_TOOLTIPS = ("Rows = layers (execution order), columns = steps; one colour per subject (legend), "
                       "background dark; striped (named in the legend when present) = decided by a region "
                       "mask.",
                       "One mask per subject, in subject order, at the image size: where the selected maps route "
                       "that subject (averaged over the selected layers and steps).")
    DESCRIPTION = "Shows where AnyStory's router put each subject during the sampling that made 'latent'."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "routing": (ANYSTORY_ROUTING, {"tooltip": "From AnyStoryApply."}),
                "latent": ("LATENT", {"tooltip": "The sampler's output: makes this node run after sampling and "
                                                 "selects that sampling's maps."}),
                "layers": ("STRING", {"default": "auto", "tooltip": "Layers to show, by position in execution "
                                                                    "order: 'auto' (first block of each stage), "
                                                                    "'all', or e.g. '0,10,20-25,-1'."}),
                "steps": ("STRING", {"default": "auto", "tooltip": "Steps to show: 'auto' (up to 8 spread over the "
                                                                   "run), 'all', 'last', or e.g. '0,5,-1'."}),
                "mask_steps": ("STRING", {"default": "last", "tooltip": "Steps averaged into the subject masks "
                                                                        "('last', 'all', or positions)."}),
            },
            "optional": {
                "image_index": ("INT", {"default": 0, "min": 0, "max": 4095, "tooltip": "Which image of the batch."}),
                "cell_size": ("INT", {"default": 96, "min": 16, "max": 512, "step": 8, "tooltip":
                                      "Size of one map in the grid, in pixels."}),
            },
        }

    def preview(self, routing, latent, layers="auto", steps="auto", mask_steps="last", image_index=0, cell_size=96):
        if not isinstance(routing, RoutingRecorder):
            raise AnyStoryError("the 'routing' input must come from AnyStoryApply")
        samples = latent["samples"] if isinstance(latent, dict) else latent
        run, matched = routing.find_run(samples)
        idle = getattr(routing, "idle", None)
        if not matched and idle is not None and _same_latent(idle.output, samples):
            return self._idle(routing, samples, cell_size)
        if run is None:
            reason = getattr(routing, "no_maps_reason", None)
            if reason:
                raise AnyStoryError(f"no routing maps to show: {reason}")
            raise AnyStoryError("no routing maps were recorded: sample with the MODEL that AnyStoryApply returned "
                                "(with record_routing on) before this node")
        if not matched:
            log.warning("AnyStory preview: this latent does not match a recorded sampling; showing the latest one")
        if image_index >= run.batch:
            raise AnyStoryError(f"image_index {image_index} does not exist: the sampling had {run.batch} image(s)")
        order = run.layer_order
        try:
            lay = default_layers(order) if layers.strip().lower() == "auto" else parse_selection(layers, order, "layer")
            st = (default_steps(run.step_ids) if steps.strip().lower() == "auto"
                  else parse_selection(steps, run.step_ids, "step"))
            mst = parse_selection(mask_steps, run.step_ids, "step")
        except ValueError as e:
            raise AnyStoryError(str(e)) from None
        if not lay or not st:
            raise AnyStoryError("nothing to show: the selection of layers or steps is empty")
        gap = 2
        grid = render_grid(run, lay, st, routing.num_subjects, image=image_index, cell=cell_size, gap=gap)
        rows = len(lay)
        ch = (grid.shape[0] - (rows + 1) * gap) // rows
        cw = (grid.shape[1] - (len(st) + 1) * gap) // len(st)
        warning = run.meta.get("warning")
        note = "; ".join([f"router: {getattr(routing, 'mode', '?')}"]
                         + (["striped = decided by a region mask"] if mask_decided(run, lay, st, image_index) else [])
                         + ([] if matched else ["(latest sampling)"]) + ([f"⚠ {warning}"] if warning else []))
        img = labelled_grid(grid, lay, st, routing.labels, (ch, cw), gap, note)[None]
        h, w = samples.shape[-2] * 8, samples.shape[-1] * 8
        masks = subject_masks(run, order, mst, routing.num_subjects, (h, w), image=image_index)
        ui = preview_images(img, prefix="anystory_routing")
        ui["warnings"] = [warning] if warning else []
        ui["anystory_routing_note"] = [note]  # the caption under the grid, as text
        return {"ui": ui, "result": (img, masks)}

    @staticmethod
    def _idle(routing, samples, cell_size):
        """The sampling ran but AnyStory acted in none of its steps: an all-background grid, empty masks."""
        log.warning("AnyStory preview: AnyStory did not act during this sampling (no step lay between start_percent "
                    "and end_percent): nothing was routed")
        bg = torch.tensor([int(BACKGROUND_HEX[i:i + 2], 16) / 255.0 for i in (1, 3, 5)])
        img = bg.expand(1, cell_size, cell_size, 3).clone()
        h, w = samples.shape[-2] * 8, samples.shape[-1] * 8
        masks = torch.zeros(routing.num_subjects, h, w)
        ui = preview_images(img, prefix="anystory_routing")
        ui["anystory_routing_note"] = ["AnyStory did not act during this sampling (start/end percent)"]
        return {"ui": ui, "result": (img, masks)}
