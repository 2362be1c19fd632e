"""Subject preparation: segment, crop (square, 1.04× margin; the whole image as it is when the subject is the whole
image), pad with the fill — never crop the subject."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anystory.prepare import (
    PreparedSubject,
    crop_pad,
    crop_pad_one,
    prepare_subject,
    resolve_mask,
    square_crop_box,
    subject_box,
)

RED = (0.9, 0.1, 0.1)
BLUE = (0.1, 0.2, 0.8)


def scene(h, w, rect, fg=RED, bg=BLUE, batch=1):
    """A solid ``fg`` rectangle (y0, x0, y1, x1) on a solid ``bg``: image [B,H,W,3], mask [B,H,W]."""
    y0, x0, y1, x1 = rect
    mask = torch.zeros(batch, h, w)
    mask[:, y0:y1, x0:x1] = 1.0
    img = torch.tensor(bg).expand(batch, h, w, 3).clone()
    img[:, y0:y1, x0:x1] = torch.tensor(fg)
    return img, mask


def is_red(img, others=(BLUE, (0.5, 0.5, 0.5))):
    """Pixels nearer to RED than to any other colour of the scene (background, fill)."""
    d = lambda c: (img - torch.tensor(c)).square().sum(-1)
    red = d(RED)
    return torch.stack([red < d(c) for c in others]).all(0)


def off_boundary(a, b, band):
    """Pixels where the boolean maps ``a`` and ``b`` [H, W] disagree farther than ``band`` px from
    ``b``'s boundary."""
    mf = b.float()[None, None]
    dil = F.max_pool2d(mf, 2 * band + 1, 1, band)[0, 0] > 0
    ero = -F.max_pool2d(-mf, 2 * band + 1, 1, band)[0, 0] > 0
    return (a ^ b) & ~(dil & ~ero)


def square_side(longest, scale=1.04):
    return math.ceil(scale * longest - 1e-6)


# ------------------------------------------------------------------------------------------- geometry

def test_subject_box_and_empty_box():
    _, m = scene(40, 60, (5, 10, 25, 50))
    m2 = torch.zeros(1, 40, 60)
    boxes = subject_box(torch.cat([m, m2]))
    assert boxes.dtype == torch.long
    assert boxes.tolist() == [[5, 10, 25, 50], [0, 0, 40, 60]]


def test_subject_box_threshold():
    m = torch.zeros(1, 20, 20)
    m[0, 2:5, 3:7] = 0.4
    m[0, 8:12, 9:15] = 0.9
    assert subject_box(m).tolist() == [[8, 9, 12, 15]]
    assert subject_box(m, threshold=0.3).tolist() == [[2, 3, 12, 15]]


@pytest.mark.parametrize("box", [(10, 20, 110, 70), (0, 0, 7, 300), (3, 5, 4, 6), (11, 13, 58, 91),
                                 (-5, 2, 20, 9), (100, 100, 133, 101)])
def test_square_crop_box_side_centre_containment(box):
    y0, x0, y1, x1 = box
    sq = square_crop_box(torch.tensor([box]))[0].tolist()
    sy0, sx0, sy1, sx1 = sq
    longest = max(y1 - y0, x1 - x0)
    side = square_side(longest)
    assert sy1 - sy0 == sx1 - sx0 == side
    assert sy0 <= y0 and sx0 <= x0 and sy1 >= y1 and sx1 >= x1           # contains the box
    assert abs((sy0 + sy1) / 2 - (y0 + y1) / 2) <= 0.5                   # centred
    assert abs((sx0 + sx1) / 2 - (x0 + x1) / 2) <= 0.5


def test_square_crop_box_scale():
    assert square_crop_box(torch.tensor([[0, 0, 100, 50]]), scale=1.0).tolist() == [[0, -25, 100, 75]]
    assert square_crop_box(torch.tensor([0, 0, 100, 50]), scale=1.5).tolist() == [[-25, -50, 125, 100]]
    with pytest.raises(ValueError):
        square_crop_box(torch.tensor([[0, 0, 10, 10]]), scale=0.9)


