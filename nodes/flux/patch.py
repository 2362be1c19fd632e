"""AnyStory FLUX on a ComfyUI FLUX MODEL: installed on ``model.clone()`` through ComfyUI's own hooks.

- ``transformer_options["patches_replace"]["dit"][("double_block", i)]`` / ``("single_block", i)`` (set with
  ``ModelPatcher.set_model_patch_replace``): every block runs :func:`anystory.flux.blocks.double_block_forward` /
  ``single_block_forward`` while AnyStory is active in the step, else the block (or the replace that was there
  before) as usual;
- DIFFUSION_MODEL wrapper (``ModelPatcher.add_wrapper_with_key``, ``comfy.patcher_extension.WrappersMP``), once per
  model call: finds the step in ``transformer_options["sample_sigmas"]``, appends the scaled Redux tokens to the text
  conditioning while they are active (the authors concatenate them before ``context_embedder``: ComfyUI's ``txt_in``
  and zero text ids do the same), prepares the routing stream and the reference keys/values, and hands the blocks
  a :class:`anystory.flux.blocks.FluxCallState` in a copy of ``transformer_options``;
- OUTER_SAMPLE wrapper: the reference cache lives for one sampling run.

The model's weights are never touched: every projection is the model's own module call (comfy.ops casting, fp8,
LoRA weight patches, offloading), the AnyStory LoRAs are deltas on the extra streams' outputs. LoRA targets are
placed with ComfyUI's key map (``comfy.lora.model_lora_keys_unet``, which uses ``comfy.utils.flux_to_diffusers``).

Step windows follow the authors: with N = len(sample_sigmas) − 1 steps, a window [a, b) covers the steps i with
int(N·a + 0.5) ≤ i < int(N·b + 0.5); a model call without ``sample_sigmas`` counts as step 0 of 1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import comfy.lora
import comfy.patcher_extension as pe

from ...anystory.flux.blocks import FluxCallState, RouterStream, double_block_forward, single_block_forward
from ...anystory.flux.checkpoint import AnyStoryFluxWeights
from ...anystory.flux.lora import REF_SITES, ROUTER_SITES, lora_targets
from ...anystory.flux.reference import flux_vec, ref_position_ids, reference_kv, router_stream_input
from ...anystory.flux.subject import FluxSubject

log = logging.getLogger("anystory")
STATE_KEY = "anystory_flux_state"
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
    enable_router: bool = False  # AnyStoryFluxPipeline.generate's default; switch on for 2+ subjects
    record_maps: bool = False


def _window(n_steps: int, start: float, end: float, step: int) -> bool:
    return int(n_steps * start + 0.5) <= step < int(n_steps * end + 0.5)


def step_of(transformer_options: dict, timestep: torch.Tensor) -> tuple[int, int]:
    """(step index, number of steps) of a model call from the run's ``sample_sigmas``."""
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


