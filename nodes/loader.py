"""AnyStoryModelLoader: "router loading" — adapter (subject branch + per-layer Ŵ_k/Ŵ_v), router, and an
optional native ReferenceNet, from models/anystory (IP-Adapter Plus files also from models/ipadapter); or the
authors' AnyStory FLUX file (anystory_flux.bin or its .safetensors conversion). Which family reads a file is
nodes/family.py's choice.

AnyStoryLoader: the same, plus the CLIP vision model (and FLUX.1 Redux), all found by name from a preset."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

import comfy.clip_vision
import comfy.model_management as mm
import comfy.sd
import folder_paths

from . import paths, state
from .family import family_of_file
from .types import ANYSTORY, AnyStoryError, AnyStoryModel

log = logging.getLogger("anystory")


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def compute_dtype(device) -> torch.dtype:
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def load_model(model_name: str, refnet_name: str = "none") -> AnyStoryModel:
    path = paths.resolve(model_name)
    rpath = paths.resolve(refnet_name) if refnet_name and refnet_name != "none" else None
    key = (_file_key(path), _file_key(rpath) if rpath else None)
    hit = state.LOADED.get(key)
    if hit is not None:
        state.LOADED.move_to_end(key)
        return hit
    load_device = mm.get_torch_device()
    fam = family_of_file(path)
    model = fam.load_file(model_name, path, rpath, refnet_name, compute_dtype(load_device), load_device,
                          mm.unet_offload_device())
    state.LOADED[key] = model
    while len(state.LOADED) > state.LOADED_SIZE:
        state.LOADED.popitem(last=False)
    log.info("AnyStory: loaded %s", model.describe())
    return model


class AnyStoryModelLoader:
    CATEGORY = "AnyStory"
    FUNCTION = "load"
    RETURN_TYPES = (ANYSTORY, "STRING")
    RETURN_NAMES = ("anystory", "info")
    OUTPUT_TOOLTIPS = ("The AnyStory model: subject encoder, per-layer projections, router (if the file has "
                       "one) and ReferenceNet (if chosen).", "What was loaded and which parts are native "
                       "AnyStory, public IP-Adapter Plus weights or training-free stand-ins.")
    DESCRIPTION = ("Loads an AnyStory SDXL model (native file, or the public ip-adapter-plus_sdxl_vit-h as "
                   "subject encoder) from models/anystory or models/ipadapter, and optionally a native "
                   "ReferenceNet; or the AnyStory FLUX.1-dev model (anystory_flux.bin, or its .safetensors "
                   "conversion). The info output says which.")

    @classmethod
    def INPUT_TYPES(cls):
        files = paths.list_models()
        return {"required": {
            "model_name": (files, {"tooltip": "AnyStory SDXL file (anystory_sdxl.safetensors) or "
                                              "ip-adapter-plus_sdxl_vit-h (.safetensors or .bin) from "
                                              "models/anystory or models/ipadapter; or the AnyStory FLUX file "
                                              "(anystory_flux.bin / .safetensors) from models/anystory."}),
            "refnet_name": (["none"] + paths.list_refnets(), {"default": "none", "tooltip":
                            "Native AnyStory ReferenceNet (anystory_sdxl_refnet.safetensors; only ReferenceNet "
                            "files are listed). 'none' uses the connected SDXL MODEL itself as ReferenceNet (shared "
                            "mode) when the encode node gets a MODEL. FLUX: always 'none' (its reference pass runs "
                            "the FLUX MODEL)."}),
        }}

    def load(self, model_name, refnet_name="none"):
        model = load_model(model_name, refnet_name)
        info = model.describe()
        return {"ui": {"text": [info]}, "result": (model, info)}


# --- the unified loader: files found by name, with presets (as IPAdapter_plus's unified loader) ------------------
@dataclass(frozen=True)
class Need:
    """One file a preset needs: what it is (for the message), where it goes, the usual file, how to find it by name."""

    what: str
    folders: tuple        # folder_paths names searched, in order
    where: str            # the folder, as users know it
    example: str          # the file to download
    pattern: str          # regular expression on the file name (case-insensitive)
    optional: bool = False


CLIP_H = Need("the CLIP ViT-H/14 vision model", ("clip_vision",), "models/clip_vision",
              "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", r"vit.?h.?14|clip_vision_h\b")
PRESET_SDXL_PUBLIC = "SDXL · public (IP-Adapter Plus ViT-H)"
PRESET_SDXL_NATIVE = "SDXL · AnyStory native"
PRESET_FLUX = "FLUX.1-dev (anystory_flux)"
PRESETS = {
    PRESET_SDXL_PUBLIC: {
        "anystory": Need("the IP-Adapter Plus SDXL ViT-H file", paths.FOLDERS, "models/ipadapter",
                         "ip-adapter-plus_sdxl_vit-h.safetensors", r"ip.?adapter.?plus_sdxl_vit.?h"),
        "clip_vision": CLIP_H},
    PRESET_SDXL_NATIVE: {
        "anystory": Need("the AnyStory SDXL file", paths.FOLDERS, "models/anystory", "anystory_sdxl.safetensors",
                         r"anystory_sdxl(?!.*refnet)"),
        "refnet": Need("the AnyStory ReferenceNet", paths.FOLDERS, "models/anystory",
                       "anystory_sdxl_refnet.safetensors", r"anystory.*refnet", optional=True),
        "clip_vision": CLIP_H},
    PRESET_FLUX: {
        "anystory": Need("the AnyStory FLUX file", paths.FOLDERS, "models/anystory", "anystory_flux.bin",
                         r"anystory_flux"),
        "clip_vision": Need("the SigLIP vision model", ("clip_vision",), "models/clip_vision",
                            "sigclip_vision_patch14_384.safetensors", r"sigclip|siglip.*384"),
        "style_model": Need("FLUX.1 Redux", ("style_models",), "models/style_models", "flux1-redux-dev.safetensors",
                            r"redux")},
}


def _listed(folder: str) -> list:
    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:
        return []


def find_file(need: Need, preset: str):
    """The listed file name for ``need`` (.safetensors first, then the shortest name), None if optional and absent;
    else AnyStoryError naming the file and its folder."""
    rx = re.compile(need.pattern, re.IGNORECASE)
    hits = sorted({n for f in need.folders for n in _listed(f) if rx.search(os.path.basename(n))},
                  key=lambda n: (not n.lower().endswith(".safetensors"), len(n), n))
    if hits:
        return hits[0]
    if need.optional:
        return None
    log.warning("AnyStory Loader: no file for %s (a name matching %r) in %s", need.what, need.pattern,
                [p for f in need.folders for p in _folder_paths(f)])
    raise AnyStoryError(f"preset '{preset}' needs {need.example} in {need.where}: download it there, then press R "
                        "in the editor.")


def _folder_paths(folder: str) -> list:
    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


def load_clip_vision(name: str):
    """CLIPVisionLoader's load of a listed clip_vision file."""
    vision = comfy.clip_vision.load(folder_paths.get_full_path_or_raise("clip_vision", name))
    if vision is None:
        raise AnyStoryError(f"{name} in models/clip_vision is not a CLIP vision model: re-download it.")
    return vision


