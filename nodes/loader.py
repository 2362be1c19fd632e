"""AnyStoryModelLoader: "router loading" — adapter (subject branch + per-layer Ŵ_k/Ŵ_v), router, and an
optional native ReferenceNet, from models/anystory (IP-Adapter Plus files also from models/ipadapter)."""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..anystory import checkpoint
from ..anystory.layers import layout_from_state_dict
from . import paths, state
from .checks import check_weights_finite
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
    try:
        adapter = checkpoint.load_adapter(path)
        refnet = checkpoint.load_refnet(rpath) if rpath else None
    except checkpoint.CheckpointError as e:
        raise AnyStoryError(str(e)) from None
    if refnet is not None:
        rl = layout_from_state_dict(refnet.state_dict)
        if sorted(adapter.layer_dims.items()) != rl.signature():
            raise AnyStoryError(
                f"the ReferenceNet {refnet_name!r} has {len(rl)} self-attention layers ({rl.describe()}), but the "
                f"AnyStory model {model_name!r} has {len(adapter.layer_dims)} cross-attention layers; both files "
                "must be made for the same base model.")
    check_weights_finite(model_name, list(adapter.state_dict().items()))
    if refnet is not None:
        check_weights_finite(refnet_name, list(refnet.state_dict.items()))
    load_device = mm.get_torch_device()
    dtype = compute_dtype(load_device)
    adapter = adapter.to(dtype).eval().requires_grad_(False)
    check_weights_finite(model_name, list(adapter.state_dict().items()), dtype)
    patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=load_device,
                                               offload_device=mm.unet_offload_device())
    model = AnyStoryModel(name=model_name, adapter=adapter, patcher=patcher, refnet=refnet, refnet_name=refnet_name)
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
                   "ReferenceNet.")

    @classmethod
    def INPUT_TYPES(cls):
        files = paths.list_models()
        return {"required": {
            "model_name": (files, {"tooltip": "AnyStory SDXL file (anystory_sdxl.safetensors) or "
                                              "ip-adapter-plus_sdxl_vit-h (.safetensors or .bin) from "
                                              "models/anystory or models/ipadapter."}),
            "refnet_name": (["none"] + files, {"default": "none", "tooltip":
                            "Native AnyStory ReferenceNet (anystory_sdxl_refnet.safetensors). 'none' uses the "
                            "connected SDXL MODEL itself as ReferenceNet (shared mode) when the encode node "
                            "gets a MODEL."}),
        }}

    def load(self, model_name, refnet_name="none"):
        model = load_model(model_name, refnet_name)
        info = model.describe()
        return {"ui": {"text": [info]}, "result": (model, info)}
