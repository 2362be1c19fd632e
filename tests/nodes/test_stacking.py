"""Issue #6 — stacking AnyStory with what users combine it with, against REAL ComfyUI samplers (tiny SDXL-family
model, in-process): an IPAdapter-style attn2 replace before AND after AnyStory, a LoRA before and after, a
ControlNet, and two AnyStoryApply nodes on one MODEL. Each has a defined result, asserted here:

- IPAdapter before AnyStory: AnyStory chains the replace it finds (its output is the base of eq. 5);
- IPAdapter after AnyStory: IPAdapter_plus calls ``.add(callback, **kwargs)`` on the replace it finds; AnyStory's
  replace takes it (``callback(out, q, k, v, extra_options, **kwargs)`` added when sigma_end ≤ σ ≤ sigma_start),
  on the clone only — the AnyStory MODEL it was applied to is not changed;
- LoRA (weight patches) before or after: the reference K/V are projected per run with the patched weights;
- ControlNet: its residuals and AnyStory's attention terms both apply;
- two AnyStoryApply on one MODEL: both add their cross-attention (η) terms; the reference attention (γ) of the
  second is left out where the first already replaces self-attention (a warning says so).

The IPAdapter here is a stand-in written from IPAdapter_plus's documented behaviour (its Attn2Replace and
set_model_patch_replace), not its code.
"""
from __future__ import annotations

import collections
import logging
import math
from pathlib import Path

import pytest
from comfy_harness import load_module as _load  # registered by tests/nodes/conftest.py

HERE = Path(__file__).resolve().parent




F = _load("anystory_fixtures", HERE / "anystory_fixtures.py")
env = F.env
temp_dir = F.temp_dir

CALLS = collections.Counter()  # callback calls by tag (patch objects are deep-copied by clone())


def _lat():
    import torch
    return torch.zeros(1, 4, 16, 16)


