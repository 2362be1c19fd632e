"""Reference views for router training: the CLIP view of each instance i that is encoded into E_i
(frozen subject QFormer) and R_i (trainable routing QFormer).

An instance without a reference crop of its own gets a crop of the target image itself, augmented as in
the paper (random rotation, crop jitter, zero padding, plus a horizontal flip) so the router does not learn
to match pixels; then segmented and squared by :func:`~anystory.prepare.prepare_subject` like the encode node
does. Evaluation uses the same views without augmentation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..prepare import prepare_subject
from .data import TrainSample

CLIP_SIZE = 224


@dataclass
class AugmentConfig:
    """Augmentation of reference crops taken from the target (paper: rotation, crop, zero padding).

    rotation: max |angle| in degrees; crop_jitter: each side of the instance box moves by up to this
    fraction of the box size (in or out: a crop may cut a little of the instance); pad: up to this
    fraction of the 224² view becomes zero (black) padding — the view is shrunk and placed at random;
    p_flip: horizontal flip probability."""

    rotation: float = 20.0
    crop_jitter: float = 0.1
    pad: float = 0.25
    p_flip: float = 0.5


def _rand(gen, a: float = 0.0, b: float = 1.0) -> float:
    return a + (b - a) * float(torch.rand((), generator=gen))


def rotate(image: torch.Tensor, mask: torch.Tensor, degrees: float, center: tuple) -> tuple:
    """Rotate [H, W, C] image and [H, W] mask by ``degrees`` around ``center`` (y, x) in pixels; what comes
    in from outside is 0."""
    H, W = mask.shape
    th = math.radians(degrees)
    cy, cx = center
    # output pixel p → input pixel R⁻¹(p − c) + c, in normalised coordinates
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    dy, dx = ys - cy, xs - cx
    sx = math.cos(th) * dx - math.sin(th) * dy + cx
    sy = math.sin(th) * dx + math.cos(th) * dy + cy
    grid = torch.stack([sx / max(W - 1, 1) * 2 - 1, sy / max(H - 1, 1) * 2 - 1], -1)[None]
    x = torch.cat([image.float(), mask.float()[..., None]], -1).permute(2, 0, 1)[None]
    out = F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    out = out.permute(1, 2, 0)
    return out[..., :-1], out[..., -1]


def _box(mask: torch.Tensor) -> Optional[tuple]:
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def augment_reference(image: torch.Tensor, mask: torch.Tensor, gen: Optional[torch.Generator] = None,
                      cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """A reference view of one instance of ``image`` [H, W, 3] with mask [H, W]: rotation, crop jitter,
    segmentation + square crop (:func:`prepare_subject`, fill 0.5 as the encode node), flip and zero
    padding. Returns the CLIP view [224, 224, 3] in 0..1."""
    image, mask = image[..., :3].float(), mask.float()
    box = _box(mask)
    if box is None:
        return torch.zeros(CLIP_SIZE, CLIP_SIZE, 3)
    if cfg.rotation > 0:
        cy, cx = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        image, mask = rotate(image, mask, _rand(gen, -cfg.rotation, cfg.rotation), (cy, cx))
        mask = (mask > 0.5).float()
        box = _box(mask) or box
    if cfg.crop_jitter > 0:
        y0, x0, y1, x1 = box
        h, w = y1 - y0, x1 - x0
        j = cfg.crop_jitter
        y0 = round(y0 + _rand(gen, -j, j) * h)
        y1 = round(y1 + _rand(gen, -j, j) * h)
        x0 = round(x0 + _rand(gen, -j, j) * w)
        x1 = round(x1 + _rand(gen, -j, j) * w)
        keep = torch.zeros_like(mask)
        H, W = mask.shape
        ya, yb, xa, xb = max(0, y0), min(H, y1), max(0, x0), min(W, x1)
        if yb - ya >= 2 and xb - xa >= 2:
            keep[ya:yb, xa:xb] = 1
            cut = mask * keep
            if cut.sum() >= 0.5 * mask.sum():  # never lose most of the instance
                mask = cut
    view = prepare_subject(image[None], mask[None], clip_size=CLIP_SIZE, ref_size=8).clip_image[0]
    if cfg.p_flip > 0 and _rand(gen) < cfg.p_flip:
        view = view.flip(1)
    if cfg.pad > 0:
        s = 1.0 - _rand(gen, 0, cfg.pad)
        side = max(8, round(CLIP_SIZE * s))
        if side < CLIP_SIZE:
            small = F.interpolate(view.permute(2, 0, 1)[None], size=(side, side), mode="bilinear",
                                  align_corners=False, antialias=True)[0].permute(1, 2, 0)
            out = torch.zeros(CLIP_SIZE, CLIP_SIZE, 3)
            oy = int(_rand(gen, 0, CLIP_SIZE - side + 1 - 1e-6))
            ox = int(_rand(gen, 0, CLIP_SIZE - side + 1 - 1e-6))
            out[oy:oy + side, ox:ox + side] = small
            view = out
    return view.clamp(0, 1)


def reference_views(sample: TrainSample, gen: Optional[torch.Generator] = None, augment: bool = True,
                    cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """The CLIP views [N, 224, 224, 3] of a sample's instances: the given reference crop (segmented by its
    alpha when it has one), else a crop of the target — augmented when ``augment`` (training), plain
    (as the encode node prepares a subject) otherwise (evaluation)."""
    views = []
    none = AugmentConfig(rotation=0, crop_jitter=0, pad=0, p_flip=0)
    for i in range(sample.num_instances):
        ref = sample.refs[i] if i < len(sample.refs) else None
        if ref is not None:
            views.append(prepare_subject(ref[None], None, clip_size=CLIP_SIZE, ref_size=8).clip_image[0])
        else:
            views.append(augment_reference(sample.image, sample.masks[i], gen, cfg if augment else none))
    if not views:
        return torch.zeros(0, CLIP_SIZE, CLIP_SIZE, 3)
    return torch.stack(views)
