"""Router training (AnyStory stage 2) on the user's own images — pure torch, no ComfyUI import.

What is trained: the routing QFormer (``routing_proj``, one query → R_i) and the per-layer routers
(``router.{N}``, :class:`~anystory.router.LayerRouter`). Everything else is frozen: the SDXL UNet, the
CLIP-H vision model, the subject QFormer (``subject_proj`` → E_i) and the per-layer Ŵ_k/Ŵ_v
(``ip_adapter.{N}``) — taken from the subject-branch file the user has (IP-Adapter Plus SDXL ViT-H
today, a native AnyStory file later).

One training sample (DESIGN §1.2, paper §3.3):

1. each instance i of the target image gets a reference view: the user's ``name_ref{i}.png`` or, by
   default, a crop of the target itself with augmentation (random rotation, crop jitter, zero padding),
   segmented and squared by :func:`anystory.prepare.prepare_subject`; frozen CLIP-H → F_clip;
   frozen subject QFormer → E_i, trainable routing QFormer → R_i; the all-zero image gives the
   background route N+1 (E_{N+1}, R_{N+1});
2. the target's latent x0 is noised at a random timestep t of the checkpoint's ε schedule;
3. the frozen UNet runs with AnyStory's routing active at every cross-attention layer l (ComfyUI's
   ``attn2_patch`` + attn2 replace hooks, driven by ``transformer_options``): the layer's router turns
   n = norm2(x) into logits → **straight-through Gumbel-softmax hard maps** σ(M^l) → eq. 5
   (:func:`~anystory.injection.routed_cross_attention_sum`, differentiable in the maps) with the frozen
   Ŵ_k/Ŵ_v;
4. loss = ε-MSE + λ·L_route, L_route = the mean over layers of
   :func:`~anystory.router.routing_loss` between the *soft* refined map softmax(logits) and the
   whole-instance masks on that layer's grid (background = route N+1); λ = 0.1.

Left out in this version: the routed reference attention (eq. 6-8, ReferenceNet features) is not
active during training — it does not depend on the router's parameters except through M^{l-1} and
the router is what is trained. Text-free/image-free dropout of the paper's stage 1 is not used
(stage 1 is not trained here).

Pieces (each usable alone; ``scripts/train_router.py`` wires them for real checkpoints):

- dataset: :func:`scan_dataset`, :class:`InstanceDataset` (folder of images + per-instance masks or
  an instance-id label PNG + optional reference crops and captions), :func:`make_shapes_dataset`;
- augmentation: :func:`augment_reference`, :func:`reference_views`;
- schedule/losses: :func:`sdxl_alphas_cumprod`, :func:`instance_index`, :func:`layer_routing_loss`;
- the training forward: :func:`attach_router` (adds a router to an IP-Adapter-style adapter),
  :class:`RouterTrainer` (an ``nn.Module`` holding only the trainables, DDP-wrappable; its forward is
  one UNet call + losses), :func:`gradient_checkpointing`, :func:`train_step`;
- resumable state: :func:`save_training_state` / :func:`load_training_state` (``torch.save`` of
  tensors and plain values, read back with ``weights_only=True``);
- evaluation: :func:`evaluate_routing` → :class:`RoutingEval` (routing IoU per layer group),
  :func:`format_iou_table`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import KIND_NATIVE, AnyStoryAdapter
from .attention import sdpa
from .checkpoint.io import atomic_write
from .encoder import Resampler
from .injection import routed_cross_attention_sum
from .layers import LayerLayout, discover_layout
from .prepare import prepare_subject
from .router import LayerRouter, gumbel_maps, one_hot_maps, routing_loss, soft_maps

STATE_KEY = "anystory_train_state"
TRAIN_STATE_FORMAT = "anystory-router-train"
TRAIN_STATE_VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_SIZE = 224


class DatasetError(ValueError):
    """A training folder that cannot be used, with what was found and how to fix it."""


# ================================================================================================
# dataset
# ================================================================================================
_SUFFIX = re.compile(r"^(?P<stem>.+?)_(?:(?P<kind>mask|ref)(?P<idx>\d+)|(?P<labels>labels))$")


@dataclass
class SampleFiles:
    """The files of one training image. masks[i] / refs[i] belong to instance i."""

    name: str
    image: Path
    masks: list = field(default_factory=list)
    labels: Optional[Path] = None
    refs: dict = field(default_factory=dict)
    caption: Optional[Path] = None


def scan_dataset(root, require_instances: bool = True) -> list[SampleFiles]:
    """Parse a training folder (not recursive).

    Per target image ``name.png`` (or .jpg/.jpeg/.webp/.bmp):

    - instance masks ``name_mask0.png``, ``name_mask1.png``, … (white = instance), **or** one label image
      ``name_labels.png`` whose pixel values are instance ids (0 = background, 1…N = instances; a
      paletted or 8/16-bit gray PNG);
    - optional reference crops ``name_ref0.png``, … of the same instances (RGBA: alpha = the subject; RGB:
      the whole crop); an instance without one gets an augmented crop of the target;
    - optional caption ``name.txt`` (else the empty prompt).

    Raises :class:`DatasetError` if the folder has no usable image; images without any mask are refused
    (``require_instances``) with their names."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"training data folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.iterdir() if p.is_file())
    by_stem: dict[str, SampleFiles] = {}
    extra: list[tuple[str, str, Optional[int], Path]] = []
    for p in files:
        ext = p.suffix.lower()
        if ext == ".txt":
            extra.append((p.stem, "caption", None, p))
            continue
        if ext not in IMAGE_EXTENSIONS:
            continue
        m = _SUFFIX.match(p.stem)
        if m:
            kind = "labels" if m.group("labels") else m.group("kind")
            extra.append((m.group("stem"), kind, int(m.group("idx")) if m.group("idx") else None, p))
        else:
            if p.stem in by_stem:
                raise DatasetError(f"two target images named {p.stem!r} ({by_stem[p.stem].image.name}, {p.name}); "
                                   "give each image its own name")
            by_stem[p.stem] = SampleFiles(p.stem, p)
    masks: dict[str, dict[int, Path]] = {}
    for stem, kind, idx, p in extra:
        s = by_stem.get(stem)
        if s is None:
            if kind in ("mask", "ref", "labels"):
                raise DatasetError(f"{p.name}: there is no target image {stem}.png/.jpg for it in {root}")
            continue
        if kind == "caption":
            s.caption = p
        elif kind == "labels":
            s.labels = p
        elif kind == "mask":
            masks.setdefault(stem, {})[idx] = p
        else:
            s.refs[idx] = p
    out, missing = [], []
    for stem, s in sorted(by_stem.items()):
        ms = masks.get(stem, {})
        if ms and s.labels is not None:
            raise DatasetError(f"{stem}: give either {stem}_mask<i>.png files or one {stem}_labels.png, not both")
        if ms:
            want = list(range(len(ms)))
            if sorted(ms) != want:
                raise DatasetError(f"{stem}: mask files must be numbered 0…{len(ms) - 1} without gaps, found "
                                   f"{sorted(ms)}")
            s.masks = [ms[i] for i in want]
        if not s.masks and s.labels is None:
            missing.append(s.image.name)
            continue
        n = len(s.masks) if s.masks else None
        if n is not None:
            bad = [i for i in s.refs if i >= n]
            if bad:
                raise DatasetError(f"{stem}: reference crop(s) {bad} have no instance mask (instances 0…{n - 1})")
        out.append(s)
    if missing and require_instances:
        raise DatasetError(
            f"{len(missing)} image(s) in {root} have no instance masks ({', '.join(missing[:5])}"
            f"{' …' if len(missing) > 5 else ''}): add name_mask0.png, name_mask1.png … (white = instance) or "
            "a name_labels.png with instance ids, or move the image out of the folder")
    if not out:
        raise DatasetError(f"no training images with instance masks in {root} (expected name.png + "
                           "name_mask0.png … or name_labels.png)")
    return out