def test_crop_pad_fill_and_mixed_sizes():
    img = torch.rand(2, 10, 12, 3)
    boxes = torch.tensor([[-2, -3, 8, 7], [0, 0, 20, 20]])                # sides 10 and 20
    one = crop_pad_one(img[0], boxes[0].tolist(), (0.2, 0.4, 0.6))
    assert one.shape == (10, 10, 3)
    assert torch.equal(one[2:, 3:], img[0, :8, :7])
    assert torch.allclose(one[:2], torch.tensor([0.2, 0.4, 0.6]).expand(2, 10, 3))
    assert torch.allclose(one[:, :3], torch.tensor([0.2, 0.4, 0.6]).expand(10, 3, 3))
    out = crop_pad(img, boxes, 0.5)
    assert out.shape == (2, 20, 20, 3)
    assert torch.allclose(out[1, :10, :12], img[1])                     # largest: no resize
    assert torch.allclose(out[1, 10:], torch.full((10, 20, 3), 0.5))
    assert crop_pad(img, boxes, 0.5, size=16).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError):
        crop_pad_one(img[0], (0, 0, 5, 6), 0.5)                         # not square
    with pytest.raises(ValueError):
        crop_pad(img, boxes[:1], 0.5)


# ------------------------------------------------------------------------------- border / padding

@pytest.mark.parametrize("rect", [(50, 220, 150, 300),    # touches the right border
                                  (50, 0, 150, 80),       # left
                                  (0, 100, 90, 180),      # top
                                  (120, 30, 200, 250),    # bottom, wide
                                  (0, 0, 200, 300)])      # the whole image
def test_subject_at_border_is_kept_whole_centred_and_padded_with_fill(rect):
    h, w = 200, 300
    img, mask = scene(h, w, rect)
    y0, x0, y1, x1 = rect
    bh, bw = y1 - y0, x1 - x0
    side = square_side(max(bh, bw), 1.0 if rect == (0, 0, h, w) else 1.04)  # the whole image: no margin
    for remove in (True, False):
        p = prepare_subject(img, mask, remove_background=remove)
        sy0, sx0, sy1, sx1 = p.boxes[0].tolist()
        assert sy1 - sy0 == sx1 - sx0 == side
        expected = bh * bw / side ** 2                                  # subject area / square area
        for m in (p.ref_mask[0], p.clip_mask[0]):
            assert abs(m.mean().item() - expected) < 0.015
        red = is_red(p.ref_image[0]).float()
        assert abs(red.mean().item() - expected) < 0.015                # every subject pixel is there
        ys, xs = torch.nonzero(p.ref_mask[0] > 0.5, as_tuple=True)
        assert abs(ys.float().mean().item() - 255.5) < 3                 # centred
        assert abs(xs.float().mean().item() - 255.5) < 3
        # padding (outside the source image) equals the fill, not black
        k = 512 / side
        g = math.ceil(2 * k) + 1                                        # bicubic support: 2 source px
        inside = torch.zeros(512, 512, dtype=torch.bool)
        iy0, iy1 = math.floor((0 - sy0) * k) - g, math.ceil((h - sy0) * k) + g
        ix0, ix1 = math.floor((0 - sx0) * k) - g, math.ceil((w - sx0) * k) + g
        inside[max(iy0, 0):max(iy1, 0), max(ix0, 0):max(ix1, 0)] = True
        pad = p.ref_image[0][~inside]
        if min(sy0, sx0, h - sy1, w - sx1) <= -4:                       # runs ≥ 4 px past the image
            assert pad.numel() > 0
        assert torch.allclose(pad, torch.full_like(pad, 0.5), atol=1e-4)
        assert (p.ref_mask[0][~inside] == 0).all()


def test_right_border_subject_touches_pad_side_not_cut():
    """The subject column at the image's right edge lands inside the output, followed by fill."""
    img, mask = scene(200, 300, (50, 220, 150, 300))
    p = prepare_subject(img, mask)
    red_cols = torch.nonzero(is_red(p.ref_image[0]).any(dim=0)).flatten()
    # square x: 208..312 → subject 220..300 maps to 59.1..452.9 at 512/104
    assert abs(red_cols.min().item() - 59) <= 2 and abs(red_cols.max().item() - 452) <= 2
    assert torch.allclose(p.ref_image[0, :, 456:], torch.full((512, 56, 3), 0.5), atol=1e-5)


# ------------------------------------------------------------------------------------ background