# ------------------------------------------------------------------------------------------------
# an IPAdapter_plus stand-in
# ------------------------------------------------------------------------------------------------
class IPAdapterReplace:
    """Like IPAdapter_plus's Attn2Replace: plain text attention, then every added callback whose sigma window
    holds the current sigma adds its output."""

    def __init__(self, callback=None, **kwargs):
        self.callback = [callback]
        self.kwargs = [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        dtype = q.dtype
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else 999999999.9
        for cb, kw in zip(self.callback, self.kwargs):
            if kw["sigma_end"] <= sigma <= kw["sigma_start"]:
                out = out + cb(out, q, k, v, extra_options, **kw)
        return out.to(dtype=dtype)


def ip_callback(out, q, k, v, extra_options, weight=1.0, tag="ipa", sigma_start=0.0, sigma_end=0.0, **kwargs):
    """The image-prompt term of the stand-in: deterministic, depends on the query only."""
    import torch
    CALLS[tag] += 1
    return weight * torch.tanh(q).to(out.dtype)


def set_model_patch_replace(model, patch_kwargs, key):
    """IPAdapter_plus's way of registering: shallow copies of the dicts; ``.add`` on a replace already there."""
    to = model.model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    if key not in to["patches_replace"]["attn2"]:
        to["patches_replace"]["attn2"][key] = IPAdapterReplace(ip_callback, **patch_kwargs)
        model.model_options["transformer_options"] = to
    else:
        to["patches_replace"]["attn2"][key].add(ip_callback, **patch_kwargs)


def apply_ipadapter(model, layout, weight=0.5, start=0.0, end=1.0, tag="ipa"):
    m = model.clone()
    ms = m.get_model_object("model_sampling")
    kw = dict(weight=weight, tag=tag, sigma_start=ms.percent_to_sigma(start), sigma_end=ms.percent_to_sigma(end))
    for spec in layout:
        set_model_patch_replace(m, kw, spec.key)
    return m


def _attn2(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


# ------------------------------------------------------------------------------------------------
# IPAdapter before / after
# ------------------------------------------------------------------------------------------------
def test_ipadapter_before_anystory_is_chained(env):
    import torch
    CALLS.clear()
    lat = _lat()
    ipa = apply_ipadapter(env.model, env.layout)
    ip_only = env.sample(ipa, lat, seed=4)
    assert CALLS["ipa"] == 2 * len(env.layout)
    off, _ = env.apply(model=ipa, eta=0.0, gamma=0.0)
    assert torch.equal(env.sample(off, lat, seed=4), ip_only), "AnyStory at η=γ=0 changed IPAdapter's result"
    on, routing = env.apply(model=ipa)
    both = env.sample(on, lat, seed=4)
    only_anystory = env.sample(env.apply()[0], lat, seed=4)
    assert (both - ip_only).abs().max() > 1e-3 and (both - only_anystory).abs().max() > 1e-3
    assert CALLS["ipa"] == 6 * len(env.layout) and routing.runs


def test_ipadapter_after_anystory_uses_add_on_the_clone_only(env):
    import torch
    CALLS.clear()
    lat = _lat()
    plain = env.sample(env.model, lat, seed=4)
    ip_only = env.sample(apply_ipadapter(env.model, env.layout), lat, seed=4)

    off, _ = env.apply(eta=0.0, gamma=0.0)
    after = apply_ipadapter(off, env.layout)
    reps = _attn2(after)
    assert all(type(reps[s.key]).__name__ == "Attn2Replace" and len(reps[s.key].callbacks) == 1 for s in env.layout)
    assert torch.equal(env.sample(after, lat, seed=4), ip_only), "IPAdapter after AnyStory(η=γ=0) ≠ IPAdapter alone"
    # the AnyStory MODEL it was applied to: untouched (no callback leaked into it), still the unpatched result
    assert all(len(r.callbacks) == 0 for r in F.anystory_replaces(off).values())
    assert torch.equal(env.sample(off, lat, seed=4), plain)
    # re-running the IPAdapter node on the same (cached) AnyStory MODEL does not pile up callbacks
    again = apply_ipadapter(off, env.layout, weight=0.8, tag="ipa2")
    assert all(len(r.callbacks) == 1 for r in F.anystory_replaces(again).values())
    assert all(len(r.callbacks) == 1 for r in F.anystory_replaces(after).values())

    CALLS.clear()
    on, routing = env.apply()
    on_ip = apply_ipadapter(on, env.layout)
    both = env.sample(on_ip, lat, seed=4)
    assert CALLS["ipa"] == 2 * len(env.layout) and routing.runs
    assert (both - env.sample(on, lat, seed=4)).abs().max() > 1e-3 and (both - ip_only).abs().max() > 1e-3


def test_ipadapter_after_anystory_honours_its_sigma_window(env, comfy):
    import torch
    lat = _lat()
    steps = 4
    ms = env.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps)
    s_start = ms.percent_to_sigma(0.5)
    want = sum(1 for i in range(steps) if float(sigmas[i]) <= s_start)
    assert 0 < want < steps
    CALLS.clear()
    ip_only = env.sample(apply_ipadapter(env.model, env.layout, start=0.5, tag="late"), lat, steps=steps, seed=2)
    assert CALLS["late"] == want * len(env.layout)
    CALLS.clear()
    off, _ = env.apply(eta=0.0, gamma=0.0)
    out = env.sample(apply_ipadapter(off, env.layout, start=0.5, tag="late"), lat, steps=steps, seed=2)
    assert CALLS["late"] == want * len(env.layout)
    assert torch.equal(out, ip_only)


def test_old_ipadapter_api_after_anystory_is_a_clear_error(env, pack):
    patched, _ = env.apply()
    rep = next(iter(F.anystory_replaces(patched).values()))
    with pytest.raises(F.pack_mod("nodes.types").AnyStoryError) as e:
        rep.set_new_condition(weight=1.0)
    assert "before AnyStory Apply" in str(e.value) and "update" in str(e.value)


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------
def _lora_diffs(model, seed=5):
    """A LoRA-style weight patch (a diff per weight) on every attn1 to_q/to_k/to_v: {state-dict key: diff}."""
    import torch
    g = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    return {k: 0.05 * torch.randn(sd[k].shape, generator=g) for k in sd
            if ".attn1.to_" in k and k.endswith(("to_q.weight", "to_k.weight", "to_v.weight"))}


def test_lora_before_and_after_anystory_uses_the_patched_weights(env, harness):
    """The references' K/V are projected with the LoRA-patched attn1 weights (per run), whether the LoRA is
    applied before or after AnyStory: the result equals AnyStory on a model whose weights were merged."""
    import torch
    lat = _lat()
    diffs = _lora_diffs(env.model)
    assert len(diffs) == 3 * len(env.layout)
    base = env.sample(env.model, lat, seed=6)

    merged = harness.tiny_sdxl(seed=0, context_dim=F.CTX)
    with torch.no_grad():
        sd = merged.model.state_dict()
        for k, d in diffs.items():
            sd[k].add_(d)
    ref = env.sample(env.apply(model=merged)[0], lat, seed=6)
    refs_only = env.sample(env.apply(model=merged, eta=0.0)[0], lat, seed=6)

    lora = env.model.clone()
    assert len(lora.add_patches({k: (d,) for k, d in diffs.items()}, 1.0)) == len(diffs)
    before = env.sample(env.apply(model=lora)[0], lat, seed=6)
    before_refs = env.sample(env.apply(model=lora, eta=0.0)[0], lat, seed=6)

    after_m = env.apply()[0].clone()
    after_m.add_patches({k: (d,) for k, d in diffs.items()}, 1.0)
    after = env.sample(after_m, lat, seed=6)

    for out in (before, after):
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    assert torch.allclose(before_refs, refs_only, atol=1e-5, rtol=0)
    unmerged = env.sample(env.apply()[0], lat, seed=6)
    assert (ref - unmerged).abs().max() > 1e-3, "the LoRA makes no difference: the comparison proves nothing"
    assert torch.equal(env.sample(env.model, lat, seed=6), base), "the LoRA stayed on the input MODEL"


# ------------------------------------------------------------------------------------------------
# ControlNet
# ------------------------------------------------------------------------------------------------
def _stub_control(value):
    import torch

    import comfy.controlnet

    class StubControl(comfy.controlnet.ControlBase):
        """A ControlNet stand-in: a constant residual added after the middle block (width 128 on the tiny UNet)."""
        calls = 0

        def __init__(self, v):
            super().__init__()
            self.value = v

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            StubControl.calls += 1
            b, _, h, w = x_noisy.shape
            mid = torch.full((b, 128, math.ceil(h / 4), math.ceil(w / 4)), self.value, dtype=x_noisy.dtype,
                             device=x_noisy.device)
            return {"input": [], "middle": [mid], "output": []}

        def copy(self):
            c = StubControl(self.value)
            self.copy_to(c)
            return c

    return StubControl(value)


def _with_control(cond, control):
    return [[c, dict(d, control=control)] for c, d in cond]


def test_controlnet_and_anystory_both_apply(env):
    import torch
    lat = _lat()
    zero, hint = _stub_control(0.0), _stub_control(0.5)
    pz, nz = _with_control(env.pos, zero), _with_control(env.neg, zero)
    ph, nh = _with_control(env.pos, hint), _with_control(env.neg, hint)
    on, routing = env.apply()
    off, _ = env.apply(eta=0.0, gamma=0.0)
    anystory = env.sample(on, lat, seed=8)
    assert torch.equal(env.sample(on, lat, seed=8, pos=pz, neg=nz), anystory)
    cn_only = env.sample(env.model, lat, seed=8, pos=ph, neg=nh)
    assert (cn_only - env.sample(env.model, lat, seed=8)).abs().max() > 1e-3  # the stub does something
    assert torch.equal(env.sample(off, lat, seed=8, pos=ph, neg=nh), cn_only)
    type(hint).calls = 0
    both = env.sample(on, lat, seed=8, pos=ph, neg=nh)
    assert type(hint).calls == 2 and routing.runs[-1].step_ids == [0, 1]
    assert torch.isfinite(both).all()
    assert (both - cn_only).abs().max() > 1e-3 and (both - anystory).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# two AnyStoryApply on one MODEL
# ------------------------------------------------------------------------------------------------
def test_two_anystory_apply_nodes_on_one_model(env, caplog):
    import torch
    lat = _lat()
    a_on, ra = env.apply()
    a_off, _ = env.apply(eta=0.0, gamma=0.0)
    a_img = env.sample(a_on, lat, seed=10)
    b_alone = env.sample(env.apply(eta=1.0, gamma=0.0, region_masks=env.masks.flip(0))[0], lat, seed=10)

    with caplog.at_level(logging.WARNING, logger="anystory"):
        b_on_a, rb = env.apply(model=a_on, eta=1.0, gamma=1.0, region_masks=env.masks.flip(0))
    assert "already have a patch from another node" in caplog.text and "left out" in caplog.text
    first = {r.owner for r in F.anystory_replaces(a_on, "attn1").values()}
    assert len(first) == 1 and {r.owner for r in F.anystory_replaces(b_on_a, "attn1").values()} == first

    # the second at η=γ=0 on top of the first is the first alone
    b_off_on_a, _ = env.apply(model=a_on, eta=0.0, gamma=0.0)
    assert torch.equal(env.sample(b_off_on_a, lat, seed=10), a_img)
    # the first at η=γ=0 under the second (γ=0) is the second alone
    b_on_off, _ = env.apply(model=a_off, eta=1.0, gamma=0.0, region_masks=env.masks.flip(0))
    assert torch.equal(env.sample(b_on_off, lat, seed=10), b_alone)
    # both on: both terms, both record
    ra.runs.clear()
    rb.runs.clear()
    both = env.sample(b_on_a, lat, seed=10)
    assert len(ra.runs) == 1 and len(rb.runs) == 1
    assert (both - a_img).abs().max() > 1e-3 and (both - b_alone).abs().max() > 1e-3
    # the first MODEL is unchanged by the second apply
    assert torch.equal(env.sample(a_on, lat, seed=10), a_img)
