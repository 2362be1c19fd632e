"""Subject preparation ("segment, crop, pad"): the step before both encoding branches (§1.1).

AnyStory encodes a *segmented* subject: the background is replaced by a neutral fill, a square is cut
around the subject, and it is resized twice — the CLIP branch sees the 224² segmented image, the
ReferenceNet branch the 512² one together with its subject mask. This module does exactly that, in pure
torch, on ComfyUI-shaped tensors:

- IMAGE: float ``[B, H, W, C]`` in 0..1, C = 3 (RGB) or 4 (RGBA, alpha = 1 on the subject); C = 1 is
  accepted as gray.
- MASK: float ``[B, H, W]`` or ``[H, W]`` in 0..1.

**Our subject-mask convention: white (1) = subject**, black (0) = background — the same as
IPAdapter's ``attn_mask``. This is NOT what ComfyUI's LoadImage gives: its MASK output is
``1 − alpha`` (1 on the *transparent background* of a cut-out) and, for an image without alpha, a
64×64 all-zero mask whatever the image's size. Wire LoadImage's MASK through InvertMask (the shipped
workflows do). To stay usable when that is forgotten:

- a mask of another size than the image is resized to the image (bilinear, soft values kept);
- an all-zero mask means "no mask": the whole image is used, with a warning that says how to fix it;
- a mask that is white along (nearly) the whole image border (the signature of an un-inverted cut-out
  mask), an all-white mask (a photo through LoadImage → InvertMask), a mask covering more than 90 % of
  the image, and no mask at all on an image without alpha are used as given, each with a warning that
  names the fix (an alpha PNG, a mask, or a background-removal node).

Failures this avoids (two of the most reported with other packs): the square is never shrunk or shifted
to fit the image, so the subject is never cropped away — where it runs past the border the crop is
*padded* with the fill colour (not black bars), and the mask is padded with 0 so it stays aligned.

The margin (1.04 × the subject's box, the authors' demo) is for a subject cut out of a larger image. When
the subject's box is the whole image (no mask, a full mask, a subject touching all four edges) there is
nothing around it to keep: the image is used as it is — a square image goes to the encoders exactly as
IP-Adapter feeds CLIP (the whole image resized, no grey border) — and a non-square one is padded to a
square (never cropped: IP-Adapter's centre crop would cut the subject).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Fill = Union[float, Sequence[float], torch.Tensor]

EMPTY_MASK_EPS = 1e-3  # a mask whose max is below this is "no mask"


@dataclass
class PreparedSubject:
    """The two views of a segmented subject, float32 on the input's device.

    clip_image: [B, clip_size, clip_size, 3]  segmented square crop for the CLIP branch (224²).
    ref_image:  [B, ref_size, ref_size, 3]    segmented square crop for the ReferenceNet branch (512²).
    ref_mask:   [B, ref_size, ref_size]       subject mask aligned with ref_image (0 in the padding).
    clip_mask:  [B, clip_size, clip_size]     subject mask aligned with clip_image.
    boxes:      [B, 4] int64                  the square crops (y0, x0, y1, x1) in source pixels, end
                                              exclusive; they may extend past the image (padding).
    warnings:   list[str]                     things the user should see (empty / suspicious masks).
    """
    clip_image: torch.Tensor
    ref_image: torch.Tensor
    ref_mask: torch.Tensor
    clip_mask: torch.Tensor
    boxes: torch.Tensor
    warnings: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- inputs

def _as_image(image: torch.Tensor) -> torch.Tensor:
    """[H,W,C] or [B,H,W,C] → float32 [B,H,W,C] with C in (1, 3, 4)."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be [B, H, W, C] with C = 1, 3 or 4, got shape {tuple(image.shape)}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    return image.float()


def _as_mask(mask: torch.Tensor) -> torch.Tensor:
    """[H,W] or [B,H,W] → float32 [B,H,W]."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise ValueError(f"mask must be [B, H, W] or [H, W], got shape {tuple(mask.shape)}")
    if mask.shape[1] < 1 or mask.shape[2] < 1:
        raise ValueError(f"mask is empty: shape {tuple(mask.shape)}")
    return mask.float()


def _batch_size(image_b: int, mask_b: int) -> int:
    """Broadcast batch sizes: equal, or one of them 1."""
    if image_b == mask_b or mask_b == 1:
        return image_b
    if image_b == 1:
        return mask_b
    raise ValueError(f"image batch ({image_b}) and mask batch ({mask_b}) do not match: "
                     f"give one mask per image, or a single mask / a single image")


def _resize(x: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """[N,C,h,w] → [N,C,*size]; antialiased (matters when shrinking), no-op when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _indices(flags: Sequence[bool]) -> str:
    return ", ".join(str(i) for i, f in enumerate(flags) if f)


