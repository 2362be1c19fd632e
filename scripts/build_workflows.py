#!/usr/bin/env python3
"""Write the shipped templates in example_workflows/: UI format (ComfyUI's template browser serves a custom
node pack's example_workflows/*.json, with a same-name .jpg as thumbnail; drag-and-drop works too) and API
format (example_workflows/api/, for POST /prompt), both from one description per graph, so the two never drift.

    python scripts/build_workflows.py            # rewrite example_workflows/*.json and example_workflows/api/*.json

Everything a template names is data at the top of this file: the files (FILES, the names the public
downloads have), the node types (WIDGETS: widget order per type = ComfyUI's INPUT_TYPES order, plus the
editor-only "control_after_generate" after a seed and LoadImage's "upload"; tests/nodes check it against a
live server's /object_info), the per-node defaults (APPLY_DEFAULTS, FLUX_OPTIONS, …) and the templates
(TEMPLATES: file name → builder). Changing a node's inputs = edit WIDGETS (+ the defaults), rebuild.

Layout: each builder puts nodes in columns (``col``) and optionally next to another node (``align``); the
positions and sizes come from :func:`layout` — sizes fitted to the widgets' text (no clipped "mo…"), room
for the title bar and the badge above it, and for what the web extension draws after a run (the Apply
node's routing panel, the loader's info text, the Routing Preview's grid). :meth:`Graph.overlaps` checks it
(tests/test_workflows.py).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "example_workflows"

# ------------------------------------------------------------------------------------------------
# files: the names the public downloads have (scripts/demo.py and the tests map them to random stand-ins)
# ------------------------------------------------------------------------------------------------
CKPT = "sd_xl_base_1.0.safetensors"                                # models/checkpoints
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"       # models/clip_vision
IPADAPTER = "ip-adapter-plus_sdxl_vit-h.safetensors"              # models/ipadapter (or models/anystory)
ROUTER = "anystory_sdxl_router.safetensors"                       # models/anystory: written by scripts/train_router.py
ANYSTORY = "anystory_sdxl.safetensors"                            # AnyStory's own SDXL file: not public (no template)
REFNET = "anystory_sdxl_refnet.safetensors"                       # its ReferenceNet: not public (no template)
FLUX_UNET = "flux1-dev.safetensors"                               # models/diffusion_models (or unet)
FLUX_VAE = "ae.safetensors"                                       # models/vae
CLIP_L = "clip_l.safetensors"                                     # models/text_encoders (or clip)
T5XXL = "t5xxl_fp16.safetensors"                                  # models/text_encoders (or clip)
SIGLIP = "sigclip_vision_patch14_384.safetensors"                 # models/clip_vision
REDUX = "flux1-redux-dev.safetensors"                             # models/style_models
ANYSTORY_FLUX = "anystory_flux.bin"                               # models/anystory (github junjiehe96/AnyStory)
SUBJECT_A = "anystory_subject_fox.png"                            # assets/subjects → input/ (nodes/examples.py)
SUBJECT_B = "anystory_subject_robot.png"

# the public file set: every template but the trained-router one runs on these alone
PUBLIC_FILES = {"checkpoints": [CKPT], "clip_vision": [CLIP_VISION, SIGLIP], "ipadapter": [IPADAPTER],
                "diffusion_models": [FLUX_UNET], "vae": [FLUX_VAE], "text_encoders": [CLIP_L, T5XXL],
                "style_models": [REDUX], "anystory": [ANYSTORY_FLUX]}

# ------------------------------------------------------------------------------------------------
# node types: type → (widget names in order, outputs (name, type), input sockets (name, type) in order)
# ------------------------------------------------------------------------------------------------
WIDGETS = {
    "CheckpointLoaderSimple": (["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], []),
    "CLIPVisionLoader": (["clip_name"], [("CLIP_VISION", "CLIP_VISION")], []),
    "LoadImage": (["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")], []),
    "InvertMask": ([], [("MASK", "MASK")], [("mask", "MASK")]),
    "CLIPTextEncode": (["text"], [("CONDITIONING", "CONDITIONING")], [("clip", "CLIP")]),
    "EmptyLatentImage": (["width", "height", "batch_size"], [("LATENT", "LATENT")], []),
    "KSampler": (["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")],
                 [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")]),
    "VAEDecode": ([], [("IMAGE", "IMAGE")], [("samples", "LATENT"), ("vae", "VAE")]),
    "SaveImage": (["filename_prefix"], [], [("images", "IMAGE")]),
    "PreviewImage": ([], [], [("images", "IMAGE")]),
    "MaskToImage": ([], [("IMAGE", "IMAGE")], [("mask", "MASK")]),
    "AnyStoryModelLoader": (["model_name", "refnet_name"], [("anystory", "ANYSTORY"), ("info", "STRING")], []),
    "AnyStorySubjectEncode": (["label", "strength", "reference", "blank_image"],
                              [("subjects", "ANYSTORY_SUBJECTS"), ("subject_crop", "IMAGE")],
                              [("anystory", "ANYSTORY"), ("clip_vision", "CLIP_VISION"), ("vae", "VAE"),
                               ("image", "IMAGE"), ("mask", "MASK"), ("model", "MODEL"),
                               ("subjects", "ANYSTORY_SUBJECTS"), ("style_model", "STYLE_MODEL"),
                               ("conditioning", "CONDITIONING")]),
    "AnyStoryApply": (["router_mode", "subject_strength", "detail_strength", "start_percent", "end_percent",
                       "record_routing", "feather", "region_warmup", "region_threshold", "negative_rows"],
                      [("model", "MODEL"), ("routing", "ANYSTORY_ROUTING")],
                      [("model", "MODEL"), ("anystory", "ANYSTORY"), ("subjects", "ANYSTORY_SUBJECTS"),
                       ("region_masks", "MASK"), ("flux_options", "ANYSTORY_FLUX_OPTIONS")]),
    "AnyStoryFluxOptions": (["redux_scale", "redux_start", "redux_end", "ref_start", "ref_end", "ref_shift",
                             "ref_mask", "router", "ref_cache"], [("flux_options", "ANYSTORY_FLUX_OPTIONS")], []),
    "UNETLoader": (["unet_name", "weight_dtype"], [("MODEL", "MODEL")], []),
    "DualCLIPLoader": (["clip_name1", "clip_name2", "type", "device"], [("CLIP", "CLIP")], []),
    "VAELoader": (["vae_name"], [("VAE", "VAE")], []),
    "StyleModelLoader": (["style_model_name"], [("STYLE_MODEL", "STYLE_MODEL")], []),
    "ModelSamplingFlux": (["max_shift", "base_shift", "width", "height"], [("MODEL", "MODEL")], [("model", "MODEL")]),
    "FluxGuidance": (["guidance"], [("CONDITIONING", "CONDITIONING")], [("conditioning", "CONDITIONING")]),
    "AnyStoryTextEncode": (["text"], [("CONDITIONING", "CONDITIONING")],
                           [("clip", "CLIP"), ("subjects", "ANYSTORY_SUBJECTS")]),
    "AnyStoryRoutingPreview": (["layers", "steps", "mask_steps", "image_index", "cell_size"],
                               [("routing_grid", "IMAGE"), ("subject_masks", "MASK")],
                               [("routing", "ANYSTORY_ROUTING"), ("latent", "LATENT")]),
}
UI_ONLY_WIDGETS = {"control_after_generate", "upload"}
OPTIONAL_SOCKETS = {("AnyStorySubjectEncode", "mask"), ("AnyStorySubjectEncode", "model"),
                    ("AnyStorySubjectEncode", "subjects"), ("AnyStorySubjectEncode", "style_model"),
                    ("AnyStorySubjectEncode", "conditioning"),
                    ("AnyStoryApply", "region_masks"), ("AnyStoryApply", "flux_options")}
ANYSTORY_TYPES = {t for t in WIDGETS if t.startswith("AnyStory")}

# ------------------------------------------------------------------------------------------------
# sizes (the editor's units: LiteGraph 12 px widget text, 20 px slot rows, 20 + 4 px widget rows)
# ------------------------------------------------------------------------------------------------
TITLE_H = 30          # LiteGraph.NODE_TITLE_HEIGHT: drawn above pos
BADGE_H = 24          # a node badge is drawn above the title bar (20 px + gap)
GAP_X, GAP_Y = 50, 30
CHAR_W = 7.0          # a generous average width of a 12 px sans-serif character
WIDGET_PAD = 95       # a combo/number widget's margins, arrows and label-value gap (BaseWidget.drawTruncatingText)
MIN_W = {"InvertMask": 200, "VAEDecode": 200, "MaskToImage": 200, "FluxGuidance": 280, "EmptyLatentImage": 300}
FIXED_H = {  # body heights of nodes whose size is not rows of slots and widgets
    "LoadImage": 340,            # the image preview below the widgets
    "CLIPTextEncode": 150,       # a multi-line text box
    "AnyStoryTextEncode": 150,
    "SaveImage": 300,            # the saved image shows there
    "PreviewImage": 260,
}
MULTILINE = {"CLIPTextEncode", "AnyStoryTextEncode"}  # their text is a text box that wraps: no width needed
# what the web extension (web/anystory.js) adds below a node's widgets after a run: kept free in the layout
APPLY_PANEL = 22 + 192 + 8 + 6      # status line, map, gaps; + 16 per two legend rows (see drawApplyPanel)
LOADER_INFO = 120                     # the loader's info text after a run
SUBJECT_CROP = 240                    # the encode node's subject crop preview (the editor grows the node for it)
PREVIEW_GRID_W, PREVIEW_GRID_H = 500, 640  # the routing grid at cell_size 48, shown at scale 1 (see web/anystory.js)


def _text_w(s) -> float:
    return CHAR_W * len(str(s))


def node_size(ntype: str, values: dict, title: str | None, subjects: int = 2) -> list:
    """[width, body height] for a node: widths fit every widget's label + value and the title."""
    widgets, outputs, sockets = WIDGETS[ntype]
    shown = [w for w in widgets if w not in UI_ONLY_WIDGETS]
    w = MIN_W.get(ntype, 320)
    for name in shown:
        v = values.get(name)
        if isinstance(v, str) and ntype in MULTILINE:
            continue
        w = max(w, WIDGET_PAD + _text_w(name) + _text_w(v if not isinstance(v, float) else f"{v:.2f}"))
    w = max(w, 40 + 8.5 * len(title or ntype))  # 14 px title text
    rows = max(len(sockets), len(outputs))
    h = 20 * rows + 24 * len(widgets) + 16  # control_after_generate and upload are drawn rows too
    h = max(h, FIXED_H.get(ntype, 0))
    if ntype == "AnyStoryApply":
        h += APPLY_PANEL + 16 * math.ceil((subjects + 1) / 2) + 8
    return [int(math.ceil(w / 10) * 10), int(math.ceil(h / 10) * 10)]


