"""AnyStorySubjectEncode: "subject encoding" — E_i, R_i and G_i^l of one subject, computed once; chain
nodes to add subjects (order = index = colour)."""
from __future__ import annotations

import logging

import torch

import comfy.utils

from ..anystory.preview import MAX_SUBJECTS, PALETTE_HEX
from . import checks
from .family import family_for
from .sdxl import BLANK_IMAGE_DEFAULT, BLANK_IMAGES, REFERENCE_MODES
from .types import ANYSTORY, ANYSTORY_SUBJECTS, SubjectList
from .ui import preview_images

log = logging.getLogger("anystory")


class AnyStorySubjectEncode:
    CATEGORY = "AnyStory"
    FUNCTION = "encode"
    RETURN_TYPES = (ANYSTORY_SUBJECTS, "IMAGE")
    RETURN_NAMES = ("subjects", "subject_crop")
    OUTPUT_TOOLTIPS = ("The subjects so far, this one last (its index and colour in the routing preview).",
                       "The segmented, square-cropped subject as the encoders saw it (512²).")
    DESCRIPTION = ("Encodes one subject for AnyStory, once per graph run: its look (subject tokens from the CLIP "
                   "vision model, SigLIP + Redux for FLUX), what the router recognises it by, and its fine detail "
                   "(reference features from a ReferenceNet or the MODEL; the VAE latent for FLUX). Give it a cut-out "
                   "subject (alpha or mask); a warning on the node says when the background would be encoded too. "
                   "Chain several of these to put several subjects in one image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "anystory": (ANYSTORY, {"tooltip": "From the AnyStory Loader (or AnyStory Model Loader)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "SDXL: CLIP-ViT-H-14 (laion2B-s32B-b79K), the encoder the "
                                                           "AnyStory / IP-Adapter Plus SDXL ViT-H weights expect. "
                                                           "FLUX: SigLIP so400m-384 "
                                                           "(sigclip_vision_patch14_384.safetensors, as for Redux)."}),
                "vae": ("VAE", {"tooltip": "The VAE of the model you sample (SDXL VAE / FLUX ae.safetensors): "
                                           "encodes the subject for the reference features."}),
                "image": ("IMAGE", {"tooltip": "The subject, best cut out (a PNG with transparency + its mask, "
                                               "or an RGBA image from a background-removal node: its alpha is the "
                                               "mask). Several images in a batch = several views of the same "
                                               "subject (their tokens are averaged / pooled)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where the subject is: WHITE = subject, black = background. "
                                             "LoadImage's MASK is the other way round (white on the transparent "
                                             "background of a PNG), so put InvertMask in between. Any size "
                                             "(resized). Not connected: the image's alpha channel if it has one, "
                                             "else the whole image (a warning on the node says so). No cut-out? "
                                             "Use a background-removal node (BiRefNet / RMBG, Rembg, Segment "
                                             "Anything)."}),
                "model": ("MODEL", {"tooltip": "The MODEL you sample with. SDXL without a native ReferenceNet: used "
                                               "as the ReferenceNet (shared mode) for detail preservation. FLUX: "
                                               "only checked (the reference pass runs at AnyStory Apply)."}),
                "subjects": (ANYSTORY_SUBJECTS, {"tooltip": "Subjects encoded before; this subject is appended."}),
                "label": ("STRING", {"default": "", "multiline": False, "tooltip":
                                     "Words of the positive prompt that name this subject (e.g. 'the man', "
                                     "'red car'). Used by the attention router and to label the preview."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                                       "This subject's strength: multiplies AnyStory Apply's subject_strength and "
                                       "detail_strength for this subject (0 = leave it out)."}),
                "reference": (list(REFERENCE_MODES), {"default": "auto", "tooltip":
                              "ReferenceNet for detail preservation: auto = native if loaded, else the connected "
                              "MODEL (shared), else off; off = subject tokens only. FLUX: anything but off = the "
                              "authors' reference features."}),
                "style_model": ("STYLE_MODEL", {"tooltip": "FLUX only: FLUX.1 Redux (flux1-redux-dev.safetensors "
                                                           "from StyleModelLoader), the base of AnyStory FLUX's "
                                                           "subject encoder. SDXL ignores it."}),
                "conditioning": ("CONDITIONING", {"tooltip": "The positive prompt (SDXL): its pooled output conditions "
                                                             "the ReferenceNet pass, with the reference's size. Empty: "
                                                             "a zero pooled embedding there. FLUX ignores it."}),
                "blank_image": (list(BLANK_IMAGES), {"default": BLANK_IMAGE_DEFAULT, "tooltip":
                                "SDXL: the 'zero image' whose tokens are the background route (and the unconditional "
                                "image tokens of CFG). as trained = what the model file says it was trained with: "
                                "zeros after normalisation (IP-Adapter's, which IP-Adapter Plus was trained with) "
                                "unless a native file says otherwise. black pixels = what ComfyUI_IPAdapter_plus "
                                "uses (for matching its images). Chained subjects share the first one's."}),
            },
        }

    @torch.no_grad()  # ComfyUI runs nodes in inference mode; direct Python callers must not build graphs
    def encode(self, anystory, clip_vision, vae, image, mask=None, model=None, subjects=None, label="",
               strength=1.0, reference="auto", style_model=None, conditioning=None, blank_image=BLANK_IMAGE_DEFAULT):
        anystory = checks.check_model(anystory)
        if subjects is not None:
            checks.check_subjects(subjects, anystory, "the chained 'subjects' input", "another AnyStorySubjectEncode")
            checks.check_room_for_subject(subjects)
        checks.check_subject_image(image, mask)
        family = family_for(anystory, model)
        index = len(subjects) if subjects is not None else 0
        subject, E_bg, R_bg, crop = family.encode(anystory, clip_vision, vae, image, mask=mask, model=model,
                                                  label=label, strength=strength, reference=reference, index=index,
                                                  pbar=comfy.utils.ProgressBar(4), style_model=style_model,
                                                  conditioning=conditioning, blank_image=blank_image)
        if subjects is None:
            out = SubjectList(anystory.uid, anystory.name, [subject], E_bg, R_bg, family.name)
        else:
            refs = subject.refs
            if refs is not None and any(s.refs is not None and s.refs.source != refs.source for s in subjects.subjects):
                log.warning("AnyStory: subjects use different ReferenceNets (native and shared)")
            first = subjects.subjects[0].zero_image
            if subject.zero_image and first and subject.zero_image != first:
                w = (f"AnyStory: blank_image differs from the first subject's ({first} there, {subject.zero_image} "
                     "here); the background route is the first subject's. Set the same blank_image on every encode.")
                log.warning(w)
                subject.warnings.append(w)
            out = subjects.extended(subject)
        idx = len(out) - 1
        ui = preview_images(crop[:1], prefix=f"anystory_subject_{idx}", max_side=256, jpeg=True)
        ui["anystory_subject"] = [{"index": idx, "color": PALETTE_HEX[idx % MAX_SUBJECTS],
                                   "label": subject.label or f"subject {idx + 1}",
                                   "warnings": subject.warnings,
                                   "reference": subject.refs.source if subject.refs is not None else "off"}]
        ui["warnings"] = list(subject.warnings)  # drawn on the node by web/anystory.js; kept in /history
        return {"ui": ui, "result": (out, crop.cpu())}