BACKGROUND_REMOVAL = ("a background-removal node (BiRefNet / RMBG of ComfyUI-RMBG, Image Rembg of was-node-suite or "
                      "comfyui-rembg, Segment Anything)")
MASK_FIX = ("Fix: load a PNG with a transparent background in LoadImage and connect its MASK through InvertMask, "
            "connect a mask that is white on the subject, or cut the subject out with " + BACKGROUND_REMOVAL + ".")
FULL_MASK = 1.0 - EMPTY_MASK_EPS  # a mask whose min is above this selects the whole image
COVER_MAX = 0.9  # a subject mask covering more than this share of the image keeps (most of) the background
BORDER_INVERTED = 0.9  # share of border pixels selected above which a mask is probably inverted


def resolve_mask(image: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[str]]:
    """The subject mask (white = subject) for ``image``, as float32 [B, H, W] in 0..1, and warnings.

    Precedence: explicit ``mask`` > the image's alpha channel (C == 4) > none (whole image).
    - ``mask`` may have another size than the image: it is resized to H×W (bilinear, soft values kept).
    - Batches broadcast: a single mask serves every image, a single image every mask; the result has
      the larger batch size. Other mismatches raise ValueError.
    - An all-zero mask (max < 1e-3) means "no mask": that sample uses the whole image and a warning
      says so. ComfyUI's LoadImage gives exactly that (64×64 zeros) for an image without alpha, and
      ``1 − alpha`` (white = background) for a cut-out: its MASK needs InvertMask before it comes here.
    - Every way of encoding the background as part of the subject is used as given, with a warning that
      says how to fix it: no mask and no alpha, an all-white mask or fully opaque alpha (a photo through
      LoadImage → InvertMask), a mask covering more than 90 % of the image, and a mask white along
      (nearly) the whole border, the signature of an inverted mask (subject dark).
    """
    image = _as_image(image)
    b_img, h, w, c = image.shape
    if mask is not None:
        mask = _as_mask(mask).to(image.device)
        source = "mask"
    elif c == 4:
        mask = image[..., 3]
        source = "alpha"
    else:
        return torch.ones(b_img, h, w, dtype=torch.float32, device=image.device), [
            "AnyStory: no subject mask and no alpha channel: the whole image, background included, is encoded as "
            "the subject. " + MASK_FIX]

    b = _batch_size(b_img, mask.shape[0])
    mask = _resize(mask.unsqueeze(1), (h, w), "bilinear").squeeze(1).clamp(0.0, 1.0)
    mask = mask.expand(b, h, w).contiguous()

    warnings: List[str] = []
    n = f" of {b}" if b > 1 else ""

    def which(flags: torch.Tensor) -> str:
        return f" (image {_indices(flags.tolist())}{n})" if b > 1 else ""

    flat = mask.flatten(1)
    empty = flat.amax(dim=1) < EMPTY_MASK_EPS
    full = flat.amin(dim=1) > FULL_MASK
    cover = (flat > 0.5).float().mean(dim=1)
    border = torch.cat([mask[:, 0, :], mask[:, -1, :], mask[:, :, 0], mask[:, :, -1]], dim=1)
    inverted = ((border > 0.5).float().mean(dim=1) >= BORDER_INVERTED) & ~full & ~empty
    wide = (cover > COVER_MAX) & ~full & ~empty & ~inverted
    what = "subject mask" if source == "mask" else "image's alpha channel"
    if bool(empty.any()):
        if source == "mask":
            warnings.append(
                f"AnyStory: the subject mask is empty (all black){which(empty)}: using the whole image, background "
                f"not removed. White must mark the subject: if you used LoadImage's MASK, add InvertMask "
                f"(LoadImage's mask is white on the transparent background, and all black for images "
                f"without alpha), or draw/segment a subject mask.")
        else:
            warnings.append(
                f"AnyStory: the image's alpha channel is fully transparent{which(empty)}: using the whole image, "
                f"background not removed. " + MASK_FIX)
        mask[empty] = 1.0
    if bool(full.any()):
        how = (" (a photo without transparency through LoadImage → InvertMask gives exactly that)"
               if source == "mask" else "")
        state = "all white" if source == "mask" else "fully opaque"
        warnings.append(f"AnyStory: the {what} is {state}{which(full)}{how}: the whole image, background included, "
                        f"is encoded as the subject. " + MASK_FIX)
    if bool(inverted.any()):
        pct = ", ".join(f"{100 * float(v):.0f} %" for v in cover[inverted])
        warnings.append(
            f"AnyStory: the {what} covers {pct} of the image, white along the border and dark inside"
            f"{which(inverted)}: it is probably "
            f"inverted (the subject dark, the background selected). White must mark the subject: add InvertMask "
            f"after LoadImage's MASK, or remove the InvertMask if the mask already was white on the subject.")
    if bool(wide.any()):
        pct = ", ".join(f"{100 * float(v):.0f} %" for v in cover[wide])
        warnings.append(f"AnyStory: the {what} covers {pct} of the image{which(wide)}: most of the background is "
                        f"encoded as part of the subject. " + MASK_FIX)
    return mask, warnings


