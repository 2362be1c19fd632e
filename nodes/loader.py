"""AnyStoryModelLoader: "router loading" — adapter (subject branch + per-layer Ŵ_k/Ŵ_v), router, and an
optional native ReferenceNet, from models/anystory (IP-Adapter Plus files also from models/ipadapter); or the
authors' AnyStory FLUX file (anystory_flux.bin or its .safetensors conversion). Which family reads a file is
nodes/family.py's choice."""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm

from . import paths, state
from .family import family_of_file
from .types import ANYSTORY, AnyStoryModel

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
            "refnet_name": (["none"] + files, {"default": "none", "tooltip":
                            "Native AnyStory ReferenceNet (anystory_sdxl_refnet.safetensors). 'none' uses the "
                            "connected SDXL MODEL itself as ReferenceNet (shared mode) when the encode node "
                            "gets a MODEL. FLUX: always 'none' (its reference pass runs the FLUX MODEL)."}),
        }}

    def load(self, model_name, refnet_name="none"):
        model = load_model(model_name, refnet_name)
        info = model.describe()
        return {"ui": {"text": [info]}, "result": (model, info)}
