"""The FLUX.1 family: the authors' released AnyStory FLUX model (``anystory_flux.bin`` or its safetensors
conversion) behind the same nodes as SDXL (nodes/family.py).

- load: the file → ``anystory.flux.adapter.FluxAdapter`` in a ModelPatcher (loaded with the MODEL while sampling);
- encode: the subject segmented and square-cropped as the authors' demo does (``anystory.prepare``: 1.04 margin,
  background a neutral gray — what their ``image * mask`` gives after normalisation), ComfyUI's CLIP_VISION
  (SigLIP-so400m-384) → last hidden state → FLUX.1 Redux (the STYLE_MODEL) + the file's LoRA and gate → 81
  subject tokens and 9 routing tokens; the FLUX VAE latent of the 512² masked crop → the reference tokens and
  their mask (the authors sample the VAE posterior; ComfyUI's VAE gives its mean);
- apply: :func:`nodes.flux.patch.apply_anystory_flux` with AnyStory Apply's inputs and the optional
  ANYSTORY_FLUX_OPTIONS (the authors' ``generate`` settings), recorded through a RoutingRecorder.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher

from ...anystory.flux import checkpoint as flux_checkpoint
from ...anystory.flux.adapter import FluxAdapter
from ...anystory.flux.encoder import REDUX_TOKENS, ROUTER_TOKENS, SubjectEncoder, siglip_token_mask
from ...anystory.flux.reference import pack_latent
from ...anystory.flux.subject import FluxReference, FluxSubject
from ...anystory.patch.state import NEGATIVE_BACKGROUND
from ...anystory.prepare import prepare_subject
from ...anystory.recorder import RoutingRecorder
from ..checks import check_weights_finite
from ..types import AnyStoryError, AnyStoryModel, Subject
from .options import FluxOptions
from .patch import AnyStoryFluxError, FluxSettings, apply_anystory_flux

log = logging.getLogger("anystory")

SIGLIP_SIZE = 384   # the authors' SiglipImageProcessor size
REF_SIZE = 512      # the authors' AnyStoryFluxPipeline(ref_size=512)
CROP_SCALE = 1.04   # the authors' demo (app.py image_matting): square side = 1.04 × the mask's longer side
BACKGROUND = 0.5    # their image * mask in the normalised [-1, 1] space: background = mid gray
FLUX_ROUTER_MODES = ("auto", "router")
PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt")


class FluxFamily:
    name = "FLUX"

    # --- files -----------------------------------------------------------------------------------------
    def claims_file(self, path: str) -> bool:
        """Whether ``path`` is an AnyStory FLUX file (safetensors: metadata format; pickle: its three parts,
        read lazily with ``torch.load(weights_only=True, mmap=True)``)."""
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext in (".safetensors", ".sft"):
                from safetensors import safe_open
                with safe_open(path, framework="pt", device="cpu") as f:
                    return (f.metadata() or {}).get("format") == flux_checkpoint.FORMAT
            if ext in PICKLE_EXTS:
                try:
                    obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
                except RuntimeError:  # not a zip checkpoint: mmap does not apply
                    obj = torch.load(path, weights_only=True, map_location="cpu")
                return flux_checkpoint.is_flux_parts(obj)
        except Exception:  # unreadable here: the SDXL reader says what the file is
            return False
        return False

    def load_file(self, model_name: str, path: str, refnet_path: Optional[str], refnet_name: str, dtype,
                  load_device, offload_device) -> AnyStoryModel:
        if refnet_path is not None:
            raise AnyStoryError(f"{model_name} is an AnyStory FLUX model, which has no ReferenceNet file (its "
                                "reference pass runs the FLUX MODEL itself): set refnet_name to 'none'.")
        try:
            weights = flux_checkpoint.load_flux_checkpoint(path)
        except flux_checkpoint.CheckpointError as e:
            raise AnyStoryError(str(e)) from None
        adapter = FluxAdapter(weights)
        check_weights_finite(model_name, list(adapter.state_dict().items()))
        adapter = adapter.to(dtype).eval().requires_grad_(False)
        check_weights_finite(model_name, list(adapter.state_dict().items()), dtype)
        adapter.host_reference(dtype)
        patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=load_device, offload_device=offload_device)
        return AnyStoryModel(name=model_name, adapter=adapter, patcher=patcher)

    # --- the seam ----------------------------------------------------------------------------------------
    def owns(self, anystory: AnyStoryModel) -> bool:
        return isinstance(anystory.adapter, FluxAdapter)

    def owns_model(self, model) -> bool:
        dm = getattr(getattr(model, "model", None), "diffusion_model", None)
        return hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks")

    def check_model(self, model, anystory: AnyStoryModel):
        """The FLUX diffusion model, after checking it has the blocks the file was made for."""
        dm = getattr(getattr(model, "model", None), "diffusion_model", None)
        if not self.owns_model(model):
            raise AnyStoryError(f"{anystory.name} is an AnyStory FLUX model; the connected MODEL is "
                                f"{type(getattr(model, 'model', model)).__name__}, not FLUX. Load FLUX.1-dev "
                                "(UNETLoader or CheckpointLoaderSimple).")
        w = anystory.adapter.weights
        got = (len(dm.double_blocks), len(dm.single_blocks))
        if got != (w.depth, w.depth_single):
            raise AnyStoryError(f"{anystory.name} is made for a FLUX model of {w.depth} double + {w.depth_single} "
                                f"single blocks (FLUX.1-dev); the connected MODEL has {got[0]} + {got[1]}. Load "
                                "FLUX.1-dev.")
        if not getattr(dm.params, "guidance_embed", True):
            log.warning("AnyStory FLUX: the MODEL has no guidance embedding (FLUX.1-schnell?); the AnyStory file was "
                        "trained on FLUX.1-dev")
        return dm

    # --- encode --------------------------------------------------------------------------------------------
    def encode(self, anystory: AnyStoryModel, clip_vision, vae, image, mask=None, model=None, label: str = "",
               strength: float = 1.0, reference: str = "auto", index: int = 0, pbar=None, style_model=None,
               conditioning=None, blank_image=None):
        """One subject: (Subject with the Redux tokens E, routing tokens R and the reference, None, None, the
        reference crop [B, 512, 512, 3]). ``conditioning`` and ``blank_image`` are SDXL's (the FLUX router has
        no background route; its reference pass runs at Apply with the prompt): ignored."""
        if model is not None:
            self.check_model(model, anystory)
        base = redux_weights(style_model)
        if int(getattr(clip_vision, "image_size", SIGLIP_SIZE)) != SIGLIP_SIZE:
            _wrong_vision(anystory, f"a {clip_vision.image_size}-pixel CLIP vision model (CLIP ViT-H/L)")
        try:
            work = mm.get_torch_device()
            prep = prepare_subject(image.to(work), None if mask is None else mask.to(work), clip_size=SIGLIP_SIZE,
                                   ref_size=REF_SIZE, scale=CROP_SCALE, fill=BACKGROUND,
                                   whole_scale=None)  # the authors' demo: always 1.04
        except ValueError as e:
            raise AnyStoryError(f"subject image/mask: {e}") from None
        for w in prep.warnings:
            log.warning("AnyStory subject %r: %s", label or index + 1, w)
        _tick(pbar)

        out = clip_vision.encode_image(prep.clip_image, crop=False)
        feats = getattr(out, "last_hidden_state", None)
        want = int(base["redux_up.weight"].shape[1])
        if feats is None:
            _wrong_vision(anystory, "a vision model without a last hidden state", want)
        if feats.ndim != 3 or feats.shape[-1] != want:
            width = feats.shape[-1] if feats.ndim == 3 else tuple(feats.shape)
            _wrong_vision(anystory, f"a CLIP vision model with {width}-wide features"
                                    f"{' (CLIP ViT-H/14)' if width == 1280 else ''}", want)
        grid = int(round(feats.shape[1] ** 0.5))
        if grid * grid != feats.shape[1]:
            _wrong_vision(anystory, f"a CLIP vision model with {feats.shape[1]} tokens (not a square grid: a CLS "
                                    "token, i.e. CLIP, not SigLIP)", want)
        _tick(pbar)

        dev = mm.get_torch_device()
        feats = feats.to(dev, torch.float32)
        token_mask = siglip_token_mask((prep.clip_mask > 0.5).float(), grid).to(dev)
        base_dev = {k: v.to(dev, torch.float32) for k, v in base.items()}
        ad = anystory.adapter.weights
        try:
            with torch.no_grad():
                redux = SubjectEncoder(base_dev, _to(ad.redux, dev), REDUX_TOKENS)
                router = SubjectEncoder(base_dev, _to(ad.router_embedder, dev), ROUTER_TOKENS)
                E = redux(feats, token_mask).mean(0)
                R = router(feats, token_mask).mean(0)
        except ValueError as e:
            raise AnyStoryError(f"{anystory.name} does not fit this Redux model: {e}. Load flux1-redux-dev.safetensors "
                                "in StyleModelLoader.") from None
        store = mm.intermediate_device()
        E, R = E.to(store), R.to(store)
        _tick(pbar)

        refs = None
        warnings = list(prep.warnings)
        if reference != "off":
            refs = reference_tokens(vae, prep.ref_image[:1], prep.ref_mask[:1])
            if image.shape[0] > 1:
                warnings.append("AnyStory FLUX: the reference features come from the first image of the batch (the "
                                "Redux tokens average all of them)")
                log.warning("AnyStory subject %r: %s", label or index + 1, warnings[-1])
        else:
            log.info("AnyStory: subject %r encoded without reference features (detail preservation off)", label)
        _tick(pbar)
        crop = prep.ref_image[..., :3].float()
        subject = Subject(E=E, R=R, refs=refs, label=(label or "").strip(), strength=float(strength),
                          preview=crop.cpu()[0], warnings=warnings)
        return subject, None, None, crop

    # --- apply ---------------------------------------------------------------------------------------------
    def apply(self, model, anystory: AnyStoryModel, subjects, opt, node_id=None):
        """(a patched clone of ``model``, its RoutingRecorder). ``opt``: nodes.sdxl.ApplyOptions."""
        self.check_model(model, anystory)
        fo: FluxOptions = opt.flux if opt.flux is not None else FluxOptions()
        if opt.router_mode not in FLUX_ROUTER_MODES:
            raise AnyStoryError(f"router_mode '{opt.router_mode}' is not available on FLUX: AnyStory FLUX routes with "
                                "its learned router. Use router_mode auto (or router), and switch the router with "
                                "AnyStory FLUX Options' router.")
        if opt.region_masks is not None:
            raise AnyStoryError("region_masks are not supported on FLUX (its router decides every region): "
                                "disconnect region_masks.")
        if opt.negative_rows != NEGATIVE_BACKGROUND:
            log.warning("AnyStory: negative_rows %r applies to SDXL models only; on FLUX the negative-prompt rows "
                        "see no subject, as in the authors' pipeline", opt.negative_rows)
        subs = subjects.subjects
        n = len(subs)
        if fo.router == "off" and opt.router_mode == "router":
            raise AnyStoryError("router_mode is 'router' but AnyStory FLUX Options has router 'off': set one of them "
                                "to auto.")
        router = fo.router == "on" or opt.router_mode == "router" or (fo.router == "auto" and n > 1)
        settings = FluxSettings(redux_scale=fo.redux_scale, redux_start_at=fo.redux_start, redux_end_at=fo.redux_end,
                                ref_shift=fo.ref_shift, enable_ref_mask=fo.ref_mask, ref_start_at=fo.ref_start,
                                ref_end_at=fo.ref_end, enable_ref_cache=fo.ref_cache, enable_router=router)
        flux_subjects = [flux_subject(s) for s in subs]
        redux_gains = [opt.eta * s.strength for s in subs]
        ref_gains = [opt.gamma * s.strength for s in subs]
        recorder = RoutingRecorder(n, subjects.labels, enabled=bool(opt.record_routing))
        recorder.mode = "router" if router else "off (every subject everywhere)"
        if not router and n > 1:
            recorder.no_maps_reason = ("the FLUX router is off (AnyStory FLUX Options' router): every image token "
                                       "sees every subject, there is no routing map to show")
        try:
            patched, patch = apply_anystory_flux(
                model, anystory.adapter.weights, flux_subjects, settings, redux_gains=redux_gains, ref_gains=ref_gains,
                recorder=recorder, start_percent=opt.start_percent, end_percent=opt.end_percent,
                additional_models=[anystory.patcher], labels=[s.label for s in subs])
        except AnyStoryFluxError as e:
            raise AnyStoryError(str(e)) from None
        missing = [i + 1 for i, s in enumerate(subs) if s.refs is None]
        if missing and len(missing) < n:
            log.info("AnyStory FLUX: subjects %s have no reference features (encoded with reference 'off')", missing)
        log.info("AnyStory FLUX: %d subject(s), router %s, redux_scale %.2f (η %.2f) in [%.2f, %.2f), references in "
                 "[%.2f, %.2f) shift %.2f (γ %.2f), %d reference keys, ref mask %s, ref cache %s",
                 n, "on" if router else "off", fo.redux_scale, opt.eta, fo.redux_start, fo.redux_end, fo.ref_start,
                 fo.ref_end, fo.ref_shift, opt.gamma, sum(patch.ref_visible.values()), fo.ref_mask, fo.ref_cache)
        return patched, recorder


FLUX = FluxFamily()


# ------------------------------------------------------------------------------------------------
def redux_weights(style_model) -> dict:
    """The FLUX.1 Redux weights (``redux_up.*``, ``redux_down.*``) of a ComfyUI STYLE_MODEL."""
    if style_model is None:
        raise AnyStoryError("AnyStory FLUX encodes subjects with FLUX.1 Redux: connect a StyleModelLoader with "
                            "flux1-redux-dev.safetensors to the style_model input of AnyStory Subject Encode.")
    module = getattr(style_model, "model", style_model)
    sd = module.state_dict() if hasattr(module, "state_dict") else {}
    need = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")
    if not all(k in sd for k in need):
        raise AnyStoryError(f"the STYLE_MODEL is a {type(module).__name__}, not FLUX.1 Redux: load "
                            "flux1-redux-dev.safetensors in StyleModelLoader.")
    return {k: sd[k] for k in need}


def _wrong_vision(anystory: AnyStoryModel, what: str, want: int = 1152) -> None:
    raise AnyStoryError(f"the CLIP vision input is {what}, but {anystory.name} (AnyStory FLUX) encodes subjects with "
                        f"SigLIP so400m-384 ({want}-wide features, the model FLUX Redux uses): load "
                        "sigclip_vision_patch14_384.safetensors in CLIPVisionLoader.")


def reference_tokens(vae, image: torch.Tensor, mask: torch.Tensor) -> FluxReference:
    """The packed, processed FLUX VAE latent of the masked 512² crop [1, 512, 512, 3] and its token mask (1 where
    any pixel of a 16 × 16 patch is subject), as the authors' ``encode_ref_condition``."""
    channels = getattr(vae, "latent_channels", 16)
    if channels != 16:
        raise AnyStoryError(f"the VAE makes {channels}-channel latents (an SD/SDXL VAE); AnyStory FLUX needs the FLUX "
                            "VAE: load ae.safetensors in VAELoader.")
    latent = vae.encode(image[..., :3])
    if latent.ndim != 4 or latent.shape[1] != 16 or latent.shape[-1] % 2 or latent.shape[-2] % 2:
        raise AnyStoryError(f"the VAE gave a latent of shape {tuple(latent.shape)}; AnyStory FLUX needs the FLUX VAE "
                            "(16 channels, 8× smaller): load ae.safetensors in VAELoader.")
    latent = comfy.latent_formats.Flux().process_in(latent.float())
    h, w = latent.shape[-2] // 2, latent.shape[-1] // 2
    tokens = pack_latent(latent).to(mm.intermediate_device())
    tmask = siglip_token_mask((mask > 0.5).float(), h).to(mm.intermediate_device()) if h == w else None
    if tmask is None:
        raise AnyStoryError(f"the reference latent is not square ({h} × {w} tokens)")
    return FluxReference(tokens=tokens, hw=(h, w), mask=tmask)


def flux_subject(s: Subject) -> FluxSubject:
    refs = s.refs
    return FluxSubject(redux_tokens=s.E[None].float(), ref_tokens=None if refs is None else refs.tokens.float(),
                       ref_hw=(0, 0) if refs is None else tuple(refs.hw),
                       router_tokens=None if s.R is None else s.R[None].float(),
                       ref_mask=None if refs is None else refs.mask, label=s.label)


def _to(sd: dict, dev) -> dict:
    return {k: v.to(dev, torch.float32) for k, v in sd.items()}


def _tick(pbar) -> None:
    if pbar is not None:
        pbar.update(1)


__all__ = ["FLUX", "FluxFamily", "redux_weights", "reference_tokens", "flux_subject"]
