"""ComfyUI side of the routed model patch: maps ComfyUI's attention hooks and wrappers onto
``anystory.patch.RoutedPatch`` (see ../shared/docs/COMFYUI.md for the hook order).

Installed on a ``model.clone()`` only:
- OUTER_SAMPLE wrapper: one sampling run → begin/end of the per-run caches and of the recorder;
- PREDICT_NOISE wrapper: once per step → sigma (from the run's schedule and the call count for samplers
  that call the model once per step, else read from the device: one host sync), step index, start/end
  window, and which conditioning uuids are positive (cond) or negative (uncond);
- DIFFUSION_MODEL wrapper: once per UNet call → a fresh CallState (the maps of this call only);
- attn2_patch: the router at every cross-attention layer;
- attn2 replace at every layer: text attention (or the replace that was there before, e.g. IPAdapter)
  + eq. 5; attn1 replace: eq. 6-8.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.ops as comfy_ops
import comfy.patcher_extension as pe

from ..anystory.patch import CallState, RoutedPatch, chunks_from_roles
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


class ComfyRoutedPatch:
    """Holds one RoutedPatch and the ComfyUI callables that drive it. Survives ModelPatcher.clone()
    by reference (deepcopy returns self): it holds modules and tensors that must not be copied."""

    def __init__(self, runtime: RoutedPatch, blocks: dict, sigma_start: float, sigma_end: float, uid: str,
                 subject_labels: Optional[list] = None):
        self.runtime = runtime
        self.subject_labels = list(subject_labels or [])
        self.blocks = blocks  # layer key → BasicTransformerBlock of the denoising UNet
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
        runtime.project_reference = self.project_reference

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):  # ModelPatcher.model_patches_to: weights stay where they are
        return self

    # --- projections owned by the UNet ---------------------------------------------------------------
    def project_reference(self, key, g: torch.Tensor):
        attn1 = self.blocks[key].attn1
        return attn1.to_k(g), attn1.to_v(g)

    # --- wrappers -----------------------------------------------------------------------------
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        self._run_hw = tuple(noise.shape[-2:])
        fn = getattr(getattr(sampler, "sampler_function", None), "__name__", None)
        self._by_count = fn in ONE_CALL_PER_STEP and os.environ.get("ANYSTORY_STEP_SYNC", "0") != "1"
        self._calls = 0
        self._check = None
        from .refnet import ENCODER_GRAPHS
        ENCODER_GRAPHS.release()  # the encoders' CUDA graphs are not kept in VRAM while sampling
        self.runtime.begin_run(sigmas=sigmas, latent_hw=self._run_hw, batch=int(noise.shape[0]))
        out = None
        try:
            out = executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
            if torch.is_tensor(out) and not bool(torch.isfinite(out).all()):  # one host sync per sampling
                raise AnyStoryError(
                    "the sampled latent contains NaN or infinite values: the model overflowed (fp16) or an input "
                    "holds NaN/inf (e.g. a prompt weight like '(word:1e30)', a LoRA, an image). Check those "
                    "inputs; for fp16 overflow start ComfyUI with --force-fp32 or --bf16-unet, or lower η/γ. "
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
        if self.runtime.attention_router is not None and self.runtime.inputs.mode == "attention" and not labels:
            raise AnyStoryError(
                "AnyStory's attention router needs to know where the subjects' words are in the positive prompt: "
                "encode the positive prompt with 'AnyStory Text Encode' (instead of CLIPTextEncode), or give "
                "region_masks and use router_mode 'masks'.")
        info = StepInfo(active, step, cond_uuids, tuple(x.shape[-2:]), labels)
        mo = dict(model_options)
        mo["transformer_options"] = dict(to)
        mo["transformer_options"][self.step_key] = info
        return executor(x, timestep, mo, seed)

    def diffusion_model(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if transformer_options.get("anystory_capture"):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
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
        state = CallState(chunks_from_roles(roles, x.shape[0] // len(cou)), active=active,
                          step=info.step if info is not None else 0)
        if info is not None and info.labels and uuids is not None and len(uuids) == len(cou):
            state.labels = []
            for u, is_cond in zip(uuids, roles):
                tag = info.labels.get(u) if is_cond else None
                state.labels.append(None if tag is None else [list(tag.get(lab, [])) for lab in self.subject_labels])
        to = dict(transformer_options)
        to[self.state_key] = state
        self.runtime.begin_call(state)
        try:
            return executor(x, timesteps, context, y, control, to, **kwargs)
        finally:
            state.index.clear()
            state.last_index = None


def _comfy_sdpa():
    """ComfyUI's SDPA (torch's, under ComfyUI's backend priority): the same kernel as its attention."""
    return comfy_ops.scaled_dot_product_attention


