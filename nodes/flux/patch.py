"""AnyStory FLUX on a ComfyUI FLUX MODEL: installed on ``model.clone()`` through ComfyUI's own hooks.

- ``transformer_options["patches_replace"]["dit"][("double_block", i)]`` / ``("single_block", i)`` (set with
  ``ModelPatcher.set_model_patch_replace``): every block runs :func:`anystory.flux.blocks.double_block_forward` /
  ``single_block_forward`` while AnyStory acts in the call, else the block (or the replace that was there
  before) as usual;
- the family-independent :class:`nodes.sampling.SamplingDriver` (OUTER_SAMPLE, PREDICT_NOISE and DIFFUSION_MODEL
  wrappers) drives :class:`FluxAnyStoryPatch` as its runtime: a run begins and ends (the reference cache and the
  recorder live for one run), each step's index comes from the run's schedule without a host sync (σ from the call
  count), the start/end percent window and the cond/uncond rows are the driver's. Per model call
  (:meth:`FluxAnyStoryPatch.run_call`) the scaled Redux tokens join the text conditioning while they are active (the
  authors append them before ``context_embedder``; here they go FIRST, so that the keys every query sees are one view:
  the same attention, ComfyUI's ``txt_in`` and zero text ids treat every text token alike), the routing stream and the
  reference keys/values are prepared, and the blocks get a :class:`anystory.flux.blocks.FluxCallState` in a copy of
  ``transformer_options``.

The model's weights are never touched: every projection is the model's own module call (comfy.ops casting, fp8,
LoRA weight patches, offloading), the AnyStory LoRAs are deltas on the extra streams' outputs. LoRA targets are
placed with ComfyUI's key map (``comfy.lora.model_lora_keys_unet``, which uses ``comfy.utils.flux_to_diffusers``).

Step windows follow the authors: with N = len(sample_sigmas) − 1 steps, a window [a, b) covers the steps i with
int(N·a + 0.5) ≤ i < int(N·b + 0.5); a model call outside a sampler (no PREDICT_NOISE) finds its step in
``transformer_options["sample_sigmas"]`` (one host sync), or counts as step 0 of 1.

Beyond the authors' ``generate``: per subject a Redux gain (multiplies ``redux_scale``; 0 leaves its Redux tokens
out) and a reference gain g (adds ln g to ``ref_shift`` on its reference keys; 0 leaves its references out), both
1 by default; rows of a negative prompt (CFG > 1) see no subject (plain FLUX), as the SDXL family routes them to
the background.
"""
from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import comfy.lora

from ...anystory.flux.blocks import FluxCallState, RouterStream, double_block_forward, single_block_forward
from ...anystory.flux.checkpoint import AnyStoryFluxWeights
from ...anystory.flux.fast import KeyPlan, visible_reference
from ...anystory.flux.lora import REF_SITES, ROUTER_SITES, lora_targets
from ...anystory.flux.reference import flux_vec, ref_position_ids, reference_kv, router_stream_input
from ...anystory.flux.subject import FluxSubject
from ..sampling import SamplingDriver

log = logging.getLogger("anystory")
MODEL_KEY = "anystory_flux_model"  # the FLUX module of the call, for the block replaces


class AnyStoryFluxError(ValueError):
    """A setting or input the FLUX patch cannot use (message: what was found, what is expected, the fix)."""


@dataclass
class FluxSettings:
    """The authors' ``generate`` parameters (their defaults)."""

    redux_scale: float = 0.6
    redux_start_at: float = 0.1
    redux_end_at: float = 0.3
    ref_shift: float = 0.0
    enable_ref_mask: bool = True
    ref_start_at: float = 0.0
    ref_end_at: float = 1.0
    enable_ref_cache: bool = True
    enable_router: bool = False  # AnyStoryFluxPipeline.generate's default; their demo switches it on for 2+ subjects
    record_maps: bool = False    # keep the one-hot maps per step in FluxAnyStoryPatch.maps (tests, debugging)


def _window(n_steps: int, start: float, end: float, step: int) -> bool:
    return int(n_steps * start + 0.5) <= step < int(n_steps * end + 0.5)