def _pil():
    from PIL import Image
    return Image


def load_image(path) -> torch.Tensor:
    """[H, W, 3] (or [H, W, 4] with alpha) float in 0..1."""
    Image = _pil()
    import numpy as np
    with Image.open(path) as im:
        im.load()
        has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
        im = im.convert("RGBA" if has_alpha else "RGB")
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())


def load_mask(path) -> torch.Tensor:
    """[H, W] float 0/1 (white = instance; for RGBA files the alpha channel when the colour is flat)."""
    Image = _pil()
    import numpy as np
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA"):
            a = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
            g = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            arr = a if (a.min() < 0.5 <= a.max()) and g.std() < 1e-3 else g * a
        elif im.mode in ("I", "I;16", "I;16B", "F"):
            arr = np.asarray(im, dtype=np.float32)
            arr = arr / max(float(arr.max()), 1.0)
        else:
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr.copy()) > 0.5).float()


def load_labels(path) -> torch.Tensor:
    """An instance-id image → [N, H, W] float 0/1 masks, ids in increasing order (0 = background)."""
    Image = _pil()
    import numpy as np
    with Image.open(path) as im:
        im.load()
        if im.mode in ("P", "L", "I", "I;16", "I;16B"):
            arr = np.asarray(im).astype(np.int64)
        elif im.mode in ("RGB", "RGBA"):  # colour-coded ids: each distinct colour except black
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
            arr = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
        else:
            arr = np.asarray(im.convert("L")).astype(np.int64)
    lab = torch.from_numpy(arr.copy())
    ids = [int(i) for i in torch.unique(lab).tolist() if i != 0]
    if not ids:
        return torch.zeros(0, *lab.shape)
    return torch.stack([(lab == i).float() for i in ids])