@pytest.mark.parametrize("fill", [0.5, (0.2, 0.4, 0.6), 0.0])
def test_background_is_fill_and_subject_is_kept(fill):
    img, mask = scene(120, 90, (30, 20, 100, 70))
    p = prepare_subject(img, mask, fill=fill)
    f = torch.tensor(fill).expand(3) if isinstance(fill, float) else torch.tensor(fill)
    for im, m in ((p.ref_image[0], p.ref_mask[0]), (p.clip_image[0], p.clip_mask[0])):
        bg = im[m == 0]
        assert bg.shape[0] > 0
        assert torch.allclose(bg, f.expand_as(bg), atol=1e-6)
        k = im.shape[0] / (p.boxes[0, 2] - p.boxes[0, 0]).item()              # output px per source px
        band = math.ceil(2 * k) + 1
        core = -F.max_pool2d(-(m == 1).float()[None, None], 2 * band + 1, 1, band)[0, 0] > 0
        assert core.sum() > 0
        fg = im[core]                                                   # inside, off the edge: exact
        assert torch.allclose(fg, torch.tensor(RED).expand_as(fg), atol=1e-4)
        edge = im[m > 0.999]                                            # at the edge: bicubic ringing only
        assert (edge - torch.tensor(RED)).abs().max() < 0.12
        # the old background never bleeds in: each pixel is a mix of RED and the fill only
        t = ((im - f) * (torch.tensor(RED) - f)).sum(-1) / (torch.tensor(RED) - f).square().sum()
        mix = f + t[..., None] * (torch.tensor(RED) - f)
        assert (im - mix).abs().max() < 0.03


def test_keep_background_keeps_it():
    img, mask = scene(120, 90, (30, 20, 100, 70))
    p = prepare_subject(img, mask, remove_background=False)
    near = p.ref_image[0][(p.ref_mask[0] == 0)]
    assert (near - torch.tensor(BLUE)).abs().sum(-1).lt(1e-3).float().mean() > 0.5


def disc_scene(h, w, cy, cx, r):
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    m = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()[None]
    img = torch.tensor(BLUE).expand(1, h, w, 3).clone()
    img[m.bool()] = torch.tensor(RED)
    return img, m


@pytest.mark.parametrize("setup", ["rect", "disc_corner", "disc_small"])
def test_mask_and_image_stay_aligned(setup):
    if setup == "rect":
        img, mask = scene(157, 203, (40, 150, 157, 203))
    elif setup == "disc_corner":
        img, mask = disc_scene(180, 240, 10, 230, 60)       # runs off the top-right corner
    else:
        img, mask = disc_scene(301, 99, 150, 50, 9)          # small subject: upscaled crop
    for remove in (False, True):
        p = prepare_subject(img, mask, remove_background=remove)
        for im, m in ((p.ref_image[0], p.ref_mask[0]), (p.clip_image[0], p.clip_mask[0])):
            k = im.shape[0] / (p.boxes[0, 2] - p.boxes[0, 0]).item()      # output px per source px
            band = max(2, math.ceil(0.2 * k))                             # ≤ 2 output px or ⅕ source px
            red = is_red(im)
            assert red.sum() > 0
            assert off_boundary(red, m > 0.5, band).sum() == 0           # disagreement only on the boundary


# ----------------------------------------------------------------------------------- mask sources

def test_mask_of_another_size_is_resized():
    img, mask = scene(200, 300, (48, 220, 148, 300))
    small = F.avg_pool2d(mask[None], 4)[0]                             # 50×75, exact 0/1
    assert small.shape == (1, 50, 75)
    a = prepare_subject(img, mask)
    b = prepare_subject(img, small)
    assert torch.equal(a.boxes, b.boxes)
    px = 512 // 104                                                     # one source pixel, in output px
    # same shape to within a source pixel (the coarse mask's edges are soft, its corners rounded)
    assert off_boundary(b.ref_mask[0] > 0.5, a.ref_mask[0] > 0.5, px).sum() == 0
    assert (a.ref_mask - b.ref_mask).abs().mean() < 0.04
    assert off_boundary(is_red(b.ref_image[0]), is_red(a.ref_image[0]), px).sum() == 0
    assert off_boundary(is_red(b.ref_image[0]), b.ref_mask[0] > 0.5, 2).sum() == 0
    m, _ = resolve_mask(img, small)
    assert m.shape == (1, 200, 300) and m.min() >= 0 and m.max() <= 1
    assert ((m > 0) & (m < 1)).any()                                   # soft values kept
    big = F.interpolate(mask[None], size=(400, 600), mode="nearest")[0]
    assert torch.equal(prepare_subject(img, big).boxes, a.boxes)