def step_of(transformer_options: dict, timestep: torch.Tensor) -> tuple[int, int]:
    """(step index, number of steps) of a model call from the run's ``sample_sigmas`` (reads σ on the host: for
    model calls outside a sampler run; within one the SamplingDriver gives the step)."""
    ss = transformer_options.get("sample_sigmas")
    if ss is None:
        return 0, 1
    host = [float(s) for s in ss.detach().float().cpu()]
    sig = transformer_options.get("sigmas", timestep)
    sigma = float(sig.reshape(-1)[0])
    for i, s in enumerate(host[:-1]):
        if abs(s - sigma) <= 1e-6 + 1e-4 * abs(sigma):
            return i, len(host) - 1
    return max(0, sum(1 for s in host[:-1] if s > sigma) - 1), len(host) - 1  # a sampler's intermediate call


class _NoLabels:
    """The driver asks the routing whether it needs label positions (SDXL's attention router): FLUX never."""

    needs_labels = False


class FluxAnyStoryPatch:
    """The runtime of one AnyStory FLUX apply (driven by a SamplingDriver); survives ModelPatcher.clone() by
    reference. ``redux_gains`` / ``ref_gains``: per subject (module docstring), default 1."""

    routing = _NoLabels()

    def __init__(self, weights: AnyStoryFluxWeights, subjects: Sequence[FluxSubject], key_map: dict,
                 depth: int, depth_single: int, settings: Optional[FluxSettings] = None,
                 position_delta: Optional[Sequence[int]] = None, redux_gains: Optional[Sequence[float]] = None,
                 ref_gains: Optional[Sequence[float]] = None, recorder=None):
        if not subjects:
            raise AnyStoryFluxError("AnyStory FLUX got no subjects: encode at least one subject")
        if (weights.depth, weights.depth_single) != (depth, depth_single):
            raise AnyStoryFluxError(
                f"the AnyStory FLUX file is for {weights.depth} double + {weights.depth_single} single blocks, the "
                f"MODEL has {depth} + {depth_single}: use it with FLUX.1-dev (19 + 38 blocks)")
        self.weights = weights
        self.subjects = list(subjects)
        n = len(self.subjects)
        self.settings = settings or FluxSettings()
        self.depth, self.depth_single = depth, depth_single
        self.position_delta = position_delta
        self.redux_gains = [float(g) for g in (redux_gains if redux_gains is not None else [1.0] * n)]
        gains = [float(g) for g in (ref_gains if ref_gains is not None else [1.0] * n)]
        if len(self.redux_gains) != n or len(gains) != n:
            raise AnyStoryFluxError(f"{n} subjects need {n} Redux and reference gains")
        self.ref_gains = [g if s.ref_tokens is not None else 0.0 for g, s in zip(gains, self.subjects)]
        self.recorder = recorder
        self.key = uuid.uuid4().hex[:10]
        self.state_key = f"anystory_flux_state_{self.key}"
        self.ref_lora, self.ignored_ref = lora_targets(weights.ref_lora, REF_SITES, depth, depth_single, key_map)
        # the reference pass runs once per run when cached: its LoRA weights go to the device per call only
        self.ref_lora.keep = not self.settings.enable_ref_cache
        self.router_lora, self.ignored_router = lora_targets(weights.router_lora, ROUTER_SITES, depth, depth_single,
                                                             key_map)
        if self.ignored_ref or self.ignored_router:
            log.info("AnyStory FLUX: LoRA modules the authors never enable, left out: %s",
                     ", ".join((self.ignored_ref + self.ignored_router)[:8]))
        if self.settings.enable_router and any(s.router_tokens is None for s in self.subjects):
            raise AnyStoryFluxError("enable_router is on but a subject has no routing tokens: encode it with the "
                                    "router embedder or switch the router off")
        # the reference stream: subjects with references and a gain > 0, their visible tokens (host tensors)
        self.ref_subjects = [j for j, g in enumerate(self.ref_gains) if g > 0]
        lengths = [self.subjects[j].ref_tokens.shape[1] for j in self.ref_subjects]
        masks = [self.subjects[j].ref_mask for j in self.ref_subjects]
        keep = visible_reference(masks, lengths, self.settings.enable_ref_mask)
        self.ref_keep = [None if len(k) == L else k for k, L in zip(keep, lengths)]  # None: every token
        self.ref_visible = {j: len(k) for j, k in zip(self.ref_subjects, keep)}
        self._ref_cache: list = []  # [(key, kv)] for the current run
        self._run: dict = {}        # per-run device copies
        self.maps: dict = {}        # step → {(kind, i): routing map} when settings.record_maps

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    @property
    def num_subjects(self) -> int:
        return len(self.subjects)

    # --- installation ------------------------------------------------------------------------------
    def install(self, model, driver: SamplingDriver, additional_models: Optional[list] = None) -> None:
        replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        if any(isinstance(r, (_DoubleReplace, _SingleReplace)) for r in replaces.values()):
            raise AnyStoryFluxError("this MODEL is already patched by an AnyStory FLUX Apply: chain all subjects "
                                    "into one AnyStory Apply (one per MODEL)")
        for i in range(self.depth):
            model.set_model_patch_replace(_DoubleReplace(self, i, replaces.get(("double_block", i))), "dit",
                                          "double_block", i)
        for i in range(self.depth_single):
            model.set_model_patch_replace(_SingleReplace(self, i, replaces.get(("single_block", i))), "dit",
                                          "single_block", i)
        driver.install(model, additional_models or [])

    def release(self) -> None:
        self._ref_cache = []
        self._run = {}
        self.ref_lora.release()
        self.router_lora.release()

    # --- run level (SamplingDriver) ------------------------------------------------------------------
    def begin_run(self, sigmas=None, **meta) -> None:
        self.release()  # cast copies of an earlier run may sit on a device the weights have left since
        self.maps = {}
        if self.recorder is not None:
            self.recorder.begin_run(sigmas=sigmas, **meta)

    def end_run(self, **meta) -> None:
        self.release()
        if self.recorder is not None:
            self.recorder.end_run(**meta)

    def begin_call(self, call) -> None:
        if self.recorder is not None and call.active:
            self.recorder.reserve(call.step)

    # --- one model call ----------------------------------------------------------------------------
    def run_call(self, executor, bound, call):
        a = bound.arguments
        x, timestep, context = a["x"], a["timestep"], a["context"]
        to = a["transformer_options"]
        s = self.settings
        if call.steps is not None:
            step, n_steps = call.step, call.steps
        else:
            step, n_steps = step_of(to, timestep)
        redux = [j for j, g in enumerate(self.redux_gains) if g * s.redux_scale != 0]
        redux_on = bool(redux) and _window(n_steps, s.redux_start_at, s.redux_end_at, step)
        ref_on = bool(self.ref_subjects) and _window(n_steps, s.ref_start_at, s.ref_end_at, step)
        if not (call.active and call.any_cond and (redux_on or ref_on)):
            return executor(*bound.args, **bound.kwargs)
        extra = a.get("kwargs") or {}
        if extra.get("attention_mask") is not None:
            raise AnyStoryFluxError("AnyStory FLUX does not support a text attention mask on the conditioning: remove "
                                    "the attention mask (e.g. from a Redux/area node) or AnyStory Apply")
        if a.get("ref_latents") is not None:
            raise AnyStoryFluxError("AnyStory FLUX does not combine with reference latents (ReferenceLatent / "
                                    "Kontext): remove them or AnyStory Apply")
        dm = executor.class_obj
        b, dtype, dev = x.shape[0], x.dtype, x.device
        y, guidance = a.get("y"), a.get("guidance")
        if y is None:
            y = torch.zeros((b, dm.params.vec_in_dim), device=dev, dtype=dtype)
        prompt_len = context.shape[1]
        redux_subjects = []
        if redux_on:  # FIRST in the text (the authors append them: the same attention, the shared keys one view)
            tokens = self._device("redux", dev, context.dtype, lambda: torch.cat(
                [self.subjects[j].redux_tokens * (s.redux_scale * self.redux_gains[j]) for j in redux], 1))
            context = torch.cat([tokens.expand(b, -1, -1), context], 1)
            for j in redux:
                redux_subjects += [j] * self.subjects[j].redux_tokens.shape[1]
            a["context"] = context
        null_rows = self._null_rows(call, b, dev)
        st = FluxCallState(num_conds=self.num_subjects, prompt_len=prompt_len, redux_len=len(redux_subjects),
                           depth=self.depth, routing=self.weights.routing, router_lora=self.router_lora,
                           null_rows=null_rows)
        record = s.record_maps or (self.recorder is not None and getattr(self.recorder, "enabled", True))
        if record:
            st.maps = {}
        ref_keys, offsets = [], []
        if ref_on:
            st.ref_kv = self._reference(dm, y, guidance, b, dtype, dev, call)
            ref_keys = [j for j, count in self.ref_visible.items() if count > 0]
            offsets = [s.ref_shift + math.log(self.ref_gains[j]) for j in ref_keys]
        if s.enable_router:
            tokens = self._device("router", dev, dtype, lambda: torch.cat([sub.router_tokens for sub in self.subjects],
                                                                         1))
            hidden = router_stream_input(dm, tokens.expand(b, -1, -1), self.router_lora)
            ids = torch.zeros((b, tokens.shape[1], 3), device=dev, dtype=dtype)
            st.router = RouterStream(hidden, dm.pe_embedder(ids))
        h_len, w_len = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        plan = KeyPlan(redux_subjects, prompt_len, h_len * w_len, ref_keys, offsets, self.num_subjects,
                       routed=st.router is not None, null_rows=null_rows is not None)
        st.plan = plan if plan.grouped else None
        to = dict(to)
        to[self.state_key] = st
        to[MODEL_KEY] = dm
        a["transformer_options"] = to
        out = executor(*bound.args, **bound.kwargs)
        if st.maps:
            self._record(st.maps, step, call, (h_len, w_len))
        elif st.maps is not None and self.num_subjects == 1:
            self._record_one(step, call, (h_len, w_len), dev)
        return out

    def _device(self, name: str, dev, dtype, make):
        """A per-run device copy (made once per run: a pageable host→device copy waits for the device)."""
        key = (name, dev, dtype)
        t = self._run.get(key)
        if t is None:
            t = self._run[key] = make().to(device=dev, dtype=dtype)
        return t

    def _null_rows(self, call, b: int, dev):
        """[b] bool of the rows that see no subject (uncond chunks), or None when every row is cond."""
        if all(c for _, c in call.chunks):
            return None
        key = ("null", b, dev, tuple((sl.start, sl.stop, c) for sl, c in call.chunks))
        t = self._run.get(key)
        if t is None:
            host = torch.zeros(b, dtype=torch.bool)
            for sl, c in call.chunks:
                if not c:
                    host[sl] = True
            t = self._run[key] = host.to(dev)
        return t

    def _record(self, maps: dict, step: int, call, hw: tuple) -> None:
        """The recorder gets the route index of the first positive chunk's rows (one row per image); the
        settings' ``record_maps`` keeps the one-hot maps of every row."""
        if self.settings.record_maps:
            self.maps[step] = {k: v.detach() for k, v in maps.items()}
        rec = self.recorder
        if rec is None or not getattr(rec, "enabled", True):
            return
        rows = next((sl for sl, c in call.chunks if c), None)
        if rows is None:
            return
        source = None
        for kind, i in sorted(maps, key=lambda k: (k[0] != "double", k[1])):
            idx = maps[(kind, i)][rows].argmax(1).to(torch.uint8)
            if source is None:
                source = torch.zeros_like(idx)
            rec.record(step, (kind, i), hw, idx, source)

    def _record_one(self, step: int, call, hw: tuple, dev) -> None:
        """One subject without the router: every image token sees that subject — its (trivial) map, so the
        preview and the live map show where AnyStory acted."""
        rec = self.recorder
        rows = next((sl for sl, c in call.chunks if c), None)
        if rec is None or not getattr(rec, "enabled", True) or rows is None:
            return
        idx = self._device(("one", rows.stop - rows.start, hw), dev, torch.uint8,
                           lambda: torch.zeros(rows.stop - rows.start, hw[0] * hw[1]))
        for i in range(self.depth):
            rec.record(step, ("double", i), hw, idx, idx)
        for i in range(self.depth_single):
            rec.record(step, ("single", i), hw, idx, idx)

    def _reference(self, dm, y, guidance, b, dtype, dev, call) -> list:
        """Per block {subject: (k, v)} of the visible reference tokens, 1 × heads × keys × d: the reference pass runs
        once per run for the first positive prompt's pooled vector and guidance (the authors' ``cache_ref``; a run
        over several prompts computes it per prompt), every step when the ref cache is off."""
        rows = next((sl for sl, c in call.chunks if c), slice(0, b))
        r0 = rows.start
        cond_uuid = call.uuids[[sl for sl, _ in call.chunks].index(rows)] if call.uuids else None
        yr = y[r0:r0 + 1]
        gr = None if guidance is None else guidance.reshape(-1)[r0:r0 + 1] if guidance.numel() > 1 else guidance
        kv = None
        if self.settings.enable_ref_cache:
            for key, cached in self._ref_cache:
                if key[0] != dtype or key[1] != dev:
                    continue
                if cond_uuid is not None:
                    if key[2] == cond_uuid:
                        kv = cached
                elif key[2] is None and torch.equal(key[3], yr) and (
                        (key[4] is None and gr is None) or (key[4] is not None and gr is not None
                                                            and torch.equal(key[4], gr))):
                    kv = cached  # a model call outside a sampler run: compared by value (a host sync)
                if kv is not None:
                    break
        if kv is None:
            kv = self._reference_pass(dm, yr, gr, dtype, dev)
            if self.settings.enable_ref_cache:
                self._ref_cache.append(((dtype, dev, cond_uuid, None if cond_uuid else yr.clone(),
                                         None if (cond_uuid or gr is None) else gr.clone()), kv))
                del self._ref_cache[:-4]
                self.ref_lora.release()  # cast copies of the ref LoRA: not needed again this run
        return kv

    def _reference_pass(self, dm, y, guidance, dtype, dev) -> list:
        subs = [self.subjects[j] for j in self.ref_subjects]
        tokens = self._device("ref_tokens", dev, dtype, lambda: torch.cat([sub.ref_tokens for sub in subs], 1))
        ids = self._device("ref_ids", dev, dtype, lambda: torch.cat(
            [ref_position_ids(*sub.ref_hw, self.position_delta) for sub in subs]))
        ref_pe = dm.pe_embedder(ids[None])
        vec_ref = flux_vec(dm, torch.zeros(1, device=dev, dtype=torch.float32), y, guidance, dtype)
        keep = [None if k is None else self._device(("ref_keep", i), dev, torch.long, lambda k=k: k)
                for i, k in enumerate(self.ref_keep)]
        return reference_kv(dm, tokens, ref_pe, vec_ref, self.ref_lora, len(subs), keep, self.ref_subjects)