def _resize_crop(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[C, H, W] → [C, size, size]: shorter side to ``size`` then centre crop."""
    _, h, w = x.shape
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        kw = dict(align_corners=False, antialias=True) if mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(x[None], size=(nh, nw), mode=mode, **kw)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size]


@dataclass
class TrainSample:
    """One training image, square at the dataset resolution.

    image: [S, S, 3] float 0..1; masks: [N, S, S] float 0/1 (instance i = row i);
    refs: per instance a reference image [h, w, 3|4] or None (→ augmented crop of the target);
    caption: the prompt; name: the file stem; index: position in the dataset; key: what the latent and
    text-conditioning cache is keyed by (the image's path; the name when there is no file)."""

    name: str
    image: torch.Tensor
    masks: torch.Tensor
    refs: list
    caption: str = ""
    index: int = 0
    key: str = ""

    def __post_init__(self):
        if not self.key:
            self.key = self.name

    @property
    def num_instances(self) -> int:
        return self.masks.shape[0]


class InstanceDataset(torch.utils.data.Dataset):
    """A folder of images with instance masks (see :func:`scan_dataset`) as :class:`TrainSample`.

    resolution: square side after "shorter side to resolution + centre crop" (1024 for SDXL; must be
        a multiple of 8 — the VAE's factor).
    max_instances: keep the largest instances (a route per instance: more routes, more compute).
    min_area: instances covering less than this fraction of the square after cropping are dropped
        (they vanish on the 1/4-resolution grids).
    """

    def __init__(self, root, resolution: int = 1024, max_instances: int = 4, min_area: float = 0.002,
                 default_caption: str = ""):
        if resolution % 8:
            raise DatasetError(f"resolution must be a multiple of 8, got {resolution}")
        self.root = Path(root)
        self.files = scan_dataset(root)
        self.resolution = int(resolution)
        self.max_instances = int(max_instances)
        self.min_area = float(min_area)
        self.default_caption = default_caption

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> TrainSample:
        f = self.files[i]
        S = self.resolution
        img = load_image(f.image)[..., :3]
        masks = load_labels(f.labels) if f.labels is not None else torch.stack([load_mask(p) for p in f.masks])
        if masks.shape[-2:] != img.shape[:2]:
            masks = F.interpolate(masks[None], size=img.shape[:2], mode="nearest")[0]
        image = _resize_crop(img.permute(2, 0, 1), S, "bicubic").clamp(0, 1).permute(1, 2, 0).contiguous()
        masks = (_resize_crop(masks, S, "bilinear") > 0.5).float() if masks.shape[0] else torch.zeros(0, S, S)
        refs = [None] * masks.shape[0]
        for j, p in f.refs.items():
            if j < len(refs):
                refs[j] = load_image(p)
        area = masks.flatten(1).mean(1) if masks.shape[0] else torch.zeros(0)
        keep = [j for j in torch.argsort(area, descending=True).tolist() if area[j] >= self.min_area]
        keep = sorted(keep[: self.max_instances])
        masks = masks[keep] if keep else torch.zeros(0, S, S)
        refs = [refs[j] for j in keep]
        caption = f.caption.read_text(encoding="utf-8").strip() if f.caption is not None else self.default_caption
        return TrainSample(f.name, image, masks, refs, caption, i, key=str(f.image.resolve()))


def collate_samples(samples: list) -> list:
    """DataLoader collate: samples keep their own number of instances (a list, not a tensor)."""
    return list(samples)


# --- a synthetic dataset (tests, smoke runs) -------------------------------------------------------
PALETTE = [(230, 40, 40), (40, 90, 230), (40, 200, 70), (240, 200, 30), (200, 50, 220), (30, 210, 220)]


def make_shapes_dataset(root, count: int, size: int = 256, instances: int = 2, seed: int = 0,
                        with_refs: bool = False, label_png: bool = False) -> Path:
    """Write ``count`` images of coloured shapes (ellipse / rectangle / triangle, one colour per instance,
    on a textured gray background) with their instance masks — the folder format of
    :func:`scan_dataset`. ``label_png`` writes one ``name_labels.png`` instead of ``name_mask<i>.png``;
    ``with_refs`` adds ``name_ref<i>.png`` (an RGBA cut-out of the instance in another pose)."""
    Image = _pil()
    from PIL import ImageDraw
    import numpy as np

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rnd(a, b):
        return a + (b - a) * float(torch.rand((), generator=g))

    def draw_shape(d, kind, box, fill):
        x0, y0, x1, y1 = box
        if kind == 0:
            d.ellipse(box, fill=fill)
        elif kind == 1:
            d.rectangle(box, fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)

    for n in range(count):
        bg = (0.45 + 0.1 * torch.rand(size, size, 1, generator=g) + 0.05 * torch.rand(1, 1, 3, generator=g))
        canvas = Image.fromarray((bg.expand(-1, -1, 3).numpy() * 255).astype(np.uint8))
        d = ImageDraw.Draw(canvas)
        colours = torch.randperm(len(PALETTE), generator=g)[:instances].tolist()
        boxes = []
        for i in range(instances):
            for _ in range(50):
                s = rnd(0.3, 0.48) * size
                x0, y0 = rnd(0, size - s), rnd(0, size - s)
                box = (x0, y0, x0 + s, y0 + s)
                if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                    break
            boxes.append(box)
        labels = np.zeros((size, size), np.uint8)
        for i, (box, c) in enumerate(zip(boxes, colours)):
            kind = int(torch.randint(0, 3, (1,), generator=g))
            m = Image.new("L", (size, size), 0)
            draw_shape(ImageDraw.Draw(m), kind, box, 255)
            draw_shape(d, kind, box, PALETTE[c])
            arr = np.asarray(m) > 127
            labels[arr] = i + 1
            if with_refs:
                rs = size // 2
                ref = Image.new("RGBA", (rs, rs), (0, 0, 0, 0))
                rd = ImageDraw.Draw(ref)
                draw_shape(rd, kind, (rs * 0.1, rs * 0.15, rs * 0.9, rs * 0.85), PALETTE[c] + (255,))
                ref.save(root / f"img{n:03d}_ref{i}.png")
        for i in range(instances):  # masks after all shapes: later shapes may cover earlier ones
            if not label_png:
                Image.fromarray(((labels == i + 1) * 255).astype(np.uint8)).save(root / f"img{n:03d}_mask{i}.png")
        if label_png:
            Image.fromarray(labels).save(root / f"img{n:03d}_labels.png")
        canvas.save(root / f"img{n:03d}.png")
        (root / f"img{n:03d}.txt").write_text(f"{instances} coloured shapes", encoding="utf-8")
    return root


# ================================================================================================
# reference views and augmentation
# ================================================================================================
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


# ================================================================================================
# schedule, targets, losses
# ================================================================================================
def sdxl_alphas_cumprod(timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of SDXL's ε schedule ("scaled linear": β = linspace(√β0, √β1)², 1000 steps), float64 —
    the same ComfyUI's ModelSamplingDiscrete builds (σ_t = √((1 − ᾱ_t)/ᾱ_t))."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = 1 / (1 + σ_t²) (from a ComfyUI model_sampling's ``sigmas``)."""
    return 1.0 / (1.0 + sigmas.double() ** 2)


def instance_index(masks: torch.Tensor, hw: tuple, threshold: float = 0.5) -> torch.Tensor:
    """Whole-instance masks [N, H, W] → the ground-truth route index [h·w] on a layer grid: the instance
    covering the largest part of a cell when that part is ≥ ``threshold``, else the background (N)."""
    n = masks.shape[0]
    h, w = int(hw[0]), int(hw[1])
    if n == 0:
        return torch.zeros(h * w, dtype=torch.long, device=masks.device)
    cov = F.interpolate(masks[None].float(), size=(h, w), mode="area")[0].flatten(1)  # [N, L]
    best, arg = cov.max(0)
    return torch.where(best >= threshold, arg, torch.full_like(arg, n))


def layer_routing_loss(logits: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """L_route of one layer for a group of samples with the same number of routes K:
    :func:`routing_loss` between softmax(logits) [b, K, L] and one-hot(target) (subjects only, 1/N)."""
    K = logits.shape[1]
    return routing_loss(soft_maps(logits), one_hot_maps(target_index, K), K - 1)


def iou_per_subject(pred: torch.Tensor, gt: torch.Tensor, num_subjects: int) -> list:
    """IoU of route i between predicted and ground-truth route indices [L], for the subjects present in
    the ground truth (a subject absent at this grid is skipped)."""
    out = []
    for i in range(num_subjects):
        g = gt == i
        if not bool(g.any()):
            continue
        p = pred == i
        out.append(float((p & g).sum()) / float((p | g).sum()))
    return out


# ================================================================================================
# the adapter: add a trainable router
# ================================================================================================
def attach_router(adapter: AnyStoryAdapter, router_dim: int = 256, router_heads: int = 4, seed: int = 0,
                  init_routing_from_subject: bool = True) -> AnyStoryAdapter:
    """Give ``adapter`` a routing QFormer and per-layer routers (in place) unless it has them, and
    freeze everything else. Returns the adapter (kind native from now on).

    The routing QFormer has the subject QFormer's architecture with one query. With
    ``init_routing_from_subject`` it starts as a copy of the subject QFormer whose single query is the
    mean of the subject queries (R_i then starts as a summary of E_i, not noise). Routers start with
    PyTorch's default init except ``refine_out`` = 0 (the refinement starts as the identity).
    Trainables are float32."""
    if not adapter.has_router:
        sp = adapter.subject_proj
        cfg = dict(sp.config, num_queries=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rp = Resampler(**cfg)
            if init_routing_from_subject:
                sd = {k: v.detach().float().clone() for k, v in sp.state_dict().items()}
                sd["latents"] = sd["latents"].mean(1, keepdim=True)
                rp.load_state_dict(sd)
            route_dim = sp.output_dim
            router = nn.ModuleDict({str(n): LayerRouter(c, route_dim, router_dim, router_heads)
                                    for n, c in sorted(adapter.layer_dims.items())})
            for r in router.values():
                nn.init.zeros_(r.refine_out.weight)
                nn.init.zeros_(r.refine_out.bias)
        dev = sp.proj_in.weight.device
        adapter.routing_proj = rp.to(dev)
        adapter.router = router.to(dev)
        adapter.router_dim = router_dim
        adapter.router_heads = router_heads
        if adapter.kind != KIND_NATIVE:
            adapter.meta = dict(adapter.meta, derived_from=adapter.kind)
            adapter.kind = KIND_NATIVE
    adapter.requires_grad_(False)
    adapter.routing_proj.float().requires_grad_(True)
    adapter.router.float().requires_grad_(True)
    return adapter


def trainable_state(adapter: AnyStoryAdapter) -> dict:
    """The trained part of the adapter (routing_proj.* + router.*), detached CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()
            if k.startswith(("routing_proj.", "router."))}


def export_adapter(adapter: AnyStoryAdapter, dtype: Optional[torch.dtype] = None) -> AnyStoryAdapter:
    """A CPU copy of the adapter for :func:`anystory.checkpoint.save_adapter`, all in one dtype
    (default: the subject QFormer's, e.g. fp16 for an IP-Adapter file)."""
    dtype = dtype or adapter.subject_proj.proj_in.weight.dtype
    out = copy.deepcopy(adapter).to("cpu", dtype).eval().requires_grad_(False)
    return out


# ================================================================================================
# the training-mode UNet hooks (ComfyUI's transformer_options protocol, duck-typed)
# ================================================================================================
@dataclass
class RouteGroup:
    """Rows of the batch with the same number of routes K = N+1 (last = background)."""

    rows: torch.Tensor          # [b] long
    E: torch.Tensor             # [b, K, m, 2048] (frozen)
    R: torch.Tensor             # [b, K, 2048] (trainable graph)
    masks: Optional[list]       # b × [N, H, W] instance masks, or None
    full: bool = False          # rows == all rows in order

    @property
    def K(self) -> int:
        return self.E.shape[1]


class RoutingState:
    """Per UNet call: the routes of every row and what the layers computed (maps for eq. 5, routing
    losses, and in eval mode the predicted / ground-truth route index per layer)."""

    def __init__(self, E: list, R: list, masks: Optional[list], mode: str = "train", tau: float = 1.0,
                 eta: float = 1.0):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.mode = mode
        self.tau = float(tau)
        self.eta = float(eta)
        self.batch = len(E)
        by_k: dict[int, list] = {}
        for b, e in enumerate(E):
            by_k.setdefault(e.shape[0], []).append(b)
        self.groups: list[RouteGroup] = []
        for K, rows in sorted(by_k.items()):
            r = torch.tensor(rows, dtype=torch.long, device=E[0].device)
            self.groups.append(RouteGroup(r, torch.stack([E[b] for b in rows]), torch.stack([R[b] for b in rows]),
                                          [masks[b] for b in rows] if masks is not None else None,
                                          full=rows == list(range(self.batch))))
        self.order = torch.cat([g.rows for g in self.groups])
        self.inverse = torch.argsort(self.order)
        self.maps: dict = {}
        self.losses: dict = {}
        self.pred: dict = {}        # key → (hw, pred [B, L], gt [B, L] or None, K per row)
        self._targets: dict = {}
        self._kv: dict = {}

    def targets(self, gi: int, hw: tuple, device) -> Optional[torch.Tensor]:
        g = self.groups[gi]
        if g.masks is None:
            return None
        key = (gi, tuple(hw))
        hit = self._targets.get(key)
        if hit is None:
            hit = torch.stack([instance_index(m.to(device), hw) for m in g.masks])
            self._targets[key] = hit
        return hit

    def gather(self, x: torch.Tensor, gi: int) -> torch.Tensor:
        g = self.groups[gi]
        return x if g.full else x.index_select(0, g.rows.to(x.device))

    def scatter(self, parts: list) -> torch.Tensor:
        if len(parts) == 1 and self.groups[0].full:
            return parts[0]
        return torch.cat(parts).index_select(0, self.inverse.to(parts[0].device))

    def routing_loss(self) -> torch.Tensor:
        """Mean over layers of the per-layer routing loss (0 when no layer had masks)."""
        if not self.losses:
            return torch.zeros(())
        return torch.stack([v.float() for v in self.losses.values()]).mean()


def _key(extra_options) -> tuple:
    b = extra_options["block"]
    return (b[0], b[1], extra_options.get("block_index", 0))


class TrainRouterPatch:
    """attn2_patch: the router of layer l on n = norm2(x) → logits → σ(M^l) (Gumbel hard maps in training,
    one-hot argmax in eval) stored in the state for the attn2 replace; routing loss of the layer."""

    def __init__(self, adapter: AnyStoryAdapter, layout: LayerLayout):
        self.adapter = adapter
        self.layout = layout

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        state: Optional[RoutingState] = extra_options.get(STATE_KEY)
        if state is None or "block" not in extra_options:
            return n, context, value
        key = _key(extra_options)
        spec = self.layout.get(key)
        shape = extra_options.get("activations_shape")
        if spec is None or shape is None:
            return n, context, value
        hw = (int(shape[-2]), int(shape[-1]))
        if hw[0] * hw[1] != n.shape[1] or n.shape[0] != state.batch:
            raise RuntimeError(f"AnyStory training: layer {key} got {n.shape[0]}×{n.shape[1]} tokens, expected "
                               f"{state.batch}×{hw[0] * hw[1]} (another patch re-tiles tokens?)")
        router = self.adapter.router[str(spec.ckpt_index)]
        maps, loss, preds, gts = [], n.new_zeros((), dtype=torch.float32), [], []
        with_loss = False
        for gi, g in enumerate(state.groups):
            z = state.gather(n, gi)
            logits = router(z, g.R)                                   # [b, K, L] fp32
            if state.mode == "train":
                m = gumbel_maps(logits, tau=state.tau, hard=True)
            else:
                m = one_hot_maps(logits.argmax(1), g.K)
            maps.append(m)
            tgt = state.targets(gi, hw, n.device)
            if tgt is not None:
                loss = loss + layer_routing_loss(logits, tgt) * g.rows.numel()
                with_loss = True
            if state.mode == "eval":
                preds.append(logits.argmax(1))
                gts.append(tgt)
        state.maps[key] = maps
        if with_loss:
            state.losses[key] = loss / state.batch
        if state.mode == "eval":
            pred = state.scatter(preds)
            gt = state.scatter(gts) if all(t is not None for t in gts) else None
            ks = torch.empty(state.batch, dtype=torch.long)
            for g in state.groups:
                ks[g.rows.cpu()] = g.K
            state.pred[key] = (hw, pred, gt, ks)
        return n, context, value


class TrainRoutedAttn2:
    """attn2 replace: text attention + η·Σ_i σ(M_i) ⊙ Attn(Q, E_i Ŵ_k, E_i Ŵ_v) (eq. 5, the sum form,
    differentiable in the maps). Ŵ and E are frozen; the gradient reaches the router through the maps."""

    def __init__(self, adapter: AnyStoryAdapter, spec):
        self.adapter = adapter
        self.spec = spec

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        out = sdpa(q, k, v, heads)
        state: Optional[RoutingState] = extra_options.get(STATE_KEY)
        if state is None or self.spec.key not in state.maps:
            return out
        maps = state.maps[self.spec.key]
        kv = state._kv.get(self.spec.key)
        if kv is None:
            ip = self.adapter.ip_adapter[str(self.spec.ckpt_index)]
            kv = []
            with torch.no_grad():
                for g in state.groups:
                    E = g.E.to(ip.to_k_ip.weight.dtype)
                    kv.append((ip.to_k_ip(E), ip.to_v_ip(E)))                  # [b, K, m, C]
            state._kv[self.spec.key] = kv
        parts = []
        for gi, (m, (kr, vr)) in enumerate(zip(maps, kv)):
            qg = state.gather(q, gi)
            parts.append(routed_cross_attention_sum(qg, kr.to(q.dtype), vr.to(q.dtype), m, heads, eta=state.eta))
        return out + state.scatter(parts).to(out.dtype)


def transformer_options(patch: TrainRouterPatch, replaces: dict, state: RoutingState) -> dict:
    """ComfyUI's transformer_options for one UNet call with the training hooks."""
    return {"patches": {"attn2_patch": [patch]}, "patches_replace": {"attn2": dict(replaces)}, STATE_KEY: state}


# ================================================================================================
# gradient checkpointing of a ComfyUI/ldm UNet (no change to ComfyUI: instance-level forward wrappers)
# ================================================================================================
CHECKPOINTED_MODULES = ("SpatialTransformer", "ResBlock")


def _checkpointed(fn, copy_options: bool):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if copy_options:  # SpatialTransformer(x, context, transformer_options): freeze block/index for recompute
            if len(args) >= 3:
                args = tuple(args[:2]) + (dict(args[2]),) + tuple(args[3:])
            elif "transformer_options" in kwargs:
                kwargs = dict(kwargs, transformer_options=dict(kwargs["transformer_options"]))
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def gradient_checkpointing(unet: nn.Module, enabled: bool = True, modules: Sequence[str] = CHECKPOINTED_MODULES):
    """Recompute the activations of every SpatialTransformer and ResBlock of ``unet`` in the backward pass
    (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so the Gumbel noise is replayed).
    ComfyUI's BasicTransformerBlock ignores its ``checkpoint`` flag and ResBlock's own flag takes the
    frozen parameters as inputs of a re-entrant function, so the wrappers are put on the module
    instances for the duration of the ``with`` block, then removed."""
    if not enabled:
        yield
        return
    done = []
    for m in unet.modules():
        name = type(m).__name__
        if name in modules:
            had = "forward" in m.__dict__
            old = m.__dict__.get("forward")
            m.forward = _checkpointed(m.forward, copy_options=name == "SpatialTransformer")
            done.append((m, had, old))
    try:
        yield
    finally:
        for m, had, old in done:
            if had:
                m.forward = old
            else:
                del m.forward


# ================================================================================================
# configuration, batch, the trainer module
# ================================================================================================
@dataclass
class TrainConfig:
    lr: float = 1e-4
    routing_proj_lr: Optional[float] = None   # learning rate of the routing QFormer (None: lr)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    routing_weight: float = 0.1           # λ
    tau: float = 1.0                      # Gumbel-softmax temperature
    eta: float = 1.0                      # η of eq. 5 during training
    grad_clip: float = 1.0
    mixed_precision: str = "no"           # "no" | "bf16" | "fp16"
    grad_checkpointing: bool = False
    prediction: str = "eps"               # "eps" | "v"
    timestep_range: tuple = (0, 1000)
    seed: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["timestep_range"] = list(self.timestep_range)
        return d


AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Encoders:
    """The frozen encoders, as callables (no_grad is applied by the caller).

    clip: images [B, 224, 224, 3] in 0..1 → CLIP-H penultimate hidden states [B, 257, 1280];
    vae: images [B, H, W, 3] in 0..1 → latents [B, 4, H/8, W/8] already scaled for the UNet;
    text: (captions, (H, W)) → (context [B, 77, 2048], y [B, adm] or None)."""

    clip: Callable
    vae: Optional[Callable] = None
    text: Optional[Callable] = None
    _bg: Optional[torch.Tensor] = None

    def background(self) -> torch.Tensor:
        """F_clip of the all-zero image (the background route), computed once."""
        if self._bg is None:
            with torch.no_grad():
                self._bg = self.clip(torch.zeros(1, CLIP_SIZE, CLIP_SIZE, 3)).detach()
        return self._bg


@dataclass
class BatchInputs:
    x0: torch.Tensor                 # [B, 4, h, w]
    context: torch.Tensor            # [B, T, 2048]
    y: Optional[torch.Tensor]        # [B, adm]
    clip_feats: list                 # B × [N_b, 257, D]
    clip_bg: torch.Tensor            # [1, 257, D]
    masks: list                      # B × [N_b, H, W]
    names: list

    def to(self, device) -> "BatchInputs":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BatchInputs(mv(self.x0), mv(self.context), mv(self.y), [mv(f) for f in self.clip_feats],
                           mv(self.clip_bg), [mv(m) for m in self.masks], list(self.names))


@torch.no_grad()
def encode_targets(samples: Sequence[TrainSample], encoders: Encoders, cache: Optional[dict] = None) -> list:
    """(latent [4, h, w], context [T, 2048], y [adm] or None) per sample, from ``cache`` (keyed by sample.key)
    or the frozen VAE/text encoders (then stored in the cache). CPU tensors."""
    cache = {} if cache is None else cache
    todo = [s for s in samples if s.key not in cache]
    if todo:
        if encoders.vae is None or encoders.text is None:
            raise ValueError("encode_targets needs encoders.vae and encoders.text (or a filled cache)")
        lat = encoders.vae(torch.stack([s.image for s in todo])).detach().float().cpu()
        H, W = todo[0].image.shape[:2]
        ctx, y = encoders.text([s.caption for s in todo], (H, W))
        for i, s in enumerate(todo):
            cache[s.key] = (lat[i], ctx[i].detach().cpu(), None if y is None else y[i].detach().cpu())
    return [cache[s.key] for s in samples]


@torch.no_grad()
def prepare_batch(samples: Sequence[TrainSample], encoders: Encoders, gen: Optional[torch.Generator] = None,
                  augment: bool = True, aug: AugmentConfig = AugmentConfig(),
                  cache: Optional[dict] = None) -> BatchInputs:
    """Everything the trainer needs for a batch, from the frozen encoders: latents and text conditioning
    (cached per sample name), the instances' reference views through CLIP (augmented in training), the
    background route's CLIP features and the instance masks."""
    cache = {} if cache is None else cache
    enc = encode_targets(samples, encoders, cache)
    views = [reference_views(s, gen, augment, aug) for s in samples]
    counts = [v.shape[0] for v in views]
    allv = torch.cat(views) if sum(counts) else None
    feats = encoders.clip(allv).detach() if allv is not None else None
    per, o = [], 0
    bg = encoders.background()
    for c in counts:
        per.append(feats[o:o + c] if c else bg.new_zeros(0, *bg.shape[1:]))
        o += c
    y = None if enc[0][2] is None else torch.stack([e[2] for e in enc])
    return BatchInputs(torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc]), y, per, bg,
                       [s.masks for s in samples], [s.name for s in samples])