# ------------------------------------------------------------------------------------------ geometry

def subject_box(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Bounding box of ``mask > threshold`` per sample: int64 [B, 4] (y0, x0, y1, x1), end exclusive.

    A sample with no pixel above the threshold gets the whole image (0, 0, H, W)."""
    mask = _as_mask(mask)
    b, h, w = mask.shape
    on = mask > threshold
    rows, cols = on.any(dim=2), on.any(dim=1)                      # [B,H], [B,W]
    y0 = rows.int().argmax(dim=1)
    y1 = h - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = w - cols.flip(1).int().argmax(dim=1)
    box = torch.stack([y0, x0, y1, x1], dim=1).long()
    whole = torch.tensor([0, 0, h, w], dtype=torch.long, device=box.device)
    empty = ~rows.any(dim=1)
    return torch.where(empty[:, None], whole, box)


def square_crop_box(box: torch.Tensor, scale: float = 1.04) -> torch.Tensor:
    """Square boxes around ``box`` (int [B, 4] y0, x0, y1, x1): int64 [B, 4], same layout.

    Side = ceil(scale × the longer box side), centred on the box centre (rounded to whole pixels). The
    square always contains ``box``; it may extend past the image — it is never shrunk or shifted to fit,
    so the subject is never cropped away (crop_pad pads instead)."""
    if scale < 1.0:
        raise ValueError(f"scale must be >= 1 (the square must contain the subject), got {scale}")
    box = torch.as_tensor(box)
    if box.ndim == 1:
        box = box.unsqueeze(0)
    out = []
    for y0, x0, y1, x1 in box.long().tolist():
        longest = max(y1 - y0, x1 - x0, 1)
        side = max(longest, math.ceil(scale * longest - 1e-6))
        sy = math.floor((y0 + y1 - side) / 2 + 0.5)
        sx = math.floor((x0 + x1 - side) / 2 + 0.5)
        sy = min(max(sy, y1 - side), y0)                          # contain the box whatever the rounding
        sx = min(max(sx, x1 - side), x0)
        out.append([sy, sx, sy + side, sx + side])
    return torch.tensor(out, dtype=torch.long, device=box.device).reshape(-1, 4)


# ------------------------------------------------------------------------------------- crop and pad

def _fill_vector(fill: Fill, channels: int, device: torch.device) -> torch.Tensor:
    """A fill colour as float32 [channels]: a float (gray) or one value per channel."""
    f = torch.as_tensor(fill, dtype=torch.float32, device=device).flatten()
    if f.numel() == 1:
        return f.expand(channels)
    if f.numel() != channels:
        raise ValueError(f"fill must be one value or {channels} values, got {f.numel()}")
    return f


def crop_pad_one(image: torch.Tensor, box: Sequence[int], fill: Fill) -> torch.Tensor:
    """Cut the square ``box`` (y0, x0, y1, x1) out of ``image`` [H, W, C] → [S, S, C]; wherever the
    square lies outside the image it is filled with ``fill`` (gray value or one value per channel)."""
    y0, x0, y1, x1 = (int(v) for v in box)
    side = y1 - y0
    if side < 1 or x1 - x0 != side:
        raise ValueError(f"crop box must be a non-empty square, got {(y0, x0, y1, x1)}")
    h, w, c = image.shape
    out = _fill_vector(fill, c, image.device).to(image.dtype).expand(side, side, c).clone()
    iy0, iy1, ix0, ix1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if iy1 > iy0 and ix1 > ix0:
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
    return out


def crop_pad(images: torch.Tensor, boxes: torch.Tensor, fill: Fill, size: Optional[int] = None,
             mode: str = "bicubic") -> torch.Tensor:
    """Square crops with padding, for a batch: images [B, H, W, C], boxes [B, 4] → [B, S, S, C].

    Each sample's square may have its own side; each crop is resized (``mode``, antialiased) to the
    common side S = ``size``, or, when ``size`` is None, to the largest side in the batch. Bicubic
    results are clamped to 0..1."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {tuple(images.shape)}")
    images = images.float()
    boxes = torch.as_tensor(boxes).long().reshape(-1, 4)
    if boxes.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {boxes.shape[0]} boxes")
    crops = [crop_pad_one(img, box, fill) for img, box in zip(images, boxes.tolist())]
    s = size or max(cr.shape[0] for cr in crops)
    return torch.cat([_resize_hwc(cr, s, mode) for cr in crops], dim=0)