class _DoubleReplace:
    def __init__(self, owner: FluxAnyStoryPatch, index: int, previous=None):
        self.owner, self.index, self.previous = owner, index, previous

    def __call__(self, args: dict, extra: dict) -> dict:
        to = args.get("transformer_options") or {}
        st = to.get(self.owner.state_key)
        if st is None:
            return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        block = to[MODEL_KEY].double_blocks[self.index]
        img, txt = double_block_forward(block, self.index, args["img"], args["txt"], args["vec"], args["pe"], st)
        return {"img": img, "txt": txt}


class _SingleReplace:
    def __init__(self, owner: FluxAnyStoryPatch, index: int, previous=None):
        self.owner, self.index, self.previous = owner, index, previous

    def __call__(self, args: dict, extra: dict) -> dict:
        to = args.get("transformer_options") or {}
        st = to.get(self.owner.state_key)
        if st is None:
            return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        block = to[MODEL_KEY].single_blocks[self.index]
        x = single_block_forward(block, self.index, args["img"], args["vec"], args["pe"], st,
                                 st.prompt_len + st.redux_len)
        return {"img": x}


def apply_anystory_flux(model, weights: AnyStoryFluxWeights, subjects: Sequence[FluxSubject],
                        settings: Optional[FluxSettings] = None, position_delta: Optional[Sequence[int]] = None,
                        redux_gains: Optional[Sequence[float]] = None, ref_gains: Optional[Sequence[float]] = None,
                        recorder=None, start_percent: float = 0.0, end_percent: float = 1.0,
                        additional_models: Optional[list] = None, labels: Optional[list] = None):
    """A patched ``model.clone()`` and its :class:`FluxAnyStoryPatch` (the input MODEL is not changed).
    ``start_percent`` / ``end_percent``: the sampling progress outside which AnyStory does not act (on top of
    the settings' step windows); ``additional_models``: patchers ComfyUI loads with the MODEL (the AnyStory
    weights)."""
    dm = getattr(model.model, "diffusion_model", None)
    if dm is None or not hasattr(dm, "double_blocks") or not hasattr(dm, "single_blocks"):
        raise AnyStoryFluxError(f"AnyStory FLUX needs a FLUX MODEL, got {type(dm).__name__}: load FLUX.1-dev")
    m = model.clone()
    key_map = comfy.lora.model_lora_keys_unet(m.model, {})
    patch = FluxAnyStoryPatch(weights, subjects, key_map, len(dm.double_blocks), len(dm.single_blocks), settings,
                              position_delta, redux_gains, ref_gains, recorder)
    ms = m.get_model_object("model_sampling")
    driver = SamplingDriver(patch, ms.percent_to_sigma(start_percent), ms.percent_to_sigma(end_percent), patch.key,
                            subject_labels=labels)
    patch.install(m, driver, additional_models)
    return m, patch


__all__ = ["AnyStoryFluxError", "FluxSettings", "FluxAnyStoryPatch", "apply_anystory_flux", "step_of"]