class RouterTrainer(nn.Module):
    """The trainable part (routing QFormer + routers, registered as submodules: what DDP synchronises)
    and a reference to the frozen UNet and adapter. ``forward(batch)`` = one UNet call with routing
    active + losses; returns ``{"loss", "diffusion", "routing", "state"}``."""

    def __init__(self, unet: nn.Module, adapter: AnyStoryAdapter, config: TrainConfig = TrainConfig(),
                 alphas_cumprod: Optional[torch.Tensor] = None, layout: Optional[LayerLayout] = None):
        super().__init__()
        if not adapter.has_router:
            raise ValueError("RouterTrainer needs an adapter with a router: call attach_router(adapter) first")
        self.routing_proj = adapter.routing_proj
        self.router = adapter.router
        self._frozen = (unet, adapter)          # a tuple: not registered (DDP must not touch them)
        self.config = config
        self.layout = layout or discover_layout(unet)
        adapter.check_layout(self.layout, "the UNet")
        ac = alphas_cumprod if alphas_cumprod is not None else sdxl_alphas_cumprod()
        self.register_buffer("alphas_cumprod", ac.double().clone(), persistent=False)
        self.patch = TrainRouterPatch(adapter, self.layout)
        self.replaces = {spec.key: TrainRoutedAttn2(adapter, spec) for spec in self.layout}

    @property
    def unet(self) -> nn.Module:
        return self._frozen[0]

    @property
    def adapter(self) -> AnyStoryAdapter:
        return self._frozen[1]

    def encode_routes(self, clip_feats: list, clip_bg: torch.Tensor) -> tuple:
        """Per sample E [N_b+1, m, 2048] (frozen subject QFormer, no grad) and R [N_b+1, 2048] (routing
        QFormer, with grad); the last route is the background (all-zero image)."""
        counts = [f.shape[0] for f in clip_feats]
        x = torch.cat(list(clip_feats) + [clip_bg.to(clip_feats[0] if clip_feats else clip_bg)], 0)
        sp = self.adapter.subject_proj
        with torch.no_grad():
            E_all = sp(x.to(sp.proj_in.weight.dtype))
        R_all = self.routing_proj(x.to(self.routing_proj.proj_in.weight.dtype))[:, 0]
        E, R, o = [], [], 0
        for c in counts:
            E.append(torch.cat([E_all[o:o + c], E_all[-1:]]))
            R.append(torch.cat([R_all[o:o + c], R_all[-1:]]))
            o += c
        return E, R

    def _autocast(self, device):
        dt = AUTOCAST[self.config.mixed_precision]
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=dt)

    def forward(self, batch: BatchInputs, t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                mode: str = "train") -> dict:
        cfg = self.config
        unet = self.unet
        x0 = batch.x0
        dev = x0.device
        B = x0.shape[0]
        if noise is None:
            noise = torch.randn_like(x0, dtype=torch.float32)
        if t is None:
            lo, hi = cfg.timestep_range
            t = torch.randint(int(lo), int(hi), (B,), device=dev)
        t = t.to(dev).long()
        ac = self.alphas_cumprod.to(dev)[t].float().view(B, 1, 1, 1)
        x_t = ac.sqrt() * x0.float() + (1 - ac).sqrt() * noise.float()
        target = noise.float() if cfg.prediction == "eps" else ac.sqrt() * noise.float() - (1 - ac).sqrt() * x0.float()
        wdtype = next(unet.parameters()).dtype
        with self._autocast(dev):
            E, R = self.encode_routes(batch.clip_feats, batch.clip_bg)
            state = RoutingState(E, R, batch.masks, mode=mode, tau=cfg.tau, eta=cfg.eta)
            opts = transformer_options(self.patch, self.replaces, state)
            y = batch.y.to(wdtype) if batch.y is not None else None
            with gradient_checkpointing(unet, cfg.grad_checkpointing and torch.is_grad_enabled()):
                pred = unet(x_t.to(wdtype), timesteps=t.float(), context=batch.context.to(wdtype), y=y,
                            transformer_options=opts)
        diffusion = F.mse_loss(pred.float(), target)
        routing = state.routing_loss().to(diffusion)
        loss = diffusion + cfg.routing_weight * routing
        return {"loss": loss, "diffusion": diffusion.detach(), "routing": routing.detach(), "state": state}