def _resize_hwc(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[S, S, C] → [1, size, size, C]; clamped to 0..1 after bicubic (it overshoots at edges)."""
    y = _resize(x.permute(2, 0, 1).unsqueeze(0), (size, size), mode)
    if mode == "bicubic":
        y = y.clamp(0.0, 1.0)
    return y.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------- together

def prepare_subject(image: torch.Tensor, mask: Optional[torch.Tensor] = None, clip_size: int = 224,
                    ref_size: int = 512, scale: float = 1.04, fill: Fill = 0.5,
                    remove_background: bool = True, whole_scale: Optional[float] = 1.0) -> PreparedSubject:
    """Segment, crop and pad a subject for both encoding branches (§1.1, "Preparation").

    image: ComfyUI IMAGE [B, H, W, C] (C = 3, or 4 with alpha = 1 on the subject), any size or aspect.
    mask: subject mask [B, H, W] or [H, W], **white = subject**, any size (resized); None → the alpha
        channel if any, else the whole image. See ``resolve_mask`` for precedence, broadcasting and the
        all-zero case (LoadImage's MASK is 1 − alpha: it needs InvertMask).
    scale: square side / the longer side of the mask's bounding box (paper-style margin, 1.04).
    whole_scale: the same where the bounding box is the whole image (no mask, a full mask): 1.0 = the
        image as it is (square: exactly IP-Adapter's input; non-square: padded to a square, not cropped);
        None = ``scale`` there too (the authors' FLUX demo always adds its margin).
    fill: background and padding colour, a gray value or an RGB triple in 0..1.
    remove_background: replace the background by ``fill`` (out = img·mask + fill·(1 − mask)), giving
        the paper's segmented image; otherwise only the padding is filled.

    The square crop (``square_crop_box`` of ``subject_box``) is padded where it runs past the image, the
    mask travels with it (padding = 0). Both crops are resized from the native crop — images bicubic
    antialiased and clamped, masks bilinear antialiased. The background is replaced at the source
    resolution (so the old background never bleeds into the subject's edge through the resize), and
    after the resize every pixel whose mask is 0 is set to ``fill`` exactly (bicubic ringing would
    otherwise leave a faint halo there).
    """
    if clip_size < 1 or ref_size < 1:
        raise ValueError(f"clip_size and ref_size must be positive, got {clip_size}, {ref_size}")
    image = _as_image(image)
    subject_mask, warnings = resolve_mask(image, mask)
    b = subject_mask.shape[0]
    rgb = image[..., :3] if image.shape[-1] >= 3 else image.expand(-1, -1, -1, 3)
    rgb = rgb.expand(b, -1, -1, -1)
    fill3 = _fill_vector(fill, 3, image.device)

    tight = subject_box(subject_mask)
    boxes = square_crop_box(tight, scale)
    if whole_scale is not None and whole_scale != scale:
        whole = (tight == torch.tensor([0, 0, *subject_mask.shape[-2:]], device=tight.device)).all(dim=1)
        if bool(whole.any()):
            boxes[whole] = square_crop_box(tight[whole], whole_scale)
    out = {k: [] for k in ("clip_image", "ref_image", "clip_mask", "ref_mask")}
    for img, m, box in zip(rgb, subject_mask, boxes.tolist()):
        if remove_background:                     # segment at source resolution: no background colour
            img = img * m[..., None] + fill3 * (1.0 - m[..., None])   # bleeds into the subject's edge
        crop = crop_pad_one(img, box, fill3)
        crop_m = crop_pad_one(m.unsqueeze(-1), box, 0.0)
        for name, size in (("clip", clip_size), ("ref", ref_size)):
            im = _resize_hwc(crop, size, "bicubic")
            mk = _resize_hwc(crop_m, size, "bilinear").clamp(0.0, 1.0)
            if remove_background:                 # exact fill wherever the mask is 0 (no ringing halo)
                im = torch.where(mk > 0, im, fill3)
            out[f"{name}_image"].append(im)
            out[f"{name}_mask"].append(mk[..., 0])
    cat = {k: torch.cat(v, dim=0) for k, v in out.items()}
    return PreparedSubject(clip_image=cat["clip_image"], ref_image=cat["ref_image"], ref_mask=cat["ref_mask"],
                           clip_mask=cat["clip_mask"], boxes=boxes, warnings=warnings)
