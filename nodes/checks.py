"""Every check of what a user wired or chose, in one place: each raises AnyStoryError with one sentence
that says what is wrong and how to fix it (ComfyUI shows it on the node and keeps serving)."""
from __future__ import annotations

import torch

import comfy.model_base

from ..anystory.layers import LayerLayout, discover_layout
from ..anystory.preview import MAX_SUBJECTS
from .types import AnyStoryError, AnyStoryModel, SubjectList


def check_model(anystory) -> AnyStoryModel:
    if not isinstance(anystory, AnyStoryModel):
        raise AnyStoryError(f"the 'anystory' input must come from AnyStoryModelLoader, got {type(anystory).__name__}")
    return anystory


def check_subjects(subjects, anystory: AnyStoryModel, what: str = "the 'subjects' input",
                   source: str = "AnyStorySubjectEncode") -> SubjectList:
    """A SubjectList made with ``anystory``."""
    if not isinstance(subjects, SubjectList):
        raise AnyStoryError(f"{what} must come from {source}")
    if subjects.model_uid != anystory.uid:
        raise AnyStoryError(
            f"the subjects were encoded with another AnyStory model ({subjects.model_name}) than the one "
            f"connected here ({anystory.name}); use the same AnyStoryModelLoader for both.")
    return subjects


def check_room_for_subject(subjects: SubjectList) -> None:
    if len(subjects) >= MAX_SUBJECTS:
        raise AnyStoryError(f"AnyStory takes at most {MAX_SUBJECTS} subjects per image; this chain already "
                            f"has {len(subjects)}.")


def check_subject_image(image: torch.Tensor, mask) -> None:
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise AnyStoryError(f"'image' must be an IMAGE [batch, height, width, 3 or 4], got {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise AnyStoryError("the subject image contains NaN or infinite values; check the node that made it")
    if mask is not None and not torch.isfinite(mask).all():
        raise AnyStoryError("the subject mask contains NaN or infinite values; check the node that made it "
                            "(or disconnect the mask to use the image's alpha / the whole image)")


def check_blank_image(choice: str, choices: dict):
    """AnyStory Subject Encode's blank_image → its zero-image convention (None: the model file's)."""
    if choice not in choices:
        raise AnyStoryError(f"blank_image must be one of {', '.join(repr(c) for c in choices)}, got {choice!r}")
    return choices[choice]


def pooled_output(conditioning):
    """The pooled text embedding [1, P] of a CONDITIONING (its first entry that has one), or None when no
    CONDITIONING is connected; refuses what is not a CONDITIONING or has no pooled output."""
    if conditioning is None:
        return None
    try:
        entries = [c[1] for c in conditioning]
    except (TypeError, IndexError, KeyError):
        entries = None
    if not entries or not all(isinstance(d, dict) for d in entries):
        raise AnyStoryError("the 'conditioning' input must be a CONDITIONING (the positive prompt from CLIP Text "
                            "Encode / AnyStory Text Encode)")
    for d in entries:
        pooled = d.get("pooled_output")
        if torch.is_tensor(pooled):
            if not torch.isfinite(pooled).all():
                raise AnyStoryError("the conditioning's pooled output has NaN or infinite values")
            return pooled[:1].float()
    raise AnyStoryError("the 'conditioning' input has no pooled output (an SDXL prompt has one): connect the "
                        "positive prompt encoded with the SDXL checkpoint's CLIP, or leave the input empty")


def check_sdxl_model(model, anystory: AnyStoryModel) -> LayerLayout:
    """Refuse anything that is not an SDXL-family UNet whose layers fit the AnyStory file; returns the layout."""
    base = getattr(model, "model", None)
    unet = getattr(base, "diffusion_model", None)
    family = type(base).__name__ if base is not None else type(model).__name__
    if unet is None or not hasattr(unet, "input_blocks"):
        raise AnyStoryError(f"AnyStory works on SDXL-family UNet models; the connected MODEL is {family}, which "
                            "has no UNet (FLUX.1 needs the AnyStory FLUX file, anystory_flux.bin; SD3 and other "
                            "transformers are not supported).")
    cfg = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    ctx = cfg.get("context_dim")
    adm = cfg.get("adm_in_channels")
    if not isinstance(base, comfy.model_base.SDXL) or ctx != 2048 or adm != 2816:
        raise AnyStoryError(
            f"AnyStory needs an SDXL-family MODEL (SDXL, Pony, Illustrious, SSD-1B, KOALA …); the connected MODEL is "
            f"{family} with text context {ctx} (SD1.5 has 768, SDXL 2048). Load an SDXL checkpoint.")
    layout = discover_layout(unet)
    try:
        anystory.adapter.check_layout(layout, f"the connected {family} MODEL")
    except ValueError as e:
        raise AnyStoryError(str(e)) from None
    return layout


def check_clip_width(anystory: AnyStoryModel, feats: torch.Tensor) -> None:
    want = anystory.adapter.subject_proj.embedding_dim
    if feats.shape[-1] != want:
        names = {1024: "CLIP ViT-L/14", 1280: "CLIP ViT-H/14", 1664: "CLIP ViT-bigG/14", 768: "CLIP ViT-B",
                 1152: "SigLIP so400m, the FLUX Redux vision model"}
        raise AnyStoryError(
            f"the CLIP vision model gives {feats.shape[-1]}-wide features ({names.get(feats.shape[-1], 'unknown')}), "
            f"but {anystory.name} needs {want} ({names.get(want, '?')}). Load CLIP-ViT-H-14-laion2B-s32B-b79K "
            "in the CLIPVisionLoader.")


def check_region_masks(masks, n: int):
    """[N, H, W] float masks in [0, 1] on the CPU, one per subject; None stays None."""
    if masks is None:
        return None
    m = masks if masks.ndim == 3 else masks.reshape(-1, *masks.shape[-2:])
    if m.shape[0] == 1 and n > 1:
        raise AnyStoryError(f"region_masks has 1 mask but there are {n} subjects: give one mask per subject, in "
                            "subject order (batch them with a 'Batch Masks' / MaskComposite chain); an all-black "
                            "mask leaves that subject to the router")
    if m.shape[0] != n:
        raise AnyStoryError(f"region_masks has {m.shape[0]} masks for {n} subjects: give exactly one per subject, in "
                            "subject order")
    if not torch.isfinite(m).all():
        raise AnyStoryError("region_masks contain NaN or infinite values")
    return m.float().clamp(0, 1).cpu()


def check_weights_finite(name: str, tensors: list, dtype=None) -> None:
    """Refuse weights with NaN/inf: a damaged file (no checksum in safetensors), or values that overflow the
    compute dtype (``dtype`` given: checked after the cast)."""
    for key, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            if dtype is None:
                raise AnyStoryError(f"AnyStory model file {name!r} has NaN or infinite values in '{key}': the file is "
                                    "corrupted (a damaged download or disk). Re-download or re-create it.")
            raise AnyStoryError(f"AnyStory model file {name!r}: '{key}' has values beyond the range of {dtype} "
                                "(they overflow to infinity). Start ComfyUI with --force-fp32, or use a file saved "
                                "in fp16/bf16.")
