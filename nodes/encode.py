"""AnyStorySubjectEncode: "subject encoding" — E_i, R_i (CLIP-H → QFormers) and G_i^l (ReferenceNet),
computed once per subject; chain nodes to add subjects (order = index = colour)."""
from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
import comfy.utils

from ..anystory.prepare import prepare_subject
from ..anystory.preview import MAX_SUBJECTS, PALETTE_HEX
from .types import ANYSTORY, ANYSTORY_SUBJECTS, AnyStoryError, AnyStoryModel, Subject, SubjectList
from .ui import preview_images

log = logging.getLogger("anystory")

REFERENCE_MODES = ("auto", "native", "shared", "off")


@torch.no_grad()
def clip_features(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """F_clip: CLIP ViT-H/14 penultimate hidden states [B, 257, 1280] of 224² images [B, 224, 224, 3]
    (on the GPU when it ran there)."""
    feats = _clip_graphed(clip_vision, images)
    if feats is not None:
        return feats
    out = clip_vision.encode_image(images, crop=False)
    feats = getattr(out, "penultimate_hidden_states", None)
    if feats is None:
        feats = out["penultimate_hidden_states"]
    return feats


def _clip_graphed(clip_vision, images: torch.Tensor):
    """ComfyUI's ``encode_image`` (same preprocessing, same model call) with the model call through a CUDA
    graph kept across encodes: the ViT's ~1 000 launches are host-bound (≈ 30 ms on an H200 host).

    It computes in the weights' dtype when they are fp16 (ComfyUI's default for CLIP vision on a GPU),
    as the IP-Adapter and AnyStory reference code run their image encoder, where ``encode_image`` casts
    them to fp32 at every layer: ≈ 1.8e-3 relative difference in F_clip, ~10× less GPU time.
    ``ANYSTORY_CLIP_FP32=1`` keeps fp32. None where this does not apply (another kind of CLIP vision object,
    not on CUDA): the caller then takes ``encode_image``."""
    import comfy.clip_vision
    from ..anystory.graphs import env_flag
    from .refnet import ENCODER_GRAPHS
    model, patcher = getattr(clip_vision, "model", None), getattr(clip_vision, "patcher", None)
    if model is None or patcher is None or getattr(clip_vision, "return_all_hidden_states", True):
        return None
    if not all(hasattr(clip_vision, a) for a in ("load_device", "image_size", "image_mean", "image_std")):
        return None
    device = torch.device(clip_vision.load_device)
    if device.type != "cuda":
        return None
    mm.load_model_gpu(patcher)
    weight_dtype = next(model.parameters()).dtype
    fp32 = env_flag("ANYSTORY_CLIP_FP32", False)
    dtype = torch.float16 if weight_dtype == torch.float16 and not fp32 else torch.float32
    pixels = comfy.clip_vision.clip_preprocess(images.to(device), size=clip_vision.image_size,
                                               mean=clip_vision.image_mean, std=clip_vision.image_std,
                                               crop=False).to(dtype)
    key = ("CLIP vision", id(model), dtype)
    out = ENCODER_GRAPHS.run(key, lambda px: model(pixel_values=px, intermediate_output=-2)[1], (pixels,), model)
    return out.float()  # a copy: the graph's output is rewritten by its next replay


_ZERO_FEATS: dict = {}


def background_features(clip_vision) -> torch.Tensor:
    """F_clip of the all-zero image (the background route N+1), once per CLIP vision model."""
    key = id(clip_vision.model) if hasattr(clip_vision, "model") else id(clip_vision)
    hit = _ZERO_FEATS.get(key)
    if hit is None or hit[0]() is not clip_vision:
        import weakref
        try:
            ref = weakref.ref(clip_vision)
        except TypeError:
            ref = lambda: clip_vision  # noqa: E731
        hit = (ref, clip_features(clip_vision, torch.zeros(1, 224, 224, 3)))
        _ZERO_FEATS.clear()
        _ZERO_FEATS[key] = hit
    return hit[1]


def check_model(anystory) -> AnyStoryModel:
    if not isinstance(anystory, AnyStoryModel):
        raise AnyStoryError(f"the 'anystory' input must come from AnyStoryModelLoader, got {type(anystory).__name__}")
    return anystory


def check_clip_width(anystory: AnyStoryModel, feats: torch.Tensor) -> None:
    want = anystory.adapter.subject_proj.embedding_dim
    if feats.shape[-1] != want:
        names = {1024: "CLIP ViT-L/14", 1280: "CLIP ViT-H/14", 1664: "CLIP ViT-bigG/14", 768: "CLIP ViT-B"}
        raise AnyStoryError(
            f"the CLIP vision model gives {feats.shape[-1]}-wide features ({names.get(feats.shape[-1], 'unknown')}), "
            f"but {anystory.name} needs {want} ({names.get(want, '?')}). Load CLIP-ViT-H-14-laion2B-s32B-b79K "
            "in the CLIPVisionLoader.")


class AnyStorySubjectEncode:
    CATEGORY = "AnyStory"
    FUNCTION = "encode"
    RETURN_TYPES = (ANYSTORY_SUBJECTS, "IMAGE")
    RETURN_NAMES = ("subjects", "subject_crop")
    OUTPUT_TOOLTIPS = ("The subjects so far, this one last (its index and colour in the routing preview).",
                       "The segmented, square-cropped subject as the encoders saw it (512²).")
    DESCRIPTION = ("Encodes one subject for AnyStory once per graph run: CLIP-H tokens → subject tokens E_i "
                   "and routing feature R_i, and ReferenceNet features G_i for detail preservation. Chain "
                   "several of these to put several subjects in one image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "anystory": (ANYSTORY, {"tooltip": "From AnyStoryModelLoader."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP-ViT-H-14 (laion2B-s32B-b79K), the encoder the "
                                                           "AnyStory / IP-Adapter Plus SDXL ViT-H weights expect."}),
                "vae": ("VAE", {"tooltip": "The SDXL VAE: encodes the subject for the ReferenceNet."}),
                "image": ("IMAGE", {"tooltip": "The subject. Several images in a batch = several views of the "
                                               "same subject (their tokens are averaged / pooled)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where the subject is: WHITE = subject. LoadImage's MASK is white on "
                                             "the transparent BACKGROUND, so put InvertMask in between. Any size "
                                             "(resized). Empty: the alpha channel, else the whole image."}),
                "model": ("MODEL", {"tooltip": "The SDXL MODEL you sample with. Without a native ReferenceNet it "
                                               "is used as the ReferenceNet (shared mode) for detail preservation."}),
                "subjects": (ANYSTORY_SUBJECTS, {"tooltip": "Subjects encoded before; this subject is appended."}),
                "label": ("STRING", {"default": "", "multiline": False, "tooltip":
                                     "Words of the positive prompt that name this subject (e.g. 'the man', "
                                     "'red car'). Used by the attention router and to label the preview."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                                       "This subject's strength: multiplies η (subject tokens) and γ (reference) "
                                       "of AnyStoryApply for this subject."}),
                "reference": (list(REFERENCE_MODES), {"default": "auto", "tooltip":
                              "ReferenceNet for detail preservation: auto = native if loaded, else the connected "
                              "MODEL (shared), else off; off = subject tokens only."}),
            },
        }

    @torch.no_grad()  # ComfyUI runs nodes in inference mode; direct Python callers must not build graphs
    def encode(self, anystory, clip_vision, vae, image, mask=None, model=None, subjects=None, label="",
               strength=1.0, reference="auto"):
        anystory = check_model(anystory)
        if subjects is not None:
            if not isinstance(subjects, SubjectList):
                raise AnyStoryError("the 'subjects' input must come from another AnyStorySubjectEncode")
            if subjects.model_uid != anystory.uid:
                raise AnyStoryError(
                    f"the chained subjects were encoded with another AnyStory model ({subjects.model_name}) than "
                    f"this node's ({anystory.name}); encode all subjects of one image with one "
                    "AnyStoryModelLoader.")
            if len(subjects) >= MAX_SUBJECTS:
                raise AnyStoryError(f"AnyStory takes at most {MAX_SUBJECTS} subjects per image; this chain already "
                                    f"has {len(subjects)}.")
        if image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise AnyStoryError(f"'image' must be an IMAGE [batch, height, width, 3 or 4], got {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise AnyStoryError("the subject image contains NaN or infinite values; check the node that made it")
        if mask is not None and not torch.isfinite(mask).all():
            raise AnyStoryError("the subject mask contains NaN or infinite values; check the node that made it "
                                "(or disconnect the mask to use the image's alpha / the whole image)")
        # the reference mode and the MODEL are checked before the expensive encoders run: fail fast
        mode = reference
        if mode == "auto":
            mode = "native" if anystory.refnet is not None else ("shared" if model is not None else "off")
        if mode == "native" and anystory.refnet is None:
            raise AnyStoryError("reference='native' needs a ReferenceNet file: choose one in AnyStoryModelLoader's "
                                "refnet_name, or use reference='shared' with a MODEL connected")
        if mode == "shared" and model is None:
            raise AnyStoryError("reference='shared' uses the SDXL MODEL as ReferenceNet: connect the MODEL input")
        if model is not None and mode != "off":
            from .apply import check_sdxl_model
            check_sdxl_model(model, anystory)
        pbar = comfy.utils.ProgressBar(4)
        try:
            work = mm.get_torch_device()  # segment/crop/resize on the GPU: no CPU image work per subject
            prep = prepare_subject(image.to(work), None if mask is None else mask.to(work))
        except ValueError as e:
            raise AnyStoryError(f"subject image/mask: {e}") from None
        for w in prep.warnings:
            log.warning("AnyStory subject %r: %s", label or len(subjects or []) + 1, w)
        pbar.update(1)

        ad = anystory.adapter
        feats = clip_features(clip_vision, prep.clip_image)  # encode_image loads the model to the GPU
        check_clip_width(anystory, feats)
        zero = background_features(clip_vision)
        pbar.update(1)

        mm.load_models_gpu([anystory.patcher])
        dev = ad.subject_proj.proj_in.weight.device
        pooled = feats.to(dev).mean(0, keepdim=True)  # views of one subject → one set of tokens
        emb = ad.encode(pooled, zero.to(dev))
        store = mm.intermediate_device()
        E_i, E_bg = emb.E[0].to(store), emb.E[1].to(store)
        R_i = emb.R[0].to(store) if emb.R is not None else None
        R_bg = emb.R[1].to(store) if emb.R is not None else None
        pbar.update(1)

        refs = None
        if mode != "off":
            from .refnet import reference_features
            am = anystory if mode == "native" else _without_refnet(anystory)
            refs = reference_features(am, vae, prep.ref_image, prep.ref_mask, unet_model=model)
        else:
            log.info("AnyStory: subject %r encoded without ReferenceNet features (detail preservation off)", label)
        pbar.update(1)

        crop_dev = prep.ref_image[..., :3].float()
        crop = crop_dev.cpu()
        subject = Subject(E=E_i, R=R_i, refs=refs, label=(label or "").strip(), strength=float(strength),
                          preview=crop[0], warnings=list(prep.warnings))
        if subjects is None:
            out = SubjectList(anystory.uid, anystory.name, [subject], E_bg, R_bg)
        else:
            if refs is not None and any(s.refs is not None and s.refs.source != refs.source for s in subjects.subjects):
                log.warning("AnyStory: subjects use different ReferenceNets (native and shared)")
            out = subjects.extended(subject)
        idx = len(out) - 1
        ui = preview_images(crop_dev[:1], prefix=f"anystory_subject_{idx}", max_side=256, jpeg=True)
        ui["anystory_subject"] = [{"index": idx, "color": PALETTE_HEX[idx % MAX_SUBJECTS],
                                   "label": subject.label or f"subject {idx + 1}",
                                   "warnings": subject.warnings,
                                   "reference": refs.source if refs is not None else "off"}]
        return {"ui": ui, "result": (out, crop)}


def _without_refnet(model: AnyStoryModel) -> AnyStoryModel:
    """A view of the model that takes the shared-UNet path even when a native ReferenceNet is loaded."""
    from dataclasses import replace
    return replace(model, refnet=None)