def make_optimizer(trainer: RouterTrainer, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainables: the routers at ``lr``, the routing QFormer at ``routing_proj_lr``."""
    qf = [p for p in trainer.routing_proj.parameters() if p.requires_grad]
    rt = [p for p in trainer.router.parameters() if p.requires_grad]
    qlr = config.lr if config.routing_proj_lr is None else config.routing_proj_lr
    return torch.optim.AdamW([{"params": rt, "lr": config.lr, "base_lr": config.lr, "name": "router"},
                              {"params": qf, "lr": qlr, "base_lr": qlr, "name": "routing_proj"}],
                             lr=config.lr, weight_decay=config.weight_decay)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The RNG seed of one (step, rank): noise, timesteps, Gumbel noise and augmentation are drawn from
    it, so a resumed run continues exactly as an uninterrupted one, and ranks draw differently."""
    return (int(seed) * 1_000_003 + int(step) * 7919 + int(rank) * 104_729) % (2 ** 62)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: BatchInputs, config: TrainConfig,
               step: int, scaler=None) -> dict:
    """One optimisation step on ``model`` (a :class:`RouterTrainer` or its DDP wrapper): forward, backward
    (through ``scaler`` for fp16), clip, AdamW step with linear warm-up. Returns float losses and the
    gradient norm."""
    scale = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", config.lr) * scale
    lr = config.lr * scale
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    loss = out["loss"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {"loss": float(loss.detach()), "diffusion": float(out["diffusion"]), "routing": float(out["routing"]),
            "grad_norm": float(gn), "lr": lr}


# ================================================================================================
# resumable training state
# ================================================================================================
def save_training_state(path, adapter: AnyStoryAdapter, optimizer: torch.optim.Optimizer, step: int,
                        config: Optional[TrainConfig] = None, scaler=None, extra: Optional[dict] = None) -> None:
    """Write {routing_proj, router, optimizer, step, scaler, config, rng} with ``torch.save`` (tensors and
    plain Python values only — :func:`load_training_state` reads it with ``weights_only=True``),
    atomically (temp file + rename)."""
    sd = trainable_state(adapter)
    state = {
        "format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, "step": int(step),
        "routing_proj": {k[len("routing_proj."):]: v for k, v in sd.items() if k.startswith("routing_proj.")},
        "router": {k[len("router."):]: v for k, v in sd.items() if k.startswith("router.")},
        "router_dim": int(adapter.router_dim), "router_heads": int(adapter.router_heads),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": config.as_dict() if config is not None else {},
        "rng": {"torch": torch.get_rng_state(), "scheme": "per-step seeds (step_seed)",
                "seed": int(config.seed) if config is not None else 0},
        "extra": dict(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path) -> dict:
    """Read a training state written by :func:`save_training_state` (``weights_only=True``)."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path} is not an AnyStory router training state (format {TRAIN_STATE_FORMAT})")
    if int(state.get("version", 0)) > TRAIN_STATE_VERSION:
        raise ValueError(f"{path}: training state version {state['version']} is newer than this code "
                         f"({TRAIN_STATE_VERSION})")
    return state


def restore_training_state(state: dict, adapter: AnyStoryAdapter, optimizer: Optional[torch.optim.Optimizer] = None,
                           scaler=None) -> int:
    """Load the trained weights (and optimizer / scaler) from ``state`` into a router-attached adapter;
    returns the step to continue from."""
    if (int(state["router_dim"]), int(state["router_heads"])) != (adapter.router_dim, adapter.router_heads):
        raise ValueError(f"the training state has router_dim={state['router_dim']} heads={state['router_heads']}, "
                         f"the adapter {adapter.router_dim}/{adapter.router_heads}")
    adapter.routing_proj.load_state_dict(state["routing_proj"])
    adapter.router.load_state_dict(state["router"])
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


# ================================================================================================
# data order (epochs over a DistributedSampler, resumable by step)
# ================================================================================================
class StepBatches:
    """Batches of dataset indices for steps ``start, start+1, …``: epoch e is a DistributedSampler
    permutation (seed, epoch; this rank's share), cut into batches of ``batch_size`` (the last,
    incomplete one dropped). Step s is batch s mod per_epoch of epoch s // per_epoch, so resuming at a
    step gives exactly the data an uninterrupted run would have seen."""

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        from torch.utils.data import DistributedSampler

        class _Len:
            def __len__(self):
                return dataset_len

        self.sampler = DistributedSampler(_Len(), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=False)
        self.batch_size = int(batch_size)
        per_rank = len(self.sampler)
        if per_rank < self.batch_size:
            raise DatasetError(f"{dataset_len} training image(s) over {world_size} process(es) give {per_rank} per "
                               f"process, fewer than the batch size {self.batch_size}")
        self.per_epoch = per_rank // self.batch_size

    def batch(self, step: int) -> list:
        epoch, b = divmod(int(step), self.per_epoch)
        self.sampler.set_epoch(epoch)
        idx = list(iter(self.sampler))
        return idx[b * self.batch_size:(b + 1) * self.batch_size]


# ================================================================================================
# evaluation: routing IoU per layer group
# ================================================================================================
_SIDE = {"input": "down", "middle": "mid", "output": "up"}


def layer_group(key: tuple, hw: tuple, latent_hw: tuple) -> str:
    """"down 1/2", "mid 1/4", "up 1/4", … (UNet side and the layer grid's scale to the latent)."""
    ratio = max(1, round(latent_hw[0] / max(1, hw[0])))
    return f"{_SIDE.get(key[0], key[0])} 1/{ratio}"


@dataclass
class RoutingEval:
    """Per-instance routing IoUs of the predicted (argmax) maps against the ground-truth instance masks,
    per layer; groups: layer group → mean IoU (and the number of layers); mean: over every entry."""

    per_layer: dict = field(default_factory=dict)   # key → list of IoUs
    groups: dict = field(default_factory=dict)      # group → (mean IoU, layers, entries)
    group_order: list = field(default_factory=list)
    loss: dict = field(default_factory=dict)        # mean diffusion / routing / total loss (eval maps)

    @property
    def mean(self) -> float:
        vals = [v for vs in self.per_layer.values() for v in vs]
        return sum(vals) / len(vals) if vals else float("nan")

    def as_dict(self) -> dict:
        return {"mean_iou": self.mean, "groups": {g: {"iou": m, "layers": n, "entries": e}
                                                  for g, (m, n, e) in self.groups.items()},
                "loss": dict(self.loss)}


@torch.no_grad()
def evaluate_routing(trainer: RouterTrainer, samples: Sequence[TrainSample], encoders: Encoders,
                     timesteps: Sequence[int] = (200, 400, 600), seed: int = 0, batch_size: int = 1,
                     cache: Optional[dict] = None, device=None) -> RoutingEval:
    """Routing IoU of ``trainer``'s router on held-out samples: for each sample and each timestep, the
    target latent is noised (fixed noise from ``seed``), the UNet runs with the router in inference mode
    (one-hot argmax maps), and at every layer each instance's predicted region is compared with its
    mask on that layer's grid. Reference views are un-augmented crops (or the given references), as the
    encode node would prepare them. Also returns the mean losses of these passes."""
    device = device or trainer.alphas_cumprod.device
    per_layer: dict = {}
    group_of: dict = {}
    order: list = []
    sums = {"diffusion": 0.0, "routing": 0.0, "loss": 0.0}
    count = 0
    for b0 in range(0, len(samples), batch_size):
        chunk = list(samples[b0:b0 + batch_size])
        batch = prepare_batch(chunk, encoders, None, augment=False, cache=cache).to(device)
        latent_hw = tuple(batch.x0.shape[-2:])
        for ti, t in enumerate(timesteps):
            g = torch.Generator().manual_seed(step_seed(seed, b0, ti))
            noise = torch.randn(batch.x0.shape, generator=g).to(device)
            tt = torch.full((len(chunk),), int(t), dtype=torch.long, device=device)
            out = trainer(batch, t=tt, noise=noise, mode="eval")
            for k in sums:
                sums[k] += float(out[k])
            count += 1
            for key, (hw, pred, gt, ks) in out["state"].pred.items():
                if gt is None:
                    continue
                if key not in group_of:
                    group_of[key] = layer_group(key, hw, latent_hw)
                    if group_of[key] not in order:
                        order.append(group_of[key])
                lst = per_layer.setdefault(key, [])
                for r in range(pred.shape[0]):
                    lst.extend(iou_per_subject(pred[r].cpu(), gt[r].cpu(), int(ks[r]) - 1))
    groups = {}
    for gname in order:
        keys = [k for k in per_layer if group_of[k] == gname]
        vals = [v for k in keys for v in per_layer[k]]
        groups[gname] = (sum(vals) / len(vals) if vals else float("nan"), len(keys), len(vals))
    return RoutingEval(per_layer, groups, order, {k: v / max(1, count) for k, v in sums.items()})


def format_iou_table(results: dict, title: str = "routing IoU (per instance, mean over held-out images × timesteps)") -> str:
    """A text table: rows = layer groups (+ "all"), one column per named :class:`RoutingEval`."""
    names = list(results)
    order: list = []
    for ev in results.values():
        for g in ev.group_order:
            if g not in order:
                order.append(g)
    first = next(iter(results.values()))
    w0 = max([len("group"), len("all")] + [len(g) for g in order]) + 2
    cols = [max(9, len(n) + 2) for n in names]
    head = "group".ljust(w0) + "layers".rjust(7) + "".join(n.rjust(c) for n, c in zip(names, cols))
    lines = [title, head, "-" * len(head)]
    for g in order:
        n_layers = first.groups.get(g, (0, 0, 0))[1]
        row = g.ljust(w0) + str(n_layers).rjust(7)
        for n, c in zip(names, cols):
            v = results[n].groups.get(g, (float("nan"),))[0]
            row += f"{v:.3f}".rjust(c)
        lines.append(row)
    lines.append("-" * len(head))
    row = "all".ljust(w0) + str(sum(first.groups.get(g, (0, 0, 0))[1] for g in order)).rjust(7)
    for n, c in zip(names, cols):
        row += f"{results[n].mean:.3f}".rjust(c)
    lines.append(row)
    return "\n".join(lines)