class FluxAnyStoryPatch:
    """Everything one AnyStory FLUX apply installs; survives ModelPatcher.clone() by reference."""

    def __init__(self, weights: AnyStoryFluxWeights, subjects: Sequence[FluxSubject], key_map: dict,
                 depth: int, depth_single: int, settings: Optional[FluxSettings] = None,
                 position_delta: Optional[Sequence[int]] = None):
        if not subjects:
            raise AnyStoryFluxError("AnyStory FLUX got no subjects: encode at least one subject")
        if (weights.depth, weights.depth_single) != (depth, depth_single):
            raise AnyStoryFluxError(
                f"the AnyStory FLUX file is for {weights.depth} double + {weights.depth_single} single blocks, the "
                f"MODEL has {depth} + {depth_single}: use it with FLUX.1-dev (19 + 38 blocks)")
        self.weights = weights
        self.subjects = list(subjects)
        self.settings = settings or FluxSettings()
        self.depth, self.depth_single = depth, depth_single
        self.position_delta = position_delta
        self.ref_lora, self.ignored_ref = lora_targets(weights.ref_lora, REF_SITES, depth, depth_single, key_map)
        self.router_lora, self.ignored_router = lora_targets(weights.router_lora, ROUTER_SITES, depth, depth_single,
                                                             key_map)
        if self.ignored_ref or self.ignored_router:
            log.info("AnyStory FLUX: LoRA modules the authors never enable, left out: %s",
                     ", ".join((self.ignored_ref + self.ignored_router)[:8]))
        routers = [s.router_tokens is None for s in self.subjects]
        if self.settings.enable_router and any(routers):
            raise AnyStoryFluxError("enable_router is on but a subject has no routing tokens: encode it with the "
                                    "router embedder or switch the router off")
        self._ref_cache: list = []  # [(y, guidance, dtype, device, kv)]
        self.maps: dict = {}        # step → {(kind, i): routing map} when settings.record_maps

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    # --- installation ------------------------------------------------------------------------------
    def install(self, model) -> None:
        key = f"anystory_flux_{id(self)}"
        replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for i in range(self.depth):
            prev = replaces.get(("double_block", i))
            model.set_model_patch_replace(_DoubleReplace(self, i, prev), "dit", "double_block", i)
        for i in range(self.depth_single):
            prev = replaces.get(("single_block", i))
            model.set_model_patch_replace(_SingleReplace(self, i, prev), "dit", "single_block", i)
        model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, key, self.diffusion_model)
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, key, self.outer_sample)

    def release(self) -> None:
        self._ref_cache = []
        self.ref_lora.release()
        self.router_lora.release()

    # --- wrappers ----------------------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        self._ref_cache = []
        self.maps = {}
        try:
            return executor(*args, **kwargs)
        finally:
            self._ref_cache = []

    def diffusion_model(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                        transformer_options={}, **kwargs):
        s = self.settings
        step, n_steps = step_of(transformer_options, timestep)
        redux_on = _window(n_steps, s.redux_start_at, s.redux_end_at, step)
        ref_on = _window(n_steps, s.ref_start_at, s.ref_end_at, step)
        if not (redux_on or ref_on):
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise AnyStoryFluxError("AnyStory FLUX does not support a text attention mask on the conditioning: remove "
                                    "the attention mask (e.g. from a Redux/area node) or AnyStory Apply")
        dm = executor.class_obj
        b, dtype, dev = x.shape[0], x.dtype, x.device
        prompt_len = context.shape[1]
        if redux_on:
            tokens = torch.cat([sub.redux_tokens for sub in self.subjects], 1) * s.redux_scale
            context = torch.cat([context, tokens.to(device=dev, dtype=context.dtype).expand(b, -1, -1)], 1)
        if y is None:
            y = torch.zeros((b, dm.params.vec_in_dim), device=dev, dtype=dtype)
        st = FluxCallState(num_conds=len(self.subjects), prompt_len=prompt_len,
                           redux_len=context.shape[1] - prompt_len, depth=self.depth,
                           ref_shift=float(s.ref_shift) if ref_on else 0.0, routing=self.weights.routing,
                           router_lora=self.router_lora, maps={} if s.record_maps else None)
        if ref_on:
            st.ref_kv = self._reference(dm, y, guidance, b, dtype, dev)
            if s.enable_ref_mask:
                st.ref_mask = torch.cat([self._mask_of(sub) for sub in self.subjects], 1).to(dev).expand(b, -1, -1)
        elif s.ref_shift != 0:
            st.ref_shift = 0.0  # no reference keys: the authors' shift applies to an empty slice
        if s.enable_router:
            tokens = torch.cat([sub.router_tokens for sub in self.subjects], 1).to(device=dev, dtype=dtype)
            hidden = router_stream_input(dm, tokens.expand(b, -1, -1), self.router_lora)
            ids = torch.zeros((b, tokens.shape[1], 3), device=dev, dtype=dtype)
            st.router = RouterStream(hidden, dm.pe_embedder(ids))
        to = dict(transformer_options)
        to[STATE_KEY] = st
        to[MODEL_KEY] = dm
        out = executor(x, timestep, context, y, guidance, ref_latents, control, to, **kwargs)
        if st.maps:
            self.maps[step] = {k: v.detach() for k, v in st.maps.items()}
        return out

    @staticmethod
    def _mask_of(sub: FluxSubject) -> torch.Tensor:
        if sub.ref_mask is not None:
            return sub.ref_mask.float()
        return torch.ones(1, sub.ref_tokens.shape[1], 1)

    def _reference(self, dm, y, guidance, b, dtype, dev) -> list:
        """Per-block reference (k, v) for this batch: from the run's cache when on, else computed now."""
        if self.settings.enable_ref_cache:
            for cy, cg, cdt, cdev, kv in self._ref_cache:
                if cdt == dtype and cdev == dev and cy.shape == y.shape and torch.equal(cy, y) and (
                        (cg is None and guidance is None) or (cg is not None and guidance is not None
                                                              and torch.equal(cg, guidance))):
                    return kv
        tokens = torch.cat([sub.ref_tokens for sub in self.subjects], 1).to(device=dev, dtype=dtype)
        ids = torch.cat([ref_position_ids(*sub.ref_hw, self.position_delta, device=dev) for sub in self.subjects])
        ref_pe = dm.pe_embedder(ids.to(dtype)[None].expand(b, -1, -1))
        vec_ref = flux_vec(dm, torch.zeros(b, device=dev, dtype=torch.float32), y, guidance, dtype)
        kv = reference_kv(dm, tokens.expand(b, -1, -1), ref_pe, vec_ref, self.ref_lora, len(self.subjects))
        if self.settings.enable_ref_cache:
            self._ref_cache.append((y.clone(), None if guidance is None else guidance.clone(), dtype, dev, kv))
            del self._ref_cache[:-4]
        return kv


