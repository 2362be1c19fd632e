"""Training data: a folder of target images with whole-instance masks, read as :class:`TrainSample`.

The routing supervision of AnyStory's router training is the whole-instance mask of each subject i in a
target image (it becomes the ground-truth route of every cell of layer l's grid, against which the router's
refined map M_i^l is trained; the background is route N+1). Here: the folder format and its scan
(:func:`scan_dataset`), the image / mask / instance-id label readers, :class:`InstanceDataset` (square
crops at the training resolution, largest instances kept) and a synthetic coloured-shapes folder
(:func:`make_shapes_dataset`) for tests and smoke runs. PIL and numpy are imported when a file is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """A training folder that cannot be used, with what was found and how to fix it."""


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


def _classify(root: Path) -> tuple[dict, list]:
    """The folder's files: ({stem: SampleFiles} of the target images, [(stem, kind, index, path)] of the
    masks, label images, reference crops and captions)."""
    by_stem: dict[str, SampleFiles] = {}
    extra: list[tuple[str, str, Optional[int], Path]] = []
    for p in sorted(p for p in root.iterdir() if p.is_file()):
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
    return by_stem, extra


def _attach(by_stem: dict, extra: list, root: Path) -> dict:
    """Give each target its caption, label image and reference crops; returns {stem: {i: mask path}}."""
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
    return masks


def _set_masks(s: SampleFiles, ms: dict) -> None:
    """``s.masks`` from its numbered mask files ``ms`` ({i: path}), checked against its labels and refs."""
    stem = s.name
    if ms and s.labels is not None:
        raise DatasetError(f"{stem}: give either {stem}_mask<i>.png files or one {stem}_labels.png, not both")
    if ms:
        want = list(range(len(ms)))
        if sorted(ms) != want:
            raise DatasetError(f"{stem}: mask files must be numbered 0…{len(ms) - 1} without gaps, found "
                               f"{sorted(ms)}")
        s.masks = [ms[i] for i in want]
    if s.masks:
        n = len(s.masks)
        bad = [i for i in s.refs if i >= n]
        if bad:
            raise DatasetError(f"{stem}: reference crop(s) {bad} have no instance mask (instances 0…{n - 1})")


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
    by_stem, extra = _classify(root)
    masks = _attach(by_stem, extra, root)
    out, missing = [], []
    for stem, s in sorted(by_stem.items()):
        _set_masks(s, masks.get(stem, {}))
        if not s.masks and s.labels is None:
            missing.append(s.image.name)
            continue
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


# --- a synthetic dataset (tests, smoke runs) -------------------------------------------------------
PALETTE = [(230, 40, 40), (40, 90, 230), (40, 200, 70), (240, 200, 30), (200, 50, 220), (30, 210, 220)]


def make_shapes_dataset(root, count: int, size: int = 256, instances: int = 2, seed: int = 0,
                        with_refs: bool = False, label_png: bool = False) -> Path:
    """Write ``count`` images of coloured shapes (ellipse / rectangle / triangle, one colour per instance,
    on a textured gray background) with their instance masks — the folder format of
    :func:`scan_dataset`. ``label_png`` writes one ``name_labels.png`` instead of ``name_mask<i>.png``;
    ``with_refs`` adds ``name_ref<i>.png`` (an RGBA cut-out of the instance in another pose)."""
    Image = _pil()
    import numpy as np
    from PIL import ImageDraw

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