def test_alpha_channel_is_used_without_mask():
    img, mask = scene(100, 140, (20, 30, 80, 70))
    rgba = torch.cat([img, mask[..., None]], dim=-1)
    a = prepare_subject(rgba)
    b = prepare_subject(img, mask)
    assert a.ref_image.shape == (1, 512, 512, 3)
    assert torch.equal(a.boxes, b.boxes)
    assert torch.allclose(a.ref_image, b.ref_image) and torch.allclose(a.ref_mask, b.ref_mask)
    assert a.warnings == []
    opaque = torch.cat([img, torch.ones(1, 100, 140, 1)], dim=-1)     # alpha all 1 → whole image
    assert square_crop_box(torch.tensor([[0, 0, 100, 140]]), 1.0).tolist() == prepare_subject(opaque).boxes.tolist()


def test_explicit_mask_beats_alpha():
    img, alpha = scene(100, 140, (20, 30, 80, 70))
    _, mask = scene(100, 140, (5, 90, 40, 135))
    rgba = torch.cat([img, alpha[..., None]], dim=-1)
    p = prepare_subject(rgba, mask)
    assert p.boxes.tolist() == square_crop_box(torch.tensor([[5, 90, 40, 135]])).tolist()


def _names_the_fixes(text):
    return all(w in text for w in ("InvertMask", "alpha" if "alpha" in text else "transparent", "RMBG",
                                   "Rembg", "Segment Anything"))


def test_no_mask_no_alpha_is_whole_image_with_a_warning_naming_the_fixes():
    """Issue 18 point 3: a photo without alpha and without a mask is never encoded silently."""
    img, _ = scene(60, 80, (10, 10, 20, 20))
    p = prepare_subject(img)
    assert p.boxes.tolist() == square_crop_box(torch.tensor([[0, 0, 60, 80]]), 1.0).tolist() == [[-10, 0, 70, 80]]
    assert len(p.warnings) == 1 and "whole image" in p.warnings[0] and _names_the_fixes(p.warnings[0])


def test_all_white_mask_warns():
    """A JPEG through LoadImage → InvertMask: LoadImage's 64×64 zeros become an all-white mask."""
    img, _ = scene(60, 80, (10, 10, 20, 20))
    p = prepare_subject(img, 1.0 - torch.zeros(1, 64, 64))
    assert len(p.warnings) == 1, p.warnings
    assert "all white" in p.warnings[0] and _names_the_fixes(p.warnings[0])
    opaque = torch.cat([img, torch.ones(1, 60, 80, 1)], dim=-1)
    w = prepare_subject(opaque).warnings
    assert len(w) == 1 and "fully opaque" in w[0] and _names_the_fixes(w[0])


def test_mask_covering_most_of_the_image_warns():
    img, mask = scene(100, 100, (4, 4, 100, 100))                        # 92 % of the image
    w = prepare_subject(img, mask).warnings
    assert len(w) == 1 and "92 %" in w[0] and "covers" in w[0] and _names_the_fixes(w[0])
    img, mask = scene(100, 100, (0, 0, 85, 100))                         # a large subject: fine
    assert prepare_subject(img, mask).warnings == []


def test_inverted_mask_with_a_few_border_gaps_warns():
    """Subject dark, border mostly selected (not all of it: a cut-out touching the bottom edge)."""
    img, mask = scene(100, 100, (30, 35, 100, 65))                       # the subject touches the bottom
    w = prepare_subject(img, 1.0 - mask).warnings
    assert len(w) == 1 and "inverted" in w[0] and "InvertMask" in w[0] and "79 %" in w[0]
    assert prepare_subject(img, mask).warnings == []


@pytest.mark.parametrize("mask_shape", [(64, 64), (1, 64, 64), (1, 200, 300)])
def test_all_zero_mask_is_whole_image_with_invertmask_warning(mask_shape):
    img, _ = scene(200, 300, (50, 50, 100, 100))
    p = prepare_subject(img, torch.zeros(mask_shape))                   # LoadImage's mask for no alpha
    assert p.boxes.tolist() == square_crop_box(torch.tensor([[0, 0, 200, 300]]), 1.0).tolist()
    assert len(p.warnings) == 1
    text = p.warnings[0]
    assert "InvertMask" in text and "empty" in text and "whole image" in text
    # the whole image is the subject: inside the source area the mask is 1 and the blue bg is kept
    assert p.ref_mask.max() == 1.0
    assert (p.ref_image[0] - torch.tensor(BLUE)).abs().sum(-1).lt(1e-3).float().mean() > 0.5