def reserved_below(ntype: str) -> int:
    """Height a run may add below the node (kept free in the layout)."""
    return {"AnyStoryModelLoader": LOADER_INFO, "AnyStorySubjectEncode": SUBJECT_CROP}.get(ntype, 0)


def reserved_size(ntype: str, size: list) -> list:
    if ntype == "AnyStoryRoutingPreview":
        return [max(size[0], PREVIEW_GRID_W + 20), size[1] + PREVIEW_GRID_H + 20]
    return [size[0], size[1] + reserved_below(ntype)]


# ------------------------------------------------------------------------------------------------
# graphs
# ------------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, title: str, subjects: int = 2):
        self.title = title
        self.subjects = subjects
        self.nodes: dict[int, dict] = {}

    def add(self, nid: int, ntype: str, col: int, title: str = None, align: int = None, **inputs):
        """A node in layout column ``col`` (below the column's previous node, or level with node ``align``
        when that is lower). inputs: widget values, or (node id, output index) tuples for links."""
        if ntype not in WIDGETS:
            raise KeyError(f"{ntype}: add it to WIDGETS")
        self.nodes[nid] = {"type": ntype, "col": col, "align": align, "inputs": inputs, "title": title}
        return nid

    # --- layout -----------------------------------------------------------------------------------
    def layout(self) -> None:
        """Set every node's pos and size: columns left to right, each as wide as its widest node; in a
        column nodes stack top-down with room for the title bar, the badge and what a run adds."""
        for n in self.nodes.values():
            n["size"] = node_size(n["type"], n["inputs"], n["title"], self.subjects)
            n["reserved"] = reserved_size(n["type"], n["size"])
        cols = sorted({n["col"] for n in self.nodes.values()})
        x = 0
        for c in cols:
            members = [(nid, n) for nid, n in self.nodes.items() if n["col"] == c]
            width = max(n["reserved"][0] for _, n in members)
            y = TITLE_H + BADGE_H
            for nid, n in members:
                top = y
                if n["align"] is not None and "pos" in self.nodes[n["align"]]:
                    top = max(top, self.nodes[n["align"]]["pos"][1])
                n["pos"] = [x, top]
                n["size"][0] = max(n["size"][0], width if n["type"] not in MIN_W else n["size"][0])
                n["reserved"][0] = max(n["reserved"][0], n["size"][0])
                y = top + n["reserved"][1] + GAP_Y + TITLE_H + BADGE_H
            x += width + GAP_X

    def boxes(self, reserved: bool = True) -> dict:
        """node id → (x, y, w, h) on the canvas, title bar and badge included (and the room a run takes)."""
        out = {}
        for nid, n in self.nodes.items():
            w, h = n["reserved"] if reserved else n["size"]
            out[nid] = (n["pos"][0], n["pos"][1] - TITLE_H - BADGE_H, w, h + TITLE_H + BADGE_H)
        return out

    def overlaps(self) -> list:
        """Pairs of node ids whose boxes overlap."""
        return overlapping(self.boxes())

    # --- API format -------------------------------------------------------------------------------
    def api(self) -> dict:
        out = {}
        for nid, n in self.nodes.items():
            inputs = {}
            for k, v in n["inputs"].items():
                if k in UI_ONLY_WIDGETS:
                    continue
                inputs[k] = [str(v[0]), v[1]] if isinstance(v, tuple) else v
            entry = {"class_type": n["type"], "inputs": inputs}
            if n["title"]:
                entry["_meta"] = {"title": n["title"]}
            out[str(nid)] = entry
        return out

    # --- UI (LiteGraph) format --------------------------------------------------------------------
    def ui(self) -> dict:
        if any("pos" not in n for n in self.nodes.values()):
            self.layout()
        links, link_id = [], 0
        ui_nodes = {}
        for order, (nid, n) in enumerate(self.nodes.items()):
            widgets, outputs, sockets = WIDGETS[n["type"]]
            missing = [w for w in widgets if w not in n["inputs"]]
            if missing:
                raise ValueError(f"{self.title}: node {nid} ({n['type']}) lacks widget values {missing}")
            node = {"id": nid, "type": n["type"], "pos": n["pos"], "size": n["size"],
                    "flags": {}, "order": order, "mode": 0, "inputs": [],
                    "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                                for i, (name, t) in enumerate(outputs)],
                    "properties": {"Node name for S&R": n["type"]},
                    "widgets_values": [n["inputs"][w] for w in widgets]}
            if n["title"]:
                node["title"] = n["title"]
            ui_nodes[nid] = node
        for nid, n in self.nodes.items():
            _, _, sockets = WIDGETS[n["type"]]
            for slot, (name, t) in enumerate(sockets):
                src = n["inputs"].get(name)
                entry = {"name": name, "type": t, "link": None}
                if (n["type"], name) in OPTIONAL_SOCKETS:
                    entry["shape"] = 7  # the editor draws optional sockets hollow
                if isinstance(src, tuple):
                    link_id += 1
                    links.append([link_id, src[0], src[1], nid, slot, t])
                    entry["link"] = link_id
                    ui_nodes[src[0]]["outputs"][src[1]]["links"].append(link_id)
                ui_nodes[nid]["inputs"].append(entry)
        return {"last_node_id": max(self.nodes), "last_link_id": link_id, "nodes": list(ui_nodes.values()),
                "links": links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [40, 60]}, "anystory": {"title": self.title}},
                "version": 0.4}