def load_style_model(name: str):
    """StyleModelLoader's load of a listed style_models file."""
    return comfy.sd.load_style_model(folder_paths.get_full_path_or_raise("style_models", name))


class AnyStoryLoader:
    CATEGORY = "AnyStory"
    FUNCTION = "load"
    RETURN_TYPES = (ANYSTORY, "CLIP_VISION", "STYLE_MODEL", "STRING")
    RETURN_NAMES = ("anystory", "clip_vision", "style_model", "info")
    OUTPUT_TOOLTIPS = ("The AnyStory model, for AnyStory Subject Encode and AnyStory Apply.",
                       "The vision model the preset needs (CLIP ViT-H/14 for SDXL, SigLIP for FLUX), for AnyStory "
                       "Subject Encode.",
                       "FLUX: FLUX.1 Redux, for AnyStory Subject Encode's style_model. SDXL presets: nothing "
                       "(leave it unconnected).",
                       "Which files were found and loaded.")
    DESCRIPTION = ("Loads everything AnyStory needs besides the checkpoint, by preset: finds the AnyStory / "
                   "IP-Adapter file, the CLIP vision model (and FLUX.1 Redux for FLUX) by their usual names in "
                   "models/anystory, models/ipadapter, models/clip_vision and models/style_models. A missing file "
                   "is named with the folder it goes in. AnyStory Model Loader picks the file by hand.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "preset": (list(PRESETS), {"default": PRESET_SDXL_PUBLIC, "tooltip":
                       "Which files to load. SDXL · public: ip-adapter-plus_sdxl_vit-h + "
                       "CLIP-ViT-H-14-laion2B-s32B-b79K (files anyone can download; subjects are placed by their "
                       "words in the prompt). SDXL · AnyStory native: anystory_sdxl (+ anystory_sdxl_refnet if "
                       "present) + CLIP-ViT-H-14. FLUX.1-dev: anystory_flux + sigclip_vision_patch14_384 + "
                       "flux1-redux-dev."}),
        }}

    def load(self, preset):
        needs = PRESETS.get(preset)
        if needs is None:
            raise AnyStoryError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
        files = {part: find_file(need, preset) for part, need in needs.items()}
        model = load_model(files["anystory"], files.get("refnet") or "none")
        vision = load_clip_vision(files["clip_vision"])
        style = load_style_model(files["style_model"]) if files.get("style_model") else None
        info = "; ".join([model.describe()] + [f"{part}: {name}" for part, name in files.items()
                                                if part != "anystory" and name])
        return {"ui": {"text": [info]}, "result": (model, vision, style, info)}