def test_all_ones_mask_is_whole_image():
    img, _ = scene(50, 70, (10, 10, 20, 20))
    p = prepare_subject(img, torch.ones(1, 50, 70))
    assert p.boxes.tolist() == square_crop_box(torch.tensor([[0, 0, 50, 70]]), 1.0).tolist()
    assert not any("empty" in w for w in p.warnings)


def test_inverted_loadimage_mask_warns():
    img, mask = scene(100, 100, (30, 30, 70, 70))
    p = prepare_subject(img, 1.0 - mask)                                # LoadImage's MASK = 1 − alpha
    assert any("InvertMask" in w and "inverted" in w for w in p.warnings)
    assert prepare_subject(img, mask).warnings == []


def test_empty_mask_in_batch_names_the_sample():
    img, mask = scene(50, 60, (10, 10, 30, 40), batch=2)
    mask[1] = 0
    m, warnings = resolve_mask(img, mask)
    assert len(warnings) == 1 and "image 1 of 2" in warnings[0] and "InvertMask" in warnings[0]
    assert (m[1] == 1).all() and torch.equal(m[0], mask[0])


# ---------------------------------------------------------------------------------------- batches

def test_mask_batch_broadcasts_to_images_and_image_to_masks():
    img, mask = scene(100, 120, (10, 20, 60, 90), batch=3)
    img[1] = torch.tensor((0.3, 0.9, 0.3))
    p = prepare_subject(img, mask[:1])
    assert p.ref_image.shape == (3, 512, 512, 3) and p.clip_image.shape == (3, 224, 224, 3)
    assert p.ref_mask.shape == (3, 512, 512) and p.clip_mask.shape == (3, 224, 224)
    assert (p.boxes == p.boxes[:1]).all()
    assert not torch.allclose(p.ref_image[0], p.ref_image[1])

    rects = [(10, 20, 60, 90), (0, 0, 30, 30), (50, 60, 100, 120)]
    masks = torch.cat([scene(100, 120, r)[1] for r in rects])
    q = prepare_subject(img[:1], masks)
    assert q.ref_image.shape == (3, 512, 512, 3)
    assert q.boxes.tolist() == square_crop_box(torch.tensor(rects)).tolist()
    for i, r in enumerate(rects):
        single = prepare_subject(img[:1], masks[i:i + 1])
        assert torch.allclose(q.ref_image[i], single.ref_image[0], atol=1e-6)


def test_mismatched_batches_raise():
    img, mask = scene(40, 40, (5, 5, 20, 20), batch=2)
    with pytest.raises(ValueError, match=r"(?s)\b2\b.*\b3\b"):
        prepare_subject(img, torch.ones(3, 40, 40))


# ------------------------------------------------------------------------ shapes, sizes, dtypes

@pytest.mark.parametrize("hw", [(7, 300), (300, 7), (1, 1), (33, 57), (1, 50), (129, 17)])
def test_extreme_and_odd_sizes(hw):
    h, w = hw
    img = torch.rand(2, h, w, 3)
    for mask in (None, torch.ones(h, w)):
        p = prepare_subject(img, mask, clip_size=224, ref_size=512)
        assert isinstance(p, PreparedSubject)
        assert p.clip_image.shape == (2, 224, 224, 3) and p.ref_image.shape == (2, 512, 512, 3)
        assert p.ref_mask.shape == (2, 512, 512) and p.clip_mask.shape == (2, 224, 224)
        for t in (p.clip_image, p.ref_image, p.ref_mask, p.clip_mask):
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
            assert t.min() >= 0 and t.max() <= 1
        side = max(h, w)                                                # the whole image: no margin
        assert (p.boxes[:, 2] - p.boxes[:, 0] == side).all()
        expected = h * w / side ** 2
        assert abs(p.ref_mask.mean().item() - expected) < 0.01
        ys, xs = torch.nonzero(p.ref_mask[0] > 0.5, as_tuple=True)
        tol = 0.5 * 512 / side + 2                                      # integer boxes: ≤ ½ source px off
        if side >= 8:
            assert abs(ys.float().mean().item() - 255.5) < tol and abs(xs.float().mean().item() - 255.5) < tol


