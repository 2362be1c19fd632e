"""The SDXL family's hooks: ComfyUI's attention patches of a UNet mapped onto
``anystory.patch.RoutedPatch`` (its hook order per transformer block: attn1 → attn2_patch → attn2).

- attn2_patch (every block): the router of layer l on n = norm2(x), inputs passed through;
- attn2 replace (every block): text attention (or the replace that was there before, e.g. IPAdapter)
  + eq. 5; later nodes may ``.add()`` to it (IPAdapter_plus's convention);
- attn1 replace (every block but the first, which has no M^{l-1}): eq. 6-8.
"""
from __future__ import annotations

import copy
import logging

import comfy.ldm.modules.attention as comfy_attention
import comfy.ops as comfy_ops

from ..anystory.layers import block_key, hook_grid
from .sampling import SamplingDriver
from .types import AnyStoryError

log = logging.getLogger("anystory")


def _comfy_sdpa():
    """ComfyUI's SDPA (torch's, under ComfyUI's backend priority): the same kernel as its attention."""
    return comfy_ops.scaled_dot_product_attention


class RouterPatch:
    """attn2_patch: the router of layer l on n = norm2(x); inputs pass through unchanged."""

    def __init__(self, owner: SamplingDriver):
        self.owner = owner

    def __deepcopy__(self, memo):
        return self

    def to(self, *a, **k):
        return self

    def __call__(self, n, context, value, extra_options):
        state = extra_options.get(self.owner.state_key)
        if state is not None and state.active and "block" in extra_options:
            hw = hook_grid(extra_options)
            if hw is not None:
                self.owner.runtime.route(state, block_key(extra_options), n, hw)
        return n, context, value


class _Replace:
    def __init__(self, owner: SamplingDriver, key: tuple, previous=None):
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

    def __init__(self, owner: SamplingDriver, key: tuple, previous=None):
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
            out = self.owner.runtime.cross_attention(state, block_key(extra_options), q, k, v, extra_options["n_heads"],
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
        return self.owner.runtime.self_attention(state, block_key(extra_options), q, k, v, extra_options["n_heads"],
                                                 hook_grid(extra_options), base,
                                                 plain_sdpa=_comfy_sdpa() if own else None)


def install(model, owner: SamplingDriver, reference_keys: list, additional_models: list) -> None:
    """Put the patch on ``model`` (a clone): the router at every attn2 (attn2_patch), eq. 5 at every attn2
    (replace), eq. 6-8 at the ``reference_keys`` attn1 (replace), and the sampling wrappers. Existing
    replaces at the same keys are chained, not dropped."""
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
    owner.install(model, additional_models)
