#!/usr/bin/env python3
"""Write the shipped graphs in workflows/: UI format (drag-and-drop into the editor) and API format
(workflows/api/, for POST /prompt), both from one description per graph, so the two never drift.

    python scripts/build_workflows.py            # rewrite workflows/*.json and workflows/api/*.json

Widget order per node type is listed in WIDGETS (ComfyUI's INPUT_TYPES order, plus the extra
"control_after_generate" value the editor keeps after a seed, and LoadImage's "upload" widget);
tests/nodes check it against a live server's /object_info.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The file names users have (the demo, scripts/demo.py, maps them to its random-weight files).
CKPT = "sd_xl_base_1.0.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
ANYSTORY = "anystory_sdxl.safetensors"
REFNET = "anystory_sdxl_refnet.safetensors"
IPADAPTER = "ip-adapter-plus_sdxl_vit-h.safetensors"
# FLUX.1-dev: the files of ComfyUI's FLUX examples, FLUX.1 Redux and the authors' AnyStory FLUX file
FLUX_UNET = "flux1-dev.safetensors"
FLUX_VAE = "ae.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
SIGLIP = "sigclip_vision_patch14_384.safetensors"
REDUX = "flux1-redux-dev.safetensors"
ANYSTORY_FLUX = "anystory_flux.bin"
SUBJECT_A = "anystory_subject_fox.png"
SUBJECT_B = "anystory_subject_robot.png"

# node type → (widget names in order, output (name, type) list, input sockets (name, type) in order)
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
NARROW = {"InvertMask", "VAEDecode", "MaskToImage"}  # drawn 220 wide (others 320): no widgets, one or two sockets


def node_size(ntype: str) -> list:
    widgets, _, sockets = WIDGETS[ntype]
    return [220 if ntype in NARROW else 320, 60 + 26 * (len(widgets) + len(sockets))]
OPTIONAL_SOCKETS = {("AnyStorySubjectEncode", "mask"), ("AnyStorySubjectEncode", "model"),
                    ("AnyStorySubjectEncode", "subjects"), ("AnyStorySubjectEncode", "style_model"),
                    ("AnyStorySubjectEncode", "conditioning"),
                    ("AnyStoryApply", "region_masks"), ("AnyStoryApply", "flux_options")}


class Graph:
    def __init__(self, title: str):
        self.title = title
        self.nodes: dict[int, dict] = {}

    def add(self, nid: int, ntype: str, pos, title: str = None, **inputs):
        """inputs: widget values, or (node id, output index) tuples for links."""
        self.nodes[nid] = {"type": ntype, "pos": list(pos), "inputs": inputs, "title": title}
        return nid

    def overlaps(self) -> list:
        """Pairs of node ids whose boxes (pos, the size ui() writes) overlap."""
        boxes = {}
        for nid, n in self.nodes.items():
            widgets, _, sockets = WIDGETS[n["type"]]
            boxes[nid] = (n["pos"][0], n["pos"][1], *node_size(n["type"]))
        ids = sorted(boxes)
        out = []
        for i, a in enumerate(ids):
            ax, ay, aw, ah = boxes[a]
            for b in ids[i + 1:]:
                bx, by, bw, bh = boxes[b]
                if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                    out.append((a, b))
        return out

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

    # --- UI (LiteGraph) format ------------------------------------------------------------------
    def ui(self) -> dict:
        links, link_id = [], 0
        ui_nodes = {}
        for order, (nid, n) in enumerate(self.nodes.items()):
            widgets, outputs, sockets = WIDGETS[n["type"]]
            node = {"id": nid, "type": n["type"], "pos": n["pos"], "size": node_size(n["type"]),
                    "flags": {}, "order": order, "mode": 0, "inputs": [],
                    "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                                for i, (name, t) in enumerate(outputs)],
                    "properties": {"Node name for S&R": n["type"]},
                    "widgets_values": [n["inputs"][w] for w in widgets if w in n["inputs"]]}
            if n["title"]:
                node["title"] = n["title"]
            if any(w not in n["inputs"] for w in widgets):
                missing = [w for w in widgets if w not in n["inputs"]]
                raise ValueError(f"{self.title}: node {nid} ({n['type']}) lacks widget values {missing}")
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
                "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "anystory": {"title": self.title}},
                "version": 0.4}


BLANK_IMAGE = "as trained (model file)"  # AnyStory Subject Encode's default (nodes/sdxl.py BLANK_IMAGE_DEFAULT)
APPLY_DEFAULTS = dict(subject_strength=1.0, detail_strength=1.0, start_percent=0.0, end_percent=1.0,
                      record_routing=True, feather=0, region_warmup=0.1, region_threshold=0.35,
                      negative_rows="background only")


def _base(g: Graph, seed: int = 42, steps: int = 20, width: int = 1024, height: int = 1024,
          anystory: str = ANYSTORY, refnet: str = REFNET):
    # columns (x): 0 loaders + images, 340 mask inverts, 580 subject encodes, 920 prompts + latent + apply,
    # 1270 samplers + preview, 1610/1840 decode + save; rows leave room for the tallest node of each column
    g.add(1, "CheckpointLoaderSimple", (0, 0), ckpt_name=CKPT)
    g.add(2, "CLIPVisionLoader", (0, 150), clip_name=CLIP_VISION)
    g.add(3, "AnyStoryModelLoader", (0, 260), model_name=anystory, refnet_name=refnet)
    g.add(20, "CLIPTextEncode", (920, 230), title="Negative prompt", clip=(1, 1),
          text="blurry, low quality, deformed, extra limbs")
    g.add(21, "EmptyLatentImage", (920, 460), width=width, height=height, batch_size=1)


def _subject(g: Graph, nid_load: int, nid_inv: int, nid_enc: int, image: str, label: str, y: int, prev=None):
    g.add(nid_load, "LoadImage", (0, y), title=f"Subject: {label}", image=image, upload="image")
    # LoadImage's MASK is 1 on the transparent background: invert so that white = subject
    g.add(nid_inv, "InvertMask", (340, y + 60), mask=(nid_load, 1))
    kw = dict(anystory=(3, 0), clip_vision=(2, 0), vae=(1, 2), image=(nid_load, 0), mask=(nid_inv, 0),
              model=(1, 0), label=label, strength=1.0, reference="auto", blank_image=BLANK_IMAGE)
    if prev is not None:
        kw["subjects"] = (prev, 0)
    g.add(nid_enc, "AnyStorySubjectEncode", (580, y), **kw)


def _render(g: Graph, ks: int, dec: int, save: int, pos_node: int, x: int, y: int, prefix: str, seed: int,
            steps: int, model=(30, 0)):
    g.add(ks, "KSampler", (x, y), model=model, positive=(pos_node, 0), negative=(20, 0), latent_image=(21, 0),
          seed=seed, control_after_generate="fixed", steps=steps, cfg=6.0, sampler_name="euler",
          scheduler="normal", denoise=1.0)
    g.add(dec, "VAEDecode", (x + 340, y), samples=(ks, 0), vae=(1, 2))
    g.add(save, "SaveImage", (x + 570, y), images=(dec, 0), filename_prefix=prefix)


def one_subject(steps=20, size=1024) -> Graph:
    g = Graph("AnyStory — one subject")
    _base(g, width=size, height=size)
    _subject(g, 10, 11, 12, SUBJECT_A, "the fox", 500)
    g.add(30, "AnyStoryApply", (920, 620), model=(1, 0), anystory=(3, 0), subjects=(12, 0), router_mode="auto",
          **APPLY_DEFAULTS)
    g.add(22, "CLIPTextEncode", (920, 0), title="Positive prompt", clip=(1, 1),
          text="the fox reading a book in a cozy library, warm light, detailed illustration")
    _render(g, 40, 41, 42, 22, 1270, 0, "anystory_one_subject", 42, steps)
    return g


def two_subjects(steps=20, size=1024) -> Graph:
    g = Graph("AnyStory — two subjects with routing preview")
    _base(g, width=size, height=size)
    _subject(g, 10, 11, 12, SUBJECT_A, "the fox", 500)
    _subject(g, 13, 14, 15, SUBJECT_B, "the robot", 1020, prev=12)
    g.add(30, "AnyStoryApply", (920, 620), model=(1, 0), anystory=(3, 0), subjects=(15, 0), router_mode="auto",
          **APPLY_DEFAULTS)
    g.add(22, "CLIPTextEncode", (920, 0), title="Positive prompt", clip=(1, 1),
          text="the fox and the robot playing chess in a park, sunny day, detailed illustration")
    _render(g, 40, 41, 42, 22, 1270, 0, "anystory_two_subjects", 7, steps)
    g.add(50, "AnyStoryRoutingPreview", (1270, 360), routing=(30, 1), latent=(40, 0), layers="auto", steps="auto",
          mask_steps="last", image_index=0, cell_size=96)
    g.add(51, "MaskToImage", (1610, 360), mask=(50, 1))
    g.add(52, "PreviewImage", (1840, 360), title="Subject masks from the router", images=(51, 0))
    return g


STORY = [
    "the fox and the robot meet on a forest path at dawn",
    "the fox and the robot build a campfire together at night",
    "the fox riding on the shoulders of the robot across a river",
    "the fox and the robot watching the sunrise from a hilltop",
]


def story(steps=20, size=1024) -> Graph:
    g = Graph("AnyStory — a 4-image story with the same two subjects")
    _base(g, width=size, height=size)
    _subject(g, 10, 11, 12, SUBJECT_A, "the fox", 500)
    _subject(g, 13, 14, 15, SUBJECT_B, "the robot", 1020, prev=12)
    g.add(30, "AnyStoryApply", (920, 620), model=(1, 0), anystory=(3, 0), subjects=(15, 0), router_mode="auto",
          **APPLY_DEFAULTS)
    for i, text in enumerate(STORY):
        pos = 60 + 10 * i
        g.add(pos, "CLIPTextEncode", (1270, 380 * i), title=f"Panel {i + 1}", clip=(1, 1),
              text=text + ", storybook illustration")
        _render(g, pos + 1, pos + 2, pos + 3, pos, 1610, 380 * i, f"anystory_story_{i + 1}", 100 + i, steps)
    return g


def public_weights(steps=20, size=1024) -> Graph:
    """Runs today on public files: IP-Adapter Plus SDXL ViT-H as subject encoder, the SDXL MODEL as
    ReferenceNet (shared), the training-free attention router finding each subject by its words."""
    g = Graph("AnyStory on public weights — IP-Adapter Plus + shared ReferenceNet + attention router")
    _base(g, width=size, height=size, anystory=IPADAPTER, refnet="none")
    _subject(g, 10, 11, 12, SUBJECT_A, "the fox", 500)
    _subject(g, 13, 14, 15, SUBJECT_B, "the robot", 1020, prev=12)
    g.add(22, "AnyStoryTextEncode", (920, 0), title="Positive prompt (marks the subjects' words)", clip=(1, 1),
          subjects=(15, 0), text="the fox and the robot playing chess in a park, sunny day, detailed illustration")
    g.add(30, "AnyStoryApply", (920, 620), model=(1, 0), anystory=(3, 0), subjects=(15, 0), router_mode="auto",
          **APPLY_DEFAULTS)
    _render(g, 40, 41, 42, 22, 1270, 0, "anystory_public_weights", 7, steps)
    g.add(50, "AnyStoryRoutingPreview", (1270, 360), routing=(30, 1), latent=(40, 0), layers="auto", steps="auto",
          mask_steps="last", image_index=0, cell_size=96)
    return g


# ------------------------------------------------------------------------------------------------
# FLUX.1-dev (the authors' AnyStory FLUX model; their demo's settings: 512², 25 steps, guidance 3.5)
# ------------------------------------------------------------------------------------------------
FLUX_SIZE, FLUX_STEPS = 512, 25
FLUX_OPTIONS = dict(redux_scale=0.6, redux_start=0.1, redux_end=0.3, ref_start=0.0, ref_end=1.0, ref_shift=0.0,
                    ref_mask=True, router="auto", ref_cache=True)


def _flux_base(g: Graph, size: int):
    # columns (x) 340 apart (nodes are 320 wide): 0 loaders + images, 340 masks + model sampling, 680 subject
    # encodes, 1020 prompts + latent + options + apply, 1360 sampler + preview, 1700 decode, 2040 save
    g.add(1, "UNETLoader", (0, 0), unet_name=FLUX_UNET, weight_dtype="default")
    g.add(2, "DualCLIPLoader", (0, 130), clip_name1=CLIP_L, clip_name2=T5XXL, type="flux", device="default")
    g.add(4, "VAELoader", (0, 310), vae_name=FLUX_VAE)
    g.add(5, "CLIPVisionLoader", (0, 410), clip_name=SIGLIP)
    g.add(6, "StyleModelLoader", (0, 510), style_model_name=REDUX)
    g.add(3, "AnyStoryModelLoader", (0, 610), model_name=ANYSTORY_FLUX, refnet_name="none")
    # the authors' schedule: FLUX's resolution-dependent shift (diffusers' calculate_shift)
    g.add(7, "ModelSamplingFlux", (340, 0), model=(1, 0), max_shift=1.15, base_shift=0.5, width=size, height=size)
    g.add(20, "CLIPTextEncode", (1020, 400), title="Negative prompt (unused at cfg 1)", clip=(2, 0), text="")
    g.add(21, "EmptyLatentImage", (1020, 540), width=size, height=size, batch_size=1)


def _flux_subject(g: Graph, nid_load: int, nid_inv: int, nid_enc: int, image: str, label: str, y: int, prev=None):
    g.add(nid_load, "LoadImage", (0, y), title=f"Subject: {label}", image=image, upload="image")
    g.add(nid_inv, "InvertMask", (340, y + 60), mask=(nid_load, 1))  # white = subject
    kw = dict(anystory=(3, 0), clip_vision=(5, 0), vae=(4, 0), image=(nid_load, 0), mask=(nid_inv, 0),
              model=(7, 0), style_model=(6, 0), label=label, strength=1.0, reference="auto", blank_image=BLANK_IMAGE)
    if prev is not None:
        kw["subjects"] = (prev, 0)
    g.add(nid_enc, "AnyStorySubjectEncode", (680, y), **kw)


def _flux_render(g: Graph, text: str, subjects: int, options: dict, prefix: str, seed: int, steps: int):
    g.add(22, "CLIPTextEncode", (1020, 0), title="Positive prompt", clip=(2, 0), text=text)
    g.add(23, "FluxGuidance", (1020, 250), conditioning=(22, 0), guidance=3.5)
    g.add(25, "AnyStoryFluxOptions", (1020, 700), **options)
    g.add(30, "AnyStoryApply", (1020, 1020), model=(7, 0), anystory=(3, 0), subjects=(subjects, 0),
          flux_options=(25, 0), router_mode="auto", **APPLY_DEFAULTS)
    g.add(40, "KSampler", (1360, 0), model=(30, 0), positive=(23, 0), negative=(20, 0), latent_image=(21, 0),
          seed=seed, control_after_generate="fixed", steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple",
          denoise=1.0)
    g.add(41, "VAEDecode", (1700, 0), samples=(40, 0), vae=(4, 0))
    g.add(42, "SaveImage", (2040, 0), images=(41, 0), filename_prefix=prefix)


def flux_one_subject(steps=FLUX_STEPS, size=FLUX_SIZE) -> Graph:
    g = Graph("AnyStory FLUX.1-dev — one subject")
    _flux_base(g, size)
    _flux_subject(g, 10, 11, 12, SUBJECT_A, "the fox", 760)
    _flux_render(g, "the fox reading a book in a cozy library, warm light, detailed illustration", 12, FLUX_OPTIONS,
                 "anystory_flux_one_subject", 2025, steps)
    return g


def flux_two_subjects(steps=FLUX_STEPS, size=FLUX_SIZE) -> Graph:
    g = Graph("AnyStory FLUX.1-dev — two subjects with routing preview")
    _flux_base(g, size)
    _flux_subject(g, 10, 11, 12, SUBJECT_A, "the fox", 760)
    _flux_subject(g, 13, 14, 15, SUBJECT_B, "the robot", 1240, prev=12)
    # the authors' demo for 2+ subjects: the router on (auto) and the references from 9% of the steps
    _flux_render(g, "the fox and the robot playing chess in a park, sunny day, detailed illustration", 15,
                 dict(FLUX_OPTIONS, ref_start=0.09), "anystory_flux_two_subjects", 2025, steps)
    g.add(50, "AnyStoryRoutingPreview", (1360, 400), routing=(30, 1), latent=(40, 0), layers="auto", steps="auto",
          mask_steps="last", image_index=0, cell_size=96)
    g.add(51, "MaskToImage", (1700, 400), mask=(50, 1))
    g.add(52, "PreviewImage", (2040, 400), title="Subject masks from the router", images=(51, 0))
    return g


WORKFLOWS = {
    "anystory_one_subject": one_subject,
    "anystory_two_subjects": two_subjects,
    "anystory_story_4_images": story,
    "anystory_public_weights": public_weights,
    "anystory_flux_one_subject": flux_one_subject,
    "anystory_flux_two_subjects": flux_two_subjects,
}


def write(out_dir: Path = ROOT / "workflows", **kw) -> list[Path]:
    written = []
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    for name, make in WORKFLOWS.items():
        g = make(**kw)
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