def overlapping(boxes: dict) -> list:
    ids = sorted(boxes)
    out = []
    for i, a in enumerate(ids):
        ax, ay, aw, ah = boxes[a]
        for b in ids[i + 1:]:
            bx, by, bw, bh = boxes[b]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a, b))
    return out


def ui_boxes(ui: dict) -> dict:
    """node id → (x, y, w, h) of a UI-format workflow as the editor draws it: title bar and badge above pos."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_H - BADGE_H, n["size"][0], n["size"][1] + TITLE_H + BADGE_H)
            for n in ui["nodes"]}


# ------------------------------------------------------------------------------------------------
# node defaults
# ------------------------------------------------------------------------------------------------
BLANK_IMAGE = "as trained (model file)"  # AnyStory Subject Encode's default (nodes/sdxl.py BLANK_IMAGE_DEFAULT)
APPLY_DEFAULTS = dict(subject_strength=1.0, detail_strength=1.0, start_percent=0.0, end_percent=1.0,
                      record_routing=True, feather=0, region_warmup=0.1, region_threshold=0.35,
                      negative_rows="background only")
PREVIEW_DEFAULTS = dict(layers="auto", steps="auto", mask_steps="last", image_index=0, cell_size=48)
NEGATIVE = "blurry, low quality, deformed, extra limbs"
TWO_SUBJECTS = "the fox and the robot playing chess in a park, sunny day, detailed illustration"
ONE_SUBJECT = "the fox reading a book in a cozy library, warm light, detailed illustration"
STORY = [
    "the fox and the robot meet on a forest path at dawn",
    "the fox and the robot build a campfire together at night",
    "the fox riding on the shoulders of the robot across a river",
    "the fox and the robot watching the sunrise from a hilltop",
]
FLUX_SIZE, FLUX_STEPS = 512, 25
FLUX_OPTIONS = dict(redux_scale=0.6, redux_start=0.1, redux_end=0.3, ref_start=0.0, ref_end=1.0, ref_shift=0.0,
                    ref_mask=True, router="auto", ref_cache=True)

# columns: 0 loaders + images, 1 mask inverts, 2 subject encodes, 3 prompts + latent + apply,
#          4 sampler(s) + routing preview, 5 decode + mask image, 6 save + mask preview


def _sdxl_loaders(g: Graph, model_name: str):
    g.add(1, "CheckpointLoaderSimple", 0, ckpt_name=CKPT)
    g.add(2, "CLIPVisionLoader", 0, clip_name=CLIP_VISION)
    # refnet none + MODEL connected to the encodes: the SDXL MODEL is the ReferenceNet ("shared")
    g.add(3, "AnyStoryModelLoader", 0, model_name=model_name, refnet_name="none")


def _subject(g: Graph, nid_load: int, image: str, label: str, prev=None, *, clip_vision=2, vae=(1, 2),
             model=(1, 0), style_model=None):
    nid_inv, nid_enc = nid_load + 1, nid_load + 2
    g.add(nid_load, "LoadImage", 0, title=f"Subject: {label}", image=image, upload="image")
    # LoadImage's MASK is 1 on the transparent background: invert so that white = subject
    g.add(nid_inv, "InvertMask", 1, align=nid_load, mask=(nid_load, 1))
    kw = dict(anystory=(3, 0), clip_vision=(clip_vision, 0), vae=vae, image=(nid_load, 0), mask=(nid_inv, 0),
              model=model, label=label, strength=1.0, reference="auto", blank_image=BLANK_IMAGE)
    if style_model is not None:
        kw["style_model"] = (style_model, 0)
    if prev is not None:
        kw["subjects"] = (prev, 0)
    g.add(nid_enc, "AnyStorySubjectEncode", 2, align=nid_load, **kw)
    return nid_enc


def _sdxl_prompts(g: Graph, subjects: int, text: str, width: int, height: int, nid: int = 22, col: int = 3):
    # AnyStory Text Encode marks each subject's label words: the attention router (public files) needs them
    g.add(nid, "AnyStoryTextEncode", col, title="Positive prompt (marks the subjects' words)", clip=(1, 1),
          subjects=(subjects, 0), text=text)
    g.add(20, "CLIPTextEncode", 3, title="Negative prompt", clip=(1, 1), text=NEGATIVE)
    g.add(21, "EmptyLatentImage", 3, width=width, height=height, batch_size=1)


def _render(g: Graph, ks: int, positive: int, prefix: str, seed: int, steps: int, col: int = 4, align=None,
            negative=20, latent=21, vae=(1, 2), cfg=6.0, scheduler="normal", model=(30, 0)):
    g.add(ks, "KSampler", col, align=align, model=model, positive=(positive, 0), negative=(negative, 0),
          latent_image=(latent, 0), seed=seed, control_after_generate="fixed", steps=steps, cfg=cfg,
          sampler_name="euler", scheduler=scheduler, denoise=1.0)
    g.add(ks + 1, "VAEDecode", col + 1, align=ks, samples=(ks, 0), vae=vae)
    g.add(ks + 2, "SaveImage", col + 2, align=ks, images=(ks + 1, 0), filename_prefix=prefix)


def _routing_preview(g: Graph, col: int = 4):
    g.add(50, "AnyStoryRoutingPreview", col, routing=(30, 1), latent=(40, 0), **PREVIEW_DEFAULTS)
    g.add(51, "MaskToImage", col + 1, align=50, mask=(50, 1))
    g.add(52, "PreviewImage", col + 2, align=50, title="Subject masks from the router", images=(51, 0))


def _sdxl_two(g: Graph, model_name: str, prefix: str, steps: int, size: int):
    _sdxl_loaders(g, model_name)
    a = _subject(g, 10, SUBJECT_A, "the fox")
    b = _subject(g, 13, SUBJECT_B, "the robot", prev=a)
    _sdxl_prompts(g, b, TWO_SUBJECTS, size, size)
    g.add(30, "AnyStoryApply", 3, model=(1, 0), anystory=(3, 0), subjects=(b, 0), router_mode="auto",
          **APPLY_DEFAULTS)
    _render(g, 40, 22, prefix, 7, steps)
    _routing_preview(g)


def sdxl_one_subject(steps=20, size=1024) -> Graph:
    g = Graph("AnyStory SDXL — one subject (public files: SDXL base, CLIP-ViT-H, IP-Adapter Plus)", subjects=1)
    _sdxl_loaders(g, IPADAPTER)
    a = _subject(g, 10, SUBJECT_A, "the fox")
    _sdxl_prompts(g, a, ONE_SUBJECT, size, size)
    g.add(30, "AnyStoryApply", 3, model=(1, 0), anystory=(3, 0), subjects=(a, 0), router_mode="auto",
          **APPLY_DEFAULTS)
    _render(g, 40, 22, "anystory_sdxl_one_subject", 42, steps)
    return g


def sdxl_two_subjects(steps=20, size=1024) -> Graph:
    g = Graph("AnyStory SDXL — two subjects with routing preview (public files)")
    _sdxl_two(g, IPADAPTER, "anystory_sdxl_two_subjects", steps, size)
    return g


def sdxl_story(steps=20, size=1024) -> Graph:
    g = Graph("AnyStory SDXL — a 4-image story with the same two subjects (public files)")
    _sdxl_loaders(g, IPADAPTER)
    a = _subject(g, 10, SUBJECT_A, "the fox")
    b = _subject(g, 13, SUBJECT_B, "the robot", prev=a)
    g.add(30, "AnyStoryApply", 3, model=(1, 0), anystory=(3, 0), subjects=(b, 0), router_mode="auto",
          **APPLY_DEFAULTS)
    g.add(20, "CLIPTextEncode", 3, title="Negative prompt", clip=(1, 1), text=NEGATIVE)
    g.add(21, "EmptyLatentImage", 3, width=size, height=size, batch_size=1)
    for i, text in enumerate(STORY):
        pos = 60 + 10 * i
        g.add(pos, "AnyStoryTextEncode", 4, title=f"Panel {i + 1}", clip=(1, 1), subjects=(b, 0),
              text=text + ", storybook illustration")
        _render(g, pos + 1, pos, f"anystory_story_{i + 1}", 100 + i, steps, col=5, align=pos)
    return g


def sdxl_trained_router(steps=20, size=1024) -> Graph:
    g = Graph("AnyStory SDXL — two subjects with YOUR trained router (needs anystory_sdxl_router.safetensors "
              "from scripts/train_router.py)")
    _sdxl_two(g, ROUTER, "anystory_sdxl_trained_router", steps, size)
    return g


def _flux_loaders(g: Graph, size: int):
    g.add(1, "UNETLoader", 0, unet_name=FLUX_UNET, weight_dtype="default")
    g.add(2, "DualCLIPLoader", 0, clip_name1=CLIP_L, clip_name2=T5XXL, type="flux", device="default")
    g.add(4, "VAELoader", 0, vae_name=FLUX_VAE)
    g.add(5, "CLIPVisionLoader", 0, clip_name=SIGLIP)
    g.add(6, "StyleModelLoader", 0, style_model_name=REDUX)
    g.add(3, "AnyStoryModelLoader", 0, model_name=ANYSTORY_FLUX, refnet_name="none")
    # the authors' schedule: FLUX's resolution-dependent shift (diffusers' calculate_shift)
    g.add(7, "ModelSamplingFlux", 1, model=(1, 0), max_shift=1.15, base_shift=0.5, width=size, height=size)


def _flux_subject(g: Graph, nid_load: int, image: str, label: str, prev=None):
    return _subject(g, nid_load, image, label, prev, clip_vision=5, vae=(4, 0), model=(7, 0), style_model=6)


def _flux_render(g: Graph, text: str, subjects: int, options: dict, prefix: str, seed: int, steps: int, size: int):
    g.add(22, "CLIPTextEncode", 3, title="Positive prompt", clip=(2, 0), text=text)
    g.add(23, "FluxGuidance", 3, conditioning=(22, 0), guidance=3.5)
    g.add(20, "CLIPTextEncode", 3, title="Negative prompt (unused at cfg 1)", clip=(2, 0), text="")
    g.add(21, "EmptyLatentImage", 3, width=size, height=size, batch_size=1)
    g.add(25, "AnyStoryFluxOptions", 2, **options)
    g.add(30, "AnyStoryApply", 3, model=(7, 0), anystory=(3, 0), subjects=(subjects, 0), flux_options=(25, 0),
          router_mode="auto", **APPLY_DEFAULTS)
    _render(g, 40, 23, prefix, 2025, steps, vae=(4, 0), cfg=1.0, scheduler="simple")


def flux_one_subject(steps=FLUX_STEPS, size=FLUX_SIZE) -> Graph:
    g = Graph("AnyStory FLUX.1-dev — one subject (public files + anystory_flux.bin)", subjects=1)
    _flux_loaders(g, size)
    a = _flux_subject(g, 10, SUBJECT_A, "the fox")
    _flux_render(g, ONE_SUBJECT, a, FLUX_OPTIONS, "anystory_flux_one_subject", 2025, steps, size)
    return g


def flux_two_subjects(steps=FLUX_STEPS, size=FLUX_SIZE) -> Graph:
    g = Graph("AnyStory FLUX.1-dev — two subjects with routing preview (public files + anystory_flux.bin)")
    _flux_loaders(g, size)
    a = _flux_subject(g, 10, SUBJECT_A, "the fox")
    b = _flux_subject(g, 13, SUBJECT_B, "the robot", prev=a)
    # the authors' demo for 2+ subjects: the router on (auto) and the references from 9% of the steps
    _flux_render(g, TWO_SUBJECTS, b, dict(FLUX_OPTIONS, ref_start=0.09), "anystory_flux_two_subjects", 2025, steps,
                 size)
    _routing_preview(g)
    return g


class Template(NamedTuple):
    build: Callable[..., Graph]
    public: bool = True   # runs on the public file set alone (PUBLIC_FILES)


# file name (the template browser shows it; numbered so the ones that run on public files come first) → builder
TEMPLATES = {
    "01_anystory_sdxl_one_subject": Template(sdxl_one_subject),
    "02_anystory_sdxl_two_subjects": Template(sdxl_two_subjects),
    "03_anystory_sdxl_story_4_images": Template(sdxl_story),
    "04_anystory_flux_one_subject": Template(flux_one_subject),
    "05_anystory_flux_two_subjects": Template(flux_two_subjects),
    "06_anystory_sdxl_your_trained_router": Template(sdxl_trained_router, public=False),
}
WORKFLOWS = {name: t.build for name, t in TEMPLATES.items()}


def write(out_dir: Path = OUT_DIR, **kw) -> list[Path]:
    written = []
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    for name, make in WORKFLOWS.items():
        g = make(**kw)
        g.layout()
        overlaps = g.overlaps()
        if overlaps:
            raise ValueError(f"{name}: nodes overlap: {overlaps}")
        for path, data in ((out_dir / f"{name}.json", g.ui()), (out_dir / "api" / f"{name}.json", g.api())):
            path.write_text(json.dumps(data, indent=1) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write():
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
    sys.exit(0)