class _DoubleReplace:
    def __init__(self, owner: FluxAnyStoryPatch, index: int, previous=None):
        self.owner, self.index, self.previous = owner, index, previous

    def __call__(self, args: dict, extra: dict) -> dict:
        st = (args.get("transformer_options") or {}).get(STATE_KEY)
        if st is None:
            return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        block = args["transformer_options"][MODEL_KEY].double_blocks[self.index]
        img, txt = double_block_forward(block, self.index, args["img"], args["txt"], args["vec"], args["pe"], st)
        return {"img": img, "txt": txt}


class _SingleReplace:
    def __init__(self, owner: FluxAnyStoryPatch, index: int, previous=None):
        self.owner, self.index, self.previous = owner, index, previous

    def __call__(self, args: dict, extra: dict) -> dict:
        st = (args.get("transformer_options") or {}).get(STATE_KEY)
        if st is None:
            return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        block = args["transformer_options"][MODEL_KEY].single_blocks[self.index]
        x = single_block_forward(block, self.index, args["img"], args["vec"], args["pe"], st,
                                 st.prompt_len + st.redux_len)
        return {"img": x}


def apply_anystory_flux(model, weights: AnyStoryFluxWeights, subjects: Sequence[FluxSubject],
                        settings: Optional[FluxSettings] = None, position_delta: Optional[Sequence[int]] = None):
    """A patched ``model.clone()`` and its :class:`FluxAnyStoryPatch` (the input MODEL is not changed)."""
    dm = getattr(model.model, "diffusion_model", None)
    if dm is None or not hasattr(dm, "double_blocks") or not hasattr(dm, "single_blocks"):
        raise AnyStoryFluxError(f"AnyStory FLUX needs a FLUX MODEL, got {type(dm).__name__}: load FLUX.1-dev")
    m = model.clone()
    key_map = comfy.lora.model_lora_keys_unet(m.model, {})
    patch = FluxAnyStoryPatch(weights, subjects, key_map, len(dm.double_blocks), len(dm.single_blocks), settings,
                              position_delta)
    patch.install(m)
    return m, patch
