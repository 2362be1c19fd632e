"""AnyStoryApply: "routed model patching" — patches a clone of an SDXL MODEL so any ComfyUI sampler
renders the subjects, each confined to where the router puts it; returns the routing recorder."""
from __future__ import annotations

import logging
import uuid

import torch

import comfy.model_base
import comfy.model_management as mm

from ..anystory.layers import discover_layout
from ..anystory.attention_router import AttentionRouter, observed_layers
from ..anystory.patch import MODE_ATTENTION, MODE_MASKS, MODE_MIXED, MODE_ROUTER, RoutedPatch, RoutingInputs
from ..anystory.preview import RoutingRecorder
from . import live
from .encode import check_model
from .patch import ComfyRoutedPatch, install
from .types import ANYSTORY, ANYSTORY_ROUTING, ANYSTORY_SUBJECTS, AnyStoryError, AnyStoryModel, SubjectList

log = logging.getLogger("anystory")

ROUTER_MODES = ("auto", MODE_ROUTER, MODE_ATTENTION, MODE_MASKS, MODE_MIXED)


def _blocks(unet) -> dict:
    """layer key → BasicTransformerBlock, in the same naming as anystory.layers.discover_layout."""
    out = {}

    def scan(name, idx, seq):
        for mod in seq:
            for j, tb in enumerate(getattr(mod, "transformer_blocks", []) or []):
                out[(name, idx, j)] = tb

    for i, blk in enumerate(getattr(unet, "input_blocks", [])):
        scan("input", i, blk)
    if getattr(unet, "middle_block", None) is not None:
        scan("middle", 0, unet.middle_block)
    for i, blk in enumerate(getattr(unet, "output_blocks", [])):
        scan("output", i, blk)
    return out


def check_sdxl_model(model, anystory: AnyStoryModel):
    """Refuse anything that is not an SDXL-family UNet whose layers fit the AnyStory file; returns the layout."""
    base = getattr(model, "model", None)
    unet = getattr(base, "diffusion_model", None)
    family = type(base).__name__ if base is not None else type(model).__name__
    if unet is None or not hasattr(unet, "input_blocks"):
        raise AnyStoryError(f"AnyStory works on SDXL-family UNet models; the connected MODEL is {family}, which "
                            "has no UNet (Flux, SD3 and other transformers are not supported).")
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