def test_thin_subject_in_extreme_image():
    img, mask = scene(7, 300, (2, 100, 5, 250))
    p = prepare_subject(img, mask)
    side = square_side(150)
    assert p.boxes.tolist() == [[-74, 97, -74 + side, 97 + side]] and side == 156
    assert abs(is_red(p.ref_image[0]).float().mean().item() - 3 * 150 / side ** 2) < 0.01


def test_dtype_and_device_and_sizes():
    img, mask = scene(64, 48, (10, 10, 50, 40))
    p = prepare_subject(img.half(), mask.double(), clip_size=32, ref_size=96)
    assert p.clip_image.shape == (1, 32, 32, 3) and p.ref_image.shape == (1, 96, 96, 3)
    assert p.clip_mask.shape == (1, 32, 32) and p.ref_mask.shape == (1, 96, 96)
    assert all(t.dtype == torch.float32 and t.device == img.device
               for t in (p.clip_image, p.ref_image, p.clip_mask, p.ref_mask))
    p3 = prepare_subject(img[0], mask[0])                               # unbatched [H,W,C] / [H,W]
    assert p3.ref_image.shape == (1, 512, 512, 3)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        prepare_subject(torch.rand(1, 10, 10, 2))
    with pytest.raises(ValueError):
        prepare_subject(torch.rand(1, 10, 10, 3), torch.rand(1, 1, 10, 10))
    with pytest.raises(ValueError):
        prepare_subject(torch.rand(1, 10, 10, 3), fill=(0.1, 0.2))


@pytest.mark.parametrize("how", ["no mask", "full mask", "opaque alpha"])
def test_whole_square_image_is_used_as_ip_adapter_does(how):
    """No mask (or a full one) on a square image: the encoders see the image itself resized, as IP-Adapter feeds
    CLIP — no 1.04 margin, no grey border (which cost 2-11 % of the IP-Adapter effect)."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 300, 300, 3, generator=g)
    mask = {"no mask": None, "full mask": torch.ones(1, 300, 300), "opaque alpha": None}[how]
    src = torch.cat([img, torch.ones(1, 300, 300, 1)], -1) if how == "opaque alpha" else img
    p = prepare_subject(src, mask)
    assert p.boxes.tolist() == [[0, 0, 300, 300]]
    for got, size in ((p.clip_image, 224), (p.ref_image, 512)):
        want = F.interpolate(img.permute(0, 3, 1, 2), size=(size, size), mode="bicubic", align_corners=False,
                             antialias=True).clamp(0, 1).permute(0, 2, 3, 1)  # ComfyUI's clip_preprocess resize
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert p.ref_mask.min() == 1.0
    same = prepare_subject(img[:, :224, :224])  # already 224²: the very pixels
    assert torch.equal(same.clip_image, img[:, :224, :224])


def test_whole_non_square_image_is_padded_not_cropped_and_masked_subjects_keep_the_margin():
    img, mask = scene(60, 90, (10, 20, 50, 60))
    p = prepare_subject(img)                       # the whole image, wider than tall: padded to 90², no margin
    assert p.boxes.tolist() == [[-15, 0, 75, 90]]
    q = prepare_subject(img, mask)                 # a masked subject: 1.04 × its box (never cropped away)
    assert q.boxes.tolist() == square_crop_box(torch.tensor([[10, 20, 50, 60]]), 1.04).tolist()
    edge = torch.zeros(1, 60, 90)
    edge[0, :, 30:60] = 1
    edge[0, 0:5, :] = 1                            # touches all four edges: the box is the whole image
    assert prepare_subject(img, edge).boxes.tolist() == [[-15, 0, 75, 90]]
    both = prepare_subject(torch.cat([img, img]), torch.stack([torch.ones(60, 90), mask[0]]))  # per view
    assert both.boxes.tolist() == [[-15, 0, 75, 90]] + q.boxes.tolist()
    assert prepare_subject(img, whole_scale=None).boxes.tolist() == square_crop_box(
        torch.tensor([[0, 0, 60, 90]]), 1.04).tolist()  # FLUX: the authors' demo keeps the margin