def _key(extra_options) -> tuple:
    b = extra_options["block"]
    return (b[0], b[1], extra_options.get("block_index", 0))


def _hw(extra_options) -> Optional[tuple]:
    shape = extra_options.get("activations_shape")
    return (int(shape[-2]), int(shape[-1])) if shape is not None else None


class RouterPatch:
    """attn2_patch: the router of layer l on n = norm2(x); inputs pass through unchanged."""

    def __init__(self, owner: ComfyRoutedPatch):
        self.owner = owner

    def __deepcopy__(self, memo):
        return self

    def to(self, *a, **k):
        return self

    def __call__(self, n, context, value, extra_options):
        state = extra_options.get(self.owner.state_key)
        if state is not None and state.active and "block" in extra_options:
            hw = _hw(extra_options)
            if hw is not None:
                self.owner.runtime.route(state, _key(extra_options), n, hw)
        return n, context, value


class _Replace:
    def __init__(self, owner: ComfyRoutedPatch, key: tuple, previous=None):
        self.owner = owner
        self.key = key
        self.previous = previous  # a replace that was already at this key (e.g. IPAdapter): chained

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: share the owner (weights, caches) and the chained
        # replace, but give the clone its own list of added callbacks (IPAdapter's .add() mutates the
        # replace it finds on ITS clone; that must not reach the MODEL it was cloned from)
        new = copy.copy(self)
        if hasattr(self, "callbacks"):
            new.callbacks = list(self.callbacks)
        return new

    def to(self, *a, **k):
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(*a, **k)
        return self

    def models(self):
        prev = self.previous
        return prev.models() if prev is not None and hasattr(prev, "models") else []

    def _base(self, extra_options):
        prev = self.previous
        if prev is not None:
            return lambda q, k, v: prev(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        prec = extra_options.get("attn_precision")
        return lambda q, k, v: comfy_attention.optimized_attention(q, k, v, heads, attn_precision=prec,
                                                                    transformer_options=extra_options)

    def _own_attention(self, extra_options) -> bool:
        """This layer's attention is ComfyUI's torch-SDPA attention and nothing else (no other replace before
        this one, no attention override, no upcast): the patch may call ComfyUI's SDPA itself (the same
        kernels under the same backend priority), keep the heads, and add into the fresh result in place."""
        return (self.previous is None and extra_options.get("attn_precision") is None
                and "optimized_attention_override" not in extra_options
                and comfy_attention.optimized_attention is getattr(comfy_attention, "attention_pytorch", None))


class Attn2Replace(_Replace):
    """attn2 of layer l: text attention + η Σ_i σ(M_i^l) ⊙ Attn(Q, E_i Ŵ_k^l, E_i Ŵ_v^l).

    Nodes applied AFTER AnyStory that find this replace at their key may ``.add(callback, **kwargs)``
    (the IPAdapter_plus convention): each callback is called as ``callback(out, q, k, v, extra_options,
    **kwargs)`` and its result added to the output when ``kwargs["sigma_end"] <= sigma <=
    kwargs["sigma_start"]`` (both optional), in the order they were added."""

    def __init__(self, owner: ComfyRoutedPatch, key: tuple, previous=None):
        super().__init__(owner, key, previous)
        self.callbacks: list = []  # [(callback, kwargs)] added by later nodes (IPAdapter_plus's .add)

    def add(self, callback, **kwargs):
        self.callbacks.append((callback, kwargs))

    def set_new_condition(self, **kwargs):  # the pre-2024 IPAdapter_plus API on an existing replace
        raise AnyStoryError("this IPAdapter version cannot be applied after AnyStory Apply (it expects its own "
                            "patch at the attention layers): apply it before AnyStory Apply, or update "
                            "ComfyUI_IPAdapter_plus")

    def __call__(self, q, k, v, extra_options):
        base = self._base(extra_options)
        state = extra_options.get(self.owner.state_key)
        if state is None or not state.active:
            out = base(q, k, v)
        else:
            own = self._own_attention(extra_options)
            out = self.owner.runtime.cross_attention(state, _key(extra_options), q, k, v, extra_options["n_heads"],
                                                     base, text_sdpa=_comfy_sdpa() if own else None, base_owned=own)
        if self.callbacks:
            out = self._added(out, q, k, v, extra_options)
        return out

    def _added(self, out, q, k, v, extra_options):
        sigma = self._sigma(extra_options.get("sigmas"))
        dtype = out.dtype
        for callback, kw in self.callbacks:
            if kw.get("sigma_end", 0.0) <= sigma <= kw.get("sigma_start", 999999999.9):
                out = out + callback(out, q, k, v, extra_options, **kw)
        return out.to(dtype)

    def _sigma(self, sigmas) -> float:
        """σ of this model call on the host: read once per call (one device sync), not once per layer."""
        if sigmas is None:
            return 999999999.9
        seen = self.owner._sigma_seen
        if seen is None or seen[0] is not sigmas:
            seen = (sigmas, float(sigmas.detach().reshape(-1)[0].cpu()))
            self.owner._sigma_seen = seen
        return seen[1]


class Attn1Replace(_Replace):
    """attn1 of layer l: eq. 6-8 (the subject's reference K̃/Ṽ with the bias from M^{l-1})."""

    def __call__(self, q, k, v, extra_options):
        base = self._base(extra_options)
        state = extra_options.get(self.owner.state_key)
        if state is None or not state.active:
            return base(q, k, v)
        own = self._own_attention(extra_options)
        return self.owner.runtime.self_attention(state, _key(extra_options), q, k, v, extra_options["n_heads"],
                                                 _hw(extra_options), base, plain_sdpa=_comfy_sdpa() if own else None)


def install(model, owner: ComfyRoutedPatch, reference_keys: list, additional_models: list) -> None:
    """Put the patch on ``model`` (a clone). Existing replaces at the same keys are chained, not dropped."""
    to = model.model_options.setdefault("transformer_options", {})
    replaces = to.get("patches_replace", {})
    prev2 = replaces.get("attn2", {})
    prev1 = replaces.get("attn1", {})
    for spec in owner.runtime.layout:
        k = spec.key
        previous = prev2.get(k) or prev2.get(k[:2])
        model.set_model_attn2_replace(Attn2Replace(owner, k, previous), k[0], k[1], k[2])
    skipped = []
    for k in reference_keys:
        if k in prev1 or k[:2] in prev1:
            skipped.append(k)  # someone else replaces this attn1 (e.g. SAG): keep theirs, no reference here
            continue
        model.set_model_attn1_replace(Attn1Replace(owner, k), k[0], k[1], k[2])
    if skipped:
        log.warning("AnyStory: %d self-attention layers already have a patch from another node (%s…); routed "
                    "references are left out there", len(skipped), skipped[0])
    model.set_model_attn2_patch(RouterPatch(owner))
    model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, owner.state_key, owner.outer_sample)
    model.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, owner.state_key, owner.predict_noise)
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, owner.state_key, owner.diffusion_model)
    if additional_models:
        model.set_additional_models(owner.state_key, additional_models)
