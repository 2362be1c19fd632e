"""Sampling-level hooks, the same for every model family: ComfyUI's wrappers drive a family runtime.

Installed on a ``model.clone()`` only (:meth:`SamplingDriver.install`):
- OUTER_SAMPLE wrapper: one sampling run → begin/end of the runtime's per-run caches and of the recorder;
  the sampled latent is checked for NaN/inf once;
- PREDICT_NOISE wrapper: once per step → σ (from the run's schedule and the call count for samplers that
  call the model once per step, else read from the device: one host sync), step index, start/end window,
  and which conditioning uuids are positive (cond) or negative (uncond). Cond rows are routed to the
  subjects; uncond rows (CFG's negative prompt, DualCFGGuider's middle prompt) get the background route and,
  unless AnyStory Apply's negative_rows says "same references as positive", no references
  (anystory.patch.state.NEGATIVE_ROWS says why);
- DIFFUSION_MODEL wrapper: once per model call → a fresh CallState (the maps of this call only), which
  the family's hooks (SDXL: nodes/sdxl_hooks.py; FLUX: nodes/flux/patch.py) find in ``transformer_options``;
  a runtime with ``run_call`` runs the call itself (FLUX appends its subject tokens to the text there). The
  wrapper reads its arguments by the diffusion model's own signature (a UNet's and FLUX's differ).
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.patcher_extension as pe

from ..anystory.patch import CallState, chunks_from_roles
from . import state
from .text import LABELS_KEY
from .types import AnyStoryError

log = logging.getLogger("anystory")

# samplers that evaluate the model once per step, at sigmas[i] (ComfyUI's k-diffusion functions): for these
# the step of a model call is its position in the run, so σ need not be read back from the device
ONE_CALL_PER_STEP = {
    "sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_gpu", "sample_dpmpp_3m_sde", "sample_dpmpp_3m_sde_gpu", "sample_ddpm", "sample_lcm",
    "sample_ipndm", "sample_deis",
}


@dataclass
class StepInfo:
    active: bool
    step: int
    cond_uuids: Optional[set]
    latent_hw: Optional[tuple]
    labels: Optional[dict] = None  # uuid → {label: token positions} (AnyStoryTextEncode)
    steps: Optional[int] = None  # steps of the run (len(sample_sigmas) − 1) when the sampler gives them


class SamplingDriver:
    """Drives one family runtime (anystory.patch.RoutedPatch for SDXL) through ComfyUI's sampling: run
    begin/end, σ and step per model call, start/end window, which rows are cond/uncond, the label
    positions of AnyStory Text Encode. Survives ModelPatcher.clone() by reference (deepcopy returns
    self): the runtime holds modules and tensors that must not be copied.

    The runtime provides ``begin_run(**meta)``, ``end_run(**meta)``, ``begin_call(state)`` and
    ``routing.needs_labels``; the family's hooks read the CallState under :attr:`state_key`."""

    def __init__(self, runtime, sigma_start: float, sigma_end: float, uid: str,
                 subject_labels: Optional[list] = None):
        self.runtime = runtime
        self.subject_labels = list(subject_labels or [])
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.uid = uid
        self.state_key = f"anystory_state_{uid}"
        self.step_key = f"anystory_step_{uid}"
        self._run_hw = None
        self._sigma_seen = None  # (sigmas tensor of the current model call, its value on the host)
        self._sigmas_seen = None  # (sample_sigmas of the run, as host floats)
        self._by_count = False  # this run's σ comes from the call count (see _step_sigma)
        self._calls = 0
        self._check = None  # (event, pinned host copy of a call's σ, the σ the count gave it)

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):  # ModelPatcher.model_patches_to: weights stay where they are
        return self

    # --- wrappers -----------------------------------------------------------------------------
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        self._run_hw = tuple(noise.shape[-2:])
        fn = getattr(getattr(sampler, "sampler_function", None), "__name__", None)
        self._by_count = fn in ONE_CALL_PER_STEP and os.environ.get("ANYSTORY_STEP_SYNC", "0") != "1"
        self._calls = 0
        self._check = None
        state.ENCODER_GRAPHS.release()  # the encoders' CUDA graphs are not kept in VRAM while sampling
        self.runtime.begin_run(sigmas=sigmas, latent_hw=self._run_hw, batch=int(noise.shape[0]))
        out = None
        try:
            out = executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
            if torch.is_tensor(out) and not bool(torch.isfinite(out).all()):  # one host sync per sampling
                raise AnyStoryError(
                    "the sampled latent contains NaN or infinite values: the model overflowed (fp16) or an input "
                    "holds NaN/inf (e.g. a prompt weight like '(word:1e30)', a LoRA, an image). Check those "
                    "inputs; for fp16 overflow start ComfyUI with --force-fp32 or --bf16-unet, or lower "
                    "subject_strength / detail_strength. "
                    "Nothing of this run is kept: the next prompt is not affected.")
            return out
        finally:
            self.runtime.end_run(output=out)
            self._run_hw = None
            self._sigma_seen = None
            self._sigmas_seen = None
            self._check = None

    def _step_sigma(self, timestep, host) -> tuple:
        """(σ of this model call on the host, its step when σ came from the count else None). For a
        sampler that evaluates the model once per step (ONE_CALL_PER_STEP) σ is the run's sigma at this
        call's position — no device sync, which costs a host-bound sampling the GPU's whole queue every
        step. A non-blocking copy of the real σ is compared when it has arrived (a call or two later); on
        a mismatch (a sampler that is not what its name says, a model called outside the loop) the run
        reads σ from the device from then on."""
        chk = self._check
        if chk is not None and chk[0].query():
            self._check = None
            if abs(float(chk[1][0]) - chk[2]) > 1e-4 * max(1.0, abs(chk[2])):
                self._by_count = False
                log.info("AnyStory: this sampler's model calls are not one per step; reading σ per call")
        c = self._calls
        self._calls += 1
        if self._by_count and host is not None and c >= len(host) - 1:
            self._by_count = False  # more calls than steps: not one call per step after all
        if not self._by_count or host is None or not timestep.is_cuda:
            return float(timestep.reshape(-1)[0]), None  # a host sync (none for a timestep on the CPU)
        sigma = host[c]
        if self._check is None:
            buf = torch.empty(1, dtype=torch.float32, pin_memory=True)
            buf.copy_(timestep.reshape(-1)[:1], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(timestep.device))  # the stream the copy was queued on
            self._check = (ev, buf, sigma)
        return sigma, c

    def predict_noise(self, executor, x, timestep, model_options={}, seed=None):
        to = model_options.get("transformer_options", {})
        step = 0
        ss = to.get("sample_sigmas")
        host = None
        if ss is not None:
            seen = self._sigmas_seen  # the run's sigmas on the host, read once per run (not per step)
            if seen is None or seen[0] is not ss:
                seen = (ss, [float(x) for x in ss.detach().float().cpu()])
                self._sigmas_seen = seen
            host = seen[1]
        sigma, counted = self._step_sigma(timestep, host)
        active = self.sigma_end <= sigma <= self.sigma_start
        if counted is not None:
            step = counted  # σ came from the count: so does the step (a schedule may repeat a sigma)
        elif host is not None:
            hits = [i for i, x in enumerate(host) if abs(x - sigma) <= 1e-6 + 1e-4 * abs(sigma)]
            if hits:
                step = hits[0]
            else:  # an intermediate evaluation (dpmpp_sde, …) between sigmas[i] and sigmas[i+1]: step i
                step = max(0, sum(1 for x in host if x > sigma) - 1)
        cond_uuids, labels = None, None
        guider = getattr(executor, "class_obj", None)
        conds = getattr(guider, "conds", None)
        if isinstance(conds, dict):
            cond_uuids, labels = set(), {}
            for name, entries in conds.items():
                if name == "negative" or entries is None:
                    continue
                for e in entries:
                    # DualCFGGuider's "middle" prompt is tagged prompt_type=negative by ComfyUI: not routed
                    if isinstance(e, dict) and e.get("prompt_type") != "negative":
                        cond_uuids.add(e.get("uuid"))
                        if e.get(LABELS_KEY) is not None:
                            labels[e.get("uuid")] = e[LABELS_KEY]
        if getattr(getattr(self.runtime, "routing", None), "needs_labels", False) and not labels:
            raise AnyStoryError(
                "AnyStory's attention router needs to know where the subjects' words are in the positive prompt: "
                "encode the positive prompt with 'AnyStory Text Encode' (instead of CLIPTextEncode), or give "
                "region_masks and use router_mode 'masks'.")
        info = StepInfo(active, step, cond_uuids, tuple(x.shape[-2:]), labels,
                        steps=len(host) - 1 if host is not None else None)
        mo = dict(model_options)
        mo["transformer_options"] = dict(to)
        mo["transformer_options"][self.step_key] = info
        return executor(x, timestep, mo, seed)

    def diffusion_model(self, executor, *args, **kwargs):
        bound = _bind(executor, args, kwargs)
        a = bound.arguments
        transformer_options = a.get("transformer_options") or {}
        if transformer_options.get("anystory_capture"):
            return executor(*args, **kwargs)
        x = a["x"]
        info: Optional[StepInfo] = transformer_options.get(self.step_key)
        cou = list(transformer_options.get("cond_or_uncond") or [0])
        uuids = transformer_options.get("uuids")
        if info is not None and info.cond_uuids is not None and uuids is not None and len(uuids) == len(cou):
            roles = [u in info.cond_uuids for u in uuids]
        else:  # no guider information: ComfyUI's convention 0 = positive
            roles = [c == 0 for c in cou]
        active = info.active if info is not None else True
        hw = info.latent_hw if info is not None else self._run_hw
        if hw is not None and tuple(x.shape[-2:]) != tuple(hw):
            active = False  # area conditioning / tiles crop the latent: masks and maps would not line up
        if x.shape[0] % len(cou):
            active = False
        call = CallState(chunks_from_roles(roles, x.shape[0] // len(cou)), active=active,
                         step=info.step if info is not None else 0,
                         steps=info.steps if info is not None else None)
        if uuids is not None and len(uuids) == len(cou):
            call.uuids = list(uuids)
        if info is not None and info.labels and uuids is not None and len(uuids) == len(cou):
            call.labels = []
            for u, is_cond in zip(uuids, roles):
                tag = info.labels.get(u) if is_cond else None
                call.labels.append(None if tag is None else [list(tag.get(lab, [])) for lab in self.subject_labels])
        to = dict(transformer_options)
        to[self.state_key] = call
        a["transformer_options"] = to
        self.runtime.begin_call(call)
        try:
            run_call = getattr(self.runtime, "run_call", None)
            if run_call is not None:
                return run_call(executor, bound, call)
            return executor(*bound.args, **bound.kwargs)
        finally:
            call.index.clear()
            call.last_index = None

    def install(self, model, additional_models: list) -> None:
        """Put the three wrappers on ``model`` (a clone); ``additional_models``: patchers ComfyUI must load
        with the MODEL while sampling (e.g. the adapter when the learned router runs)."""
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, self.state_key, self.outer_sample)
        model.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, self.state_key, self.predict_noise)
        model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, self.state_key, self.diffusion_model)
        if additional_models:
            model.set_additional_models(self.state_key, additional_models)


_SIGNATURES: dict = {}


def _bind(executor, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """The arguments of a DIFFUSION_MODEL call by name, from the wrapped ``_forward``'s own signature (a UNet's
    is (x, timesteps, context, y, control, transformer_options), FLUX's (x, timestep, context, y, guidance,
    ref_latents, control, transformer_options))."""
    fn = getattr(executor, "original", None)
    key = getattr(fn, "__func__", fn)
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
    if "transformer_options" not in bound.arguments:
        bound.arguments["transformer_options"] = {}
    return bound