def _feathered(masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur of [N, H, W] masks with σ = radius/2 pixels (radius 0: unchanged)."""
    if radius <= 0:
        return masks
    sigma = radius / 2.0
    k = int(2 * round(radius) + 1)
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    m = masks[:, None]
    m = torch.nn.functional.conv2d(torch.nn.functional.pad(m, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
    m = torch.nn.functional.conv2d(torch.nn.functional.pad(m, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1))
    return m[:, 0].clamp(0, 1)


def _region_masks(masks, n: int):
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


def _warn_duplicates(subjects: SubjectList, by_labels: bool) -> list:
    """Log (and return) a warning for each pair of subjects that cannot be told apart: the same encoded
    subject chained twice, or (attention router) the same label words."""
    out = []
    subs = subjects.subjects
    for j in range(len(subs)):
        for i in range(j):
            a, b = subs[i], subs[j]
            if a.E.shape == b.E.shape and torch.equal(a.E, b.E):
                out.append(f"subjects {i + 1} and {j + 1} are the same encoded subject (same image and settings): "
                           "they compete for the same region. Chain each subject once (several views of one "
                           "subject go into ONE encode node as an image batch).")
            elif by_labels and a.label and a.label.strip().lower() == b.label.strip().lower():
                out.append(f"subjects {i + 1} and {j + 1} have the same label {a.label!r}: the attention router finds "
                           "both by the same words and cannot tell them apart. Give each subject its own words in "
                           "the prompt (e.g. 'the red car', 'the blue car').")
    for w in out:
        log.warning("AnyStory: %s", w)
    return out


class AnyStoryApply:
    CATEGORY = "AnyStory"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", ANYSTORY_ROUTING)
    RETURN_NAMES = ("model", "routing")
    OUTPUT_TOOLTIPS = ("A patched copy of the MODEL (the input MODEL is not changed): sample it with any sampler.",
                       "The routing maps of the next sampling with this MODEL, for AnyStoryRoutingPreview.")
    DESCRIPTION = ("Patches an SDXL MODEL with AnyStory: each subject's tokens (η) and reference features (γ) "
                   "are routed to the region the router assigns to that subject, so several subjects keep "
                   "their own looks without blending. Stacks with IPAdapter (before or after), LoRAs and "
                   "ControlNet. Two AnyStory Apply on one MODEL: both add their subject tokens; only the first "
                   "keeps its reference features (γ), the second's are left out (a warning says so).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SDXL MODEL to patch (a copy is patched)."}),
                "anystory": (ANYSTORY, {"tooltip": "From AnyStoryModelLoader — the same one the subjects were "
                                                   "encoded with."}),
                "subjects": (ANYSTORY_SUBJECTS, {"tooltip": "From AnyStorySubjectEncode (chain one per subject)."}),
                "router_mode": (list(ROUTER_MODES), {"default": "auto", "tooltip":
                                "How each region is assigned to a subject. auto: the learned router if the file "
                                "has one, else the attention router (labels), with region masks on top where "
                                "given. router: the learned AnyStory router. attention: training-free, from the "
                                "cross-attention of each subject's label words (positive prompt from AnyStory Text "
                                "Encode). masks: region_masks only (background elsewhere). mixed: region masks "
                                "where given, the router (learned, else attention) elsewhere."}),
                "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                                  "η — subject strength: weight of the routed subject tokens in cross-attention "
                                  "(eq. 5). 0 = off."}),
                "gamma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                                    "γ — reference strength: how much attention the subject's reference features get "
                                    "in self-attention (eq. 6-8; logit offset ln γ, so 1 = as trained, 0 = off). "
                                    "Keeps details."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                            "Sampling progress at which AnyStory starts acting."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                          "Sampling progress at which AnyStory stops acting."}),
            },
            "optional": {
                "region_masks": ("MASK", {"tooltip": "One mask per subject, in subject order (white = that "
                                                     "subject's region, any size, stretched to the image). Used by "
                                                     "router_mode masks/mixed; an all-black mask leaves that subject "
                                                     "to the router."}),
                "record_routing": ("BOOLEAN", {"default": True, "tooltip": "Keep the routing maps of each sampling "
                                                                           "for the preview (small, kept on the GPU "
                                                                           "until the end of the run)."}),
                "feather": ("INT", {"default": 0, "min": 0, "max": 256, "step": 1, "tooltip":
                                    "Feather the region masks by this many pixels: the subject's injection fades "
                                    "out towards the mask's edge."}),
                "warmup_steps": ("INT", {"default": 2, "min": 0, "max": 100, "tooltip":
                                         "Attention router: steps before routing starts (the layout forms first; "
                                         "meanwhile every token is background)."}),
                "threshold": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                        "Attention router: a token belongs to a subject when that subject's "
                                        "normalised word attention there is at least this; else background."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},  # the live routing preview in the editor (nodes/live.py)
        }

    def apply(self, model, anystory, subjects, router_mode="auto", eta=1.0, gamma=1.0, start_percent=0.0,
              end_percent=1.0, region_masks=None, record_routing=True, feather=0, warmup_steps=2, threshold=0.35,
              unique_id=None):
        anystory = check_model(anystory)
        if not isinstance(subjects, SubjectList):
            raise AnyStoryError("the 'subjects' input must come from AnyStorySubjectEncode")
        if subjects.model_uid != anystory.uid:
            raise AnyStoryError(
                f"the subjects were encoded with another AnyStory model ({subjects.model_name}) than the one "
                f"connected here ({anystory.name}); use the same AnyStoryModelLoader for both.")
        n = len(subjects)
        if n == 0:
            raise AnyStoryError("no subjects: connect at least one AnyStorySubjectEncode")
        if start_percent > end_percent:
            raise AnyStoryError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): AnyStory would "
                                "never act. Make start_percent ≤ end_percent.")
        layout = check_sdxl_model(model, anystory)
        masks = _region_masks(region_masks, n)
        ad = anystory.adapter
        learned = ad.has_router and all(s.R is not None for s in subjects.subjects)
        labelled = all(s.label for s in subjects.subjects)
        mode = router_mode
        if mode == "auto":
            if learned or labelled:
                mode = MODE_MIXED if masks is not None else (MODE_ROUTER if learned else MODE_ATTENTION)
            elif masks is not None:
                mode = MODE_MASKS
            else:
                raise AnyStoryError(
                    f"nothing can decide where the subjects go: {anystory.name} has no learned router (public "
                    "IP-Adapter weights) and not every subject has a label. Give each AnyStorySubjectEncode a "
                    "label (its words in the prompt) and encode the prompt with AnyStory Text Encode, or connect "
                    "region_masks (one per subject).")
        if mode == MODE_ROUTER and not learned:
            raise AnyStoryError(f"router_mode 'router' needs the learned AnyStory router, which {anystory.name} does "
                                "not have (public IP-Adapter weights). Use 'attention' (subject labels) or 'masks'.")
        if mode in (MODE_ATTENTION,) or (mode == MODE_MIXED and not learned):
            unlabelled = [i + 1 for i, s in enumerate(subjects.subjects) if not s.label]
            if unlabelled:
                raise AnyStoryError(f"router_mode '{mode}' uses the attention router, which finds each subject by its "
                                    f"label words in the prompt; subject(s) {unlabelled} have no label. Set 'label' "
                                    "on their AnyStorySubjectEncode.")
        if mode in (MODE_MASKS, MODE_MIXED) and masks is None:
            raise AnyStoryError(f"router_mode '{mode}' needs region_masks: one mask per subject, in subject order")
        attention_router = None
        if mode == MODE_ATTENTION or (mode == MODE_MIXED and not learned):
            attention_router = AttentionRouter(n, warmup_steps=warmup_steps, threshold=threshold,
                                              layers=observed_layers(layout))
        if masks is not None and feather > 0:
            masks = _feathered(masks, float(feather))
        _warn_duplicates(subjects, attention_router is not None)

        E = torch.stack([s.E for s in subjects.subjects] + [subjects.E_bg]).float()
        R = None
        if learned:
            R = torch.stack([s.R for s in subjects.subjects] + [subjects.R_bg]).float()
        strengths = torch.tensor([s.strength for s in subjects.subjects], dtype=torch.float32)
        eta_t = torch.cat([eta * strengths, torch.tensor([eta], dtype=torch.float32)])
        gamma_t = gamma * strengths

        refs = None
        with_refs = [s.refs is not None for s in subjects.subjects]
        if any(with_refs) and gamma > 0:
            if not all(with_refs):
                missing = [i + 1 for i, w in enumerate(with_refs) if not w]
                log.warning("AnyStory: subjects %s have no ReferenceNet features; they get no reference attention",
                            missing)
                gamma_t = gamma_t * torch.tensor(with_refs, dtype=torch.float32)
            refs = _merge_refs(subjects, layout)

        unet = model.model.diffusion_model
        runtime = RoutedPatch(ad, layout, RoutingInputs(E=E, R=R, eta=eta_t, gamma=gamma_t, refs=refs,
                                                        region_masks=masks, mode=mode, feather=feather > 0),
                              recorder=RoutingRecorder(n, subjects.labels, enabled=bool(record_routing)),
                              attention_router=attention_router)
        ms = model.get_model_object("model_sampling")
        owner = ComfyRoutedPatch(runtime, _blocks(unet), ms.percent_to_sigma(start_percent),
                                 ms.percent_to_sigma(end_percent), uuid.uuid4().hex[:10],
                                 subject_labels=[s.label for s in subjects.subjects])
        patched = model.clone()
        ref_keys = []
        if refs is not None:
            ref_keys = [s.key for s in layout if s.key in refs.features][1:]  # layer 1 has no M^0: dropped
        # Ŵ_k/Ŵ_v projections of E, once; the adapter then stays out of sampling's VRAM unless the
        # learned router needs its weights every step
        mm.load_models_gpu([anystory.patcher])
        runtime.precompute_routes(mm.get_torch_device())
        install(patched, owner, ref_keys, [anystory.patcher] if runtime.uses_learned_router else [])
        routing = runtime.recorder
        routing.mode = mode
        live.attach(routing, unique_id)
        log.info("AnyStory: %d subject(s), router %s, η=%.2f γ=%.2f, %d layers, references at %d layers",
                 n, mode, eta, gamma, len(layout), len(ref_keys))
        return (patched, routing)


def _merge_refs(subjects: SubjectList, layout):
    """G_i^l of all subjects with references, as one ReferenceFeatures (subjects without get zero tokens)."""
    from ..anystory.reference import ReferenceFeatures

    first = next(s.refs for s in subjects.subjects if s.refs is not None)
    keys = [k for k in first.features]
    for i, s in enumerate(subjects.subjects):
        if s.refs is None:
            continue
        if set(s.refs.features) != set(keys):
            raise AnyStoryError(f"subject {i + 1}'s reference features come from a UNet with other layers; encode "
                                "all subjects with the same MODEL / ReferenceNet")
        for k in keys:
            spec = layout.get(k)
            if spec is None or s.refs.features[k].shape[-1] != spec.dim:
                raise AnyStoryError(
                    f"subject {i + 1} was encoded with a ReferenceNet/MODEL whose layer {k} does not match the MODEL "
                    "being patched; connect the same SDXL MODEL to the encode nodes and to AnyStoryApply")
    feats, valid = {}, {}
    for k in keys:
        fs, vs = [], []
        for s in subjects.subjects:
            if s.refs is None:
                f = first.features[k]
                fs.append(torch.zeros(1, 0, f.shape[-1], dtype=f.dtype))
                vs.append(torch.zeros(1, 0, dtype=torch.bool))
            else:
                fs.append(s.refs.features[k])
                vs.append(s.refs.valid.get(k, torch.ones(s.refs.features[k].shape[:2], dtype=torch.bool)))
        L = max(f.shape[1] for f in fs)
        feats[k] = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, L - f.shape[1])) for f in fs])
        valid[k] = torch.cat([torch.nn.functional.pad(v, (0, L - v.shape[1])) for v in vs])
    return ReferenceFeatures(feats, dict(first.grids), first.source, valid)
