"""The SDXL family (the paper's setting): subject encoding with CLIP-H + the adapter's QFormers + a
ReferenceNet, and the routed patch of a UNet through ComfyUI's attention hooks.

The node classes (encode.py, apply.py) resolve their inputs and call :data:`SDXL`'s ``encode`` /
``apply``; another family (FLUX) provides the same two calls (nodes/family.py).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from typing import Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..anystory import checkpoint
from ..anystory.adapter import AnyStoryAdapter
from ..anystory.attention_router import DEFAULT_WARMUP, AttentionRouter, observed_layers
from ..anystory.layers import layout_from_state_dict, transformer_blocks
from ..anystory.paper.encoder import ZERO_IMAGE_NORMALISED, ZERO_IMAGE_PIXEL_BLACK
from ..anystory.paper.reference import ReferenceFeatures
from ..anystory.patch import NEGATIVE_BACKGROUND, NEGATIVE_ROWS, RoutedPatch, RoutingInputs
from ..anystory.prepare import prepare_subject
from ..anystory.recorder import RoutingRecorder
from ..anystory.routing import RoutingChoiceError, make_routing, resolve_mode
from . import checks
from .clip import background_features, clip_features
from .refnet import reference_features
from .sampling import SamplingDriver
from .sdxl_hooks import install
from .types import AnyStoryError, AnyStoryModel, Subject, SubjectList

log = logging.getLogger("anystory")

REFERENCE_MODES = ("auto", "native", "shared", "off")
#: AnyStory Subject Encode's ``blank_image`` → the zero image of the background route (E_{N+1}, R_{N+1}, CFG's
#: unconditional image tokens): anystory.paper.encoder.ZERO_IMAGES; None = what the model file was trained with
#: (its metadata; IP-Adapter's zeros after normalisation for every file that does not say)
BLANK_IMAGES = {
    "as trained (model file)": None,
    "zeros after normalisation (IP-Adapter)": ZERO_IMAGE_NORMALISED,
    "black pixels (IPAdapter_plus)": ZERO_IMAGE_PIXEL_BLACK,
}
BLANK_IMAGE_DEFAULT = "as trained (model file)"


@dataclass
class ApplyOptions:
    """AnyStory Apply's settings (see the node's tooltips)."""

    router_mode: str = "auto"
    eta: float = 1.0
    gamma: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    region_masks: Optional[torch.Tensor] = None
    record_routing: bool = True
    feather: int = 0
    warmup: float = DEFAULT_WARMUP  # share of the steps before the attention router starts
    warmup_steps: Optional[int] = None  # a fixed number of steps instead (older workflows)
    threshold: float = 0.35
    negative_rows: str = NEGATIVE_BACKGROUND  # what CFG's uncond rows get (anystory.patch.state.NEGATIVE_ROWS)
    flux: Optional[object] = None  # ANYSTORY_FLUX_OPTIONS (nodes/flux/options.py); the SDXL family ignores it


class SDXLFamily:
    name = "SDXL"

    # --- files -----------------------------------------------------------------------------------------
    def claims_file(self, path: str) -> bool:
        return True  # the default family: its reader says what any other file is

    def load_file(self, model_name: str, path: str, refnet_path: Optional[str], refnet_name: str, dtype,
                  load_device, offload_device) -> AnyStoryModel:
        try:
            adapter = checkpoint.load_adapter(path)
            refnet = checkpoint.load_refnet(refnet_path) if refnet_path else None
        except checkpoint.CheckpointError as e:
            raise AnyStoryError(str(e)) from None
        if refnet is not None:
            rl = layout_from_state_dict(refnet.state_dict)
            if sorted(adapter.layer_dims.items()) != rl.signature():
                raise AnyStoryError(
                    f"the ReferenceNet {refnet_name!r} has {len(rl)} self-attention layers ({rl.describe()}), but the "
                    f"AnyStory model {model_name!r} has {len(adapter.layer_dims)} cross-attention layers; both files "
                    "must be made for the same base model.")
        checks.check_weights_finite(model_name, list(adapter.state_dict().items()))
        if refnet is not None:
            checks.check_weights_finite(refnet_name, list(refnet.state_dict.items()))
        adapter = adapter.to(dtype).eval().requires_grad_(False)
        checks.check_weights_finite(model_name, list(adapter.state_dict().items()), dtype)
        patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=load_device, offload_device=offload_device)
        return AnyStoryModel(name=model_name, adapter=adapter, patcher=patcher, refnet=refnet, refnet_name=refnet_name)

    # --- the seam ----------------------------------------------------------------------------------------
    def owns(self, anystory: AnyStoryModel) -> bool:
        return isinstance(anystory.adapter, AnyStoryAdapter)

    def owns_model(self, model) -> bool:
        return hasattr(getattr(getattr(model, "model", None), "diffusion_model", None), "input_blocks")

    def check_model(self, model, anystory: AnyStoryModel):
        return checks.check_sdxl_model(model, anystory)

    # --- encode --------------------------------------------------------------------------------------
    @staticmethod
    def reference_mode(anystory: AnyStoryModel, reference: str, model) -> str:
        """auto → native if a ReferenceNet file is loaded, else shared with a MODEL, else off."""
        mode = reference
        if mode == "auto":
            mode = "native" if anystory.refnet is not None else ("shared" if model is not None else "off")
        if mode == "native" and anystory.refnet is None:
            raise AnyStoryError("reference='native' needs a ReferenceNet file: choose one in AnyStoryModelLoader's "
                                "refnet_name, or use reference='shared' with a MODEL connected")
        if mode == "shared" and model is None:
            raise AnyStoryError("reference='shared' uses the SDXL MODEL as ReferenceNet: connect the MODEL input")
        return mode

    def encode(self, anystory: AnyStoryModel, clip_vision, vae, image, mask=None, model=None, label: str = "",
               strength: float = 1.0, reference: str = "auto", index: int = 0, pbar=None, style_model=None,
               blank_image: str = BLANK_IMAGE_DEFAULT, conditioning=None):
        """One subject: (Subject with E_i, R_i, G_i^l, E_{N+1}, R_{N+1}, the crop the encoders saw [S, S, 3]
        on the device). The reference mode and the MODEL are checked before the expensive encoders run.

        ``blank_image`` (a key of :data:`BLANK_IMAGES`): the zero image of E_{N+1}, R_{N+1}. ``conditioning``:
        the positive prompt, whose pooled output conditions the ReferenceNet pass (nodes/refnet.py)."""
        if style_model is not None:
            log.warning("AnyStory: the style_model input (FLUX.1 Redux) is used by AnyStory FLUX models only; %s is "
                        "an SDXL model and ignores it", anystory.name)
        mode = self.reference_mode(anystory, reference, model)
        if model is not None and mode != "off":
            self.check_model(model, anystory)
        zero_image = checks.check_blank_image(blank_image, BLANK_IMAGES) or anystory.adapter.zero_image
        text_pooled = checks.pooled_output(conditioning)
        try:
            work = mm.get_torch_device()  # segment/crop/resize on the GPU: no CPU image work per subject
            prep = prepare_subject(image.to(work), None if mask is None else mask.to(work))
        except ValueError as e:
            raise AnyStoryError(f"subject image/mask: {e}") from None
        for w in prep.warnings:
            log.warning("AnyStory subject %r: %s", label or index + 1, w)
        _tick(pbar)

        ad = anystory.adapter
        feats = clip_features(clip_vision, prep.clip_image)  # encode_image loads the model to the GPU
        checks.check_clip_width(anystory, feats)
        zero = background_features(clip_vision, zero_image)
        _tick(pbar)

        mm.load_models_gpu([anystory.patcher])
        dev = ad.subject_proj.proj_in.weight.device
        pooled = feats.to(dev).mean(0, keepdim=True)  # views of one subject → one set of tokens
        emb = ad.encode(pooled, zero.to(dev))
        store = mm.intermediate_device()
        E_i, E_bg = emb.E[0].to(store), emb.E[1].to(store)
        R_i = emb.R[0].to(store) if emb.R is not None else None
        R_bg = emb.R[1].to(store) if emb.R is not None else None
        _tick(pbar)

        refs = None
        if mode != "off":
            am = anystory if mode == "native" else replace(anystory, refnet=None)  # shared: the MODEL's UNet
            refs = reference_features(am, vae, prep.ref_image, prep.ref_mask, unet_model=model, pooled=text_pooled)
        else:
            log.info("AnyStory: subject %r encoded without ReferenceNet features (detail preservation off)", label)
        _tick(pbar)
        crop = prep.ref_image[..., :3].float()
        subject = Subject(E=E_i, R=R_i, refs=refs, label=(label or "").strip(), strength=float(strength),
                          preview=crop.cpu()[0], warnings=list(prep.warnings), zero_image=zero_image)
        return subject, E_bg, R_bg, crop

    # --- apply ---------------------------------------------------------------------------------------
    def apply(self, model, anystory: AnyStoryModel, subjects: SubjectList, opt: ApplyOptions, node_id=None):
        """(a patched clone of ``model``, its RoutingRecorder)."""
        layout = self.check_model(model, anystory)
        if opt.flux is not None:
            log.warning("AnyStory: flux_options (AnyStory FLUX Options) apply to FLUX models only; %s is an SDXL model "
                        "and ignores them", anystory.name)
        n = len(subjects)
        masks = checks.check_region_masks(opt.region_masks, n)
        ad = anystory.adapter
        learned = ad.has_router and all(s.R is not None for s in subjects.subjects)
        unlabelled = [i + 1 for i, s in enumerate(subjects.subjects) if not s.label]
        try:
            plan = resolve_mode(opt.router_mode, learned=learned, unlabelled=unlabelled, has_masks=masks is not None,
                                model_name=anystory.name)
        except RoutingChoiceError as e:
            raise AnyStoryError(str(e)) from None
        attention_router = None
        if plan.attention:
            attention_router = AttentionRouter(n, warmup_steps=opt.warmup_steps, threshold=opt.threshold,
                                               layers=observed_layers(layout), warmup=opt.warmup)
        if masks is not None and opt.feather > 0:
            masks = feathered(masks, float(opt.feather))
        warn_duplicates(subjects, attention_router is not None)

        E = torch.stack([s.E for s in subjects.subjects] + [subjects.E_bg]).float()
        R = torch.stack([s.R for s in subjects.subjects] + [subjects.R_bg]).float() if plan.learned else None
        strengths = torch.tensor([s.strength for s in subjects.subjects], dtype=torch.float32)
        eta_t = torch.cat([opt.eta * strengths, torch.tensor([opt.eta], dtype=torch.float32)])
        gamma_t = opt.gamma * strengths
        refs, gamma_t = _references(subjects, layout, gamma_t, opt.gamma)

        routing = make_routing(plan, n + 1, adapter=ad, R=R, attention_router=attention_router, masks=masks,
                               feather=opt.feather > 0)
        unet = model.model.diffusion_model
        attn1 = {key: tb.attn1 for key, tb in transformer_blocks(unet).items()}
        recorder = RoutingRecorder(n, subjects.labels, enabled=bool(opt.record_routing))
        if opt.negative_rows not in NEGATIVE_ROWS:
            raise AnyStoryError(f"negative_rows {opt.negative_rows!r} is not known: choose one of "
                                f"{', '.join(repr(r) for r in NEGATIVE_ROWS)}.")
        inputs = RoutingInputs(E=E, eta=eta_t, gamma=gamma_t, refs=refs, negative_rows=opt.negative_rows)
        runtime = RoutedPatch(ad, layout, inputs, routing, attn1=attn1, recorder=recorder)
        ms = model.get_model_object("model_sampling")
        driver = SamplingDriver(runtime, ms.percent_to_sigma(opt.start_percent), ms.percent_to_sigma(opt.end_percent),
                                uuid.uuid4().hex[:10], subject_labels=[s.label for s in subjects.subjects])
        patched = model.clone()
        ref_keys = []
        if refs is not None:
            ref_keys = [s.key for s in layout if s.key in refs.features][1:]  # layer 1 has no M^0: dropped
        # Ŵ_k/Ŵ_v projections of E, once; the adapter then stays out of sampling's VRAM unless the
        # learned router or the file's reference projections W̃ (once per run) need its weights
        mm.load_models_gpu([anystory.patcher])
        runtime.precompute_routes(mm.get_torch_device())
        needs_adapter = runtime.uses_learned_router or runtime.uses_reference_proj  # its weights while sampling
        install(patched, driver, ref_keys, [anystory.patcher] if needs_adapter else [])
        recorder.mode = plan.mode
        log.info("AnyStory: %d subject(s), router %s, η=%.2f γ=%.2f, %d layers, references at %d layers, "
                 "negative rows: %s", n, plan.mode, opt.eta, opt.gamma, len(layout), len(ref_keys), opt.negative_rows)
        return patched, recorder


SDXL = SDXLFamily()


def _tick(pbar) -> None:
    if pbar is not None:
        pbar.update(1)


def _references(subjects: SubjectList, layout, gamma_t: torch.Tensor, gamma: float):
    """(G_i^l of the subjects with references as one ReferenceFeatures or None, γ per subject with 0 for
    subjects without references)."""
    with_refs = [s.refs is not None for s in subjects.subjects]
    if not any(with_refs) or gamma <= 0:
        return None, gamma_t
    if not all(with_refs):
        missing = [i + 1 for i, w in enumerate(with_refs) if not w]
        log.warning("AnyStory: subjects %s have no ReferenceNet features; they get no reference attention", missing)
        gamma_t = gamma_t * torch.tensor(with_refs, dtype=torch.float32)
    return merge_references(subjects, layout), gamma_t


def feathered(masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur of [N, H, W] masks with σ = radius/2 pixels (radius 0: unchanged)."""
    if radius <= 0:
        return masks
    sigma = radius / 2.0
    k = int(2 * round(radius) + 1)
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    m = masks[:, None]
    pad = torch.nn.functional.pad
    m = torch.nn.functional.conv2d(pad(m, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
    m = torch.nn.functional.conv2d(pad(m, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1))
    return m[:, 0].clamp(0, 1)


def warn_duplicates(subjects: SubjectList, by_labels: bool) -> list:
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


def merge_references(subjects: SubjectList, layout) -> ReferenceFeatures:
    """G_i^l of all subjects with references, as one ReferenceFeatures (subjects without get zero tokens)."""
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
