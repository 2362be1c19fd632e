"""AnyStoryApply against REAL ComfyUI samplers (issue #3): the patched MODEL is exact where AnyStory is
off, leaves the input MODEL alone, routes each subject only to its tokens, tells cond from uncond rows
whatever order ComfyUI batches them in, runs on batches, odd sizes, fp16/bf16 and every common
sampler, chains an existing attn2 replace, honours start/end percent, really uses the references,
refuses what it cannot do with a message that says why, and lets ComfyUI load the adapter with the UNet.

Tiny SDXL-family model (context 2048, 7 transformer blocks) + random native AnyStory adapter, CPU.
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path

import pytest
import torch
from comfy_harness import load_module  # registered by tests/nodes/conftest.py

F = load_module("anystory_fixtures", Path(__file__).with_name("anystory_fixtures.py"))
env = F.env  # module-scoped fixture (tiny model, adapter, two encoded subjects)
temp_dir = F.temp_dir  # ComfyUI temp folder → a throw-away folder (preview PNGs)


def _lat(*shape):
    import torch
    return torch.zeros(*shape) if shape else torch.zeros(1, 4, 16, 16)


# ------------------------------------------------------------------------------------------------
# 1. η = γ = 0 is the un-patched sampler, bit for bit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_eta_gamma_zero_is_bit_identical_to_unpatched(env, sampler, scheduler):
    import torch

    lat = _lat()
    base = env.sample(env.model, lat, steps=3, cfg=6.0, sampler=sampler, scheduler=scheduler, seed=3)
    # subjects WITH reference features, masks mode: everything is wired, only the strengths are 0
    off, routing = env.apply(eta=0.0, gamma=0.0)
    out = env.sample(off, lat, steps=3, cfg=6.0, sampler=sampler, scheduler=scheduler, seed=3)
    assert torch.equal(out, base), f"η=γ=0 changed the {sampler} output by {(out - base).abs().max():.3g}"
    assert routing.runs and routing.runs[-1].step_ids == [0, 1, 2], "the patch did not run (nothing recorded)"
    # the same wiring with η > 0 does change the output (the comparison above can fail)
    on, _ = env.apply(eta=1.0, gamma=0.0)
    assert (env.sample(on, lat, steps=3, cfg=6.0, sampler=sampler, scheduler=scheduler, seed=3) - base).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# 2. the input MODEL is not changed
# ------------------------------------------------------------------------------------------------
def _snapshot(model):
    import copy
    to = model.model_options.get("transformer_options", {})
    return {
        "options_keys": sorted(model.model_options),
        "to": {k: (sorted(v) if isinstance(v, dict) else repr(v)) for k, v in to.items()},
        "patches_replace": {k: sorted(v) for k, v in to.get("patches_replace", {}).items()},
        "patches": {k: len(v) for k, v in to.get("patches", {}).items()},
        "wrappers": {k: sorted(v) for k, v in model.wrappers.items() if v},
        "callbacks": {k: sorted(v) for k, v in model.callbacks.items() if v},
        "additional_models": sorted(model.additional_models),
        "weight_patches": len(model.patches),
        "object_patches": sorted(model.object_patches),
        "state": {k: v.clone() for k, v in copy.copy(model.model.diffusion_model.state_dict()).items()},
    }


def test_input_model_unchanged(env):
    import torch

    lat = _lat(1, 4, 16, 24)
    before = _snapshot(env.model)
    base = env.sample(env.model, lat, steps=2, seed=11)
    patched, _ = env.apply(eta=1.0, gamma=1.0)
    after_apply = env.sample(env.model, lat, steps=2, seed=11)
    out = env.sample(patched, lat, steps=2, seed=11)
    after_sampling = env.sample(env.model, lat, steps=2, seed=11)
    assert (out - base).abs().max() > 1e-3  # the patched one does differ
    assert torch.equal(after_apply, base), "AnyStoryApply changed the input MODEL"
    assert torch.equal(after_sampling, base), "sampling the patched MODEL changed the input MODEL"
    now = _snapshot(env.model)
    for k in before:
        if k == "state":
            assert before[k].keys() == now[k].keys()
            assert all(torch.equal(before[k][n], now[k][n]) for n in before[k]), "UNet weights changed"
        else:
            assert before[k] == now[k], f"input MODEL's {k} changed: {before[k]} → {now[k]}"
    to = env.model.model_options.get("transformer_options", {})
    assert not F.anystory_replaces(env.model, "attn2") and not F.anystory_replaces(env.model, "attn1")
    assert not any(type(p).__module__.startswith("comfyui_anystory")
                   for ps in to.get("patches", {}).values() for p in ps)
    assert not any(k.startswith("anystory") for ws in env.model.wrappers.values() for k in ws)
    assert not any(k.startswith("anystory") for k in env.model.additional_models)
    # ...while the patched clone has all of them
    assert len(F.anystory_replaces(patched, "attn2")) == len(env.layout)
    assert any(k.startswith("anystory") for ws in patched.wrappers.values() for k in ws)


# ------------------------------------------------------------------------------------------------
# 3. a subject's injection changes only the tokens routed to it, at every layer
# ------------------------------------------------------------------------------------------------
class _DualAttn2:
    """Replaces AnyStory's Attn2Replace of one layer on a clone: runs it (subjects A, what the UNet
    continues with) and, on the very same q/k/v and the same CallState (same routing), the Attn2Replace
    of a second AnyStoryApply whose subject 2 has other tokens E_2 (subjects B). Records both."""

    def __init__(self, key, rep_a, rep_b, owner_a, owner_b, log):
        self.key, self.rep_a, self.rep_b, self.owner_a, self.owner_b, self.log = key, rep_a, rep_b, owner_a, owner_b, log

    def __deepcopy__(self, memo):
        return self

    def to(self, *a, **k):
        return self

    def __call__(self, q, k, v, extra_options):
        out_a = self.rep_a(q, k, v, extra_options)
        state = extra_options[self.owner_a.state_key]
        eo_b = dict(extra_options)
        eo_b[self.owner_b.state_key] = state
        out_b = self.rep_b(q, k, v, eo_b)
        self.log.append({"key": self.key, "a": out_a.detach().clone(), "b": out_b.detach().clone(),
                         "index": state.index[self.key].clone(), "chunks": list(state.chunks)})
        return out_a


def test_subject_injection_changes_only_its_routed_tokens(env):
    import torch

    patched_a, _ = env.apply(eta=1.0, gamma=0.0)
    g = torch.Generator().manual_seed(5)
    E2 = env.subjects.subjects[1].E
    subjects_b = F.with_subject_e(env.subjects, 1, E2 + torch.randn(E2.shape, generator=g))
    patched_b, _ = env.apply(subjects=subjects_b, eta=1.0, gamma=0.0)
    owner_a, owner_b = F.owner_of(patched_a), F.owner_of(patched_b)
    reps_a, reps_b = F.anystory_replaces(patched_a), F.anystory_replaces(patched_b)
    assert set(reps_a) == set(reps_b) == {s.key for s in env.layout}
    log = []
    dual = patched_a.clone()
    for key in reps_a:
        dual.set_model_attn2_replace(_DualAttn2(key, reps_a[key], reps_b[key], owner_a, owner_b, log), *key)
    owner_b.runtime.begin_run()
    try:
        env.sample(dual, _lat(), steps=1, cfg=5.0, seed=2)  # one sampler step = one UNet call (cond+uncond)
    finally:
        owner_b.runtime.end_run()
    assert [r["key"] for r in log] == [s.key for s in env.layout], "not exactly one UNet call over all layers"
    for rec in log:
        a, b, idx = rec["a"], rec["b"], rec["index"]
        assert a.shape[0] == 2 and [c for _, c in rec["chunks"]] == [False, True]  # [uncond, cond]
        cond = rec["chunks"][1][0]
        side = int(round(idx.shape[1] ** 0.5))
        assert torch.equal(idx[cond][0], F.expected_half_index((side, side)))
        to_s2 = idx == 1
        assert to_s2.any() and (~to_s2).any()
        same = (a == b).all(-1)                               # [B, L] token output bit-identical
        assert bool(same[~to_s2].all()), f"{rec['key']}: tokens not routed to subject 2 changed"
        assert not bool(same[to_s2].any()), f"{rec['key']}: some tokens routed to subject 2 did not change"
        assert bool(same[rec["chunks"][0][0]].all())          # uncond rows: background route only


# ------------------------------------------------------------------------------------------------
# 4. cond / uncond rows, whatever order ComfyUI batches them in; cfg = 1
# ------------------------------------------------------------------------------------------------
def _check_roles(probe, layout, expect_cou, expect_pos_rows):
    import torch

    assert probe.calls, "the probe saw no UNet call"
    for rec in probe.calls:
        assert rec["state"] and rec["active"]
        assert rec["cond_or_uncond"] == expect_cou
        assert rec["row_is_pos"] == expect_pos_rows
        cond_rows = probe.cond_rows(rec)
        # the pack treats exactly the positive prompt's rows as cond
        assert cond_rows == rec["row_is_pos"], (rec["key"], rec["chunks"], rec["row_is_pos"])
        idx = rec["index"]
        want = F.expected_half_index(rec["hw"])
        for r, is_cond in enumerate(cond_rows):
            if is_cond:
                assert torch.equal(idx[r], want), f"{rec['key']}: cond row {r} does not follow the masks"
            else:
                assert bool((idx[r] == 2).all()), f"{rec['key']}: uncond row {r} is routed to a subject"
    assert {r["key"] for r in probe.calls} == {s.key for s in layout}


def test_cond_uncond_rows_in_both_batch_orders(env, comfy):
    import torch

    patched, _ = env.apply(eta=1.0, gamma=1.0)
    m, probe = F.with_probe(patched, env)
    lat = _lat()
    # (a) KSampler: conds [positive, negative]; ComfyUI batches them reversed → uncond rows first
    env.sample(m, lat, steps=1, cfg=5.0)
    _check_roles(probe, env.layout, [1, 0], [False, True])

    # (b) a guider that passes [negative, positive] (as DualCFGGuider passes [negative, middle, positive]):
    # index 0 is now the NEGATIVE prompt and the positive rows come first — "0 = cond" would be wrong here
    class NegFirstGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            neg, pos = self.conds.get("negative"), self.conds.get("positive")
            out = comfy.samplers.calc_cond_batch(self.inner_model, [neg, pos], x, timestep, model_options)
            return comfy.samplers.cfg_function(self.inner_model, out[1], out[0], self.cfg, x, timestep,
                                               model_options=model_options, cond=pos, uncond=neg)

    probe.calls.clear()
    guider = NegFirstGuider(m)
    guider.set_conds(env.pos, env.neg)
    guider.set_cfg(5.0)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "normal", 1)
    noise = comfy.sample.prepare_noise(lat, 0)
    out = guider.sample(noise, lat, comfy.samplers.sampler_object("euler"), sigmas, seed=0, disable_pbar=True)
    assert torch.isfinite(out).all()
    _check_roles(probe, env.layout, [1, 0], [True, False])

    # (c) cfg = 1: ComfyUI drops the uncond batch; the single cond chunk is routed
    probe.calls.clear()
    out = env.sample(m, lat, steps=1, cfg=1.0)
    assert torch.isfinite(out).all()
    _check_roles(probe, env.layout, [0], [True])


def test_dual_cfg_guider_negative_rows_unrouted(env, comfy):
    """ComfyUI's DualCFGGuider batches [negative, middle, positive] (index 0 = negative)."""
    import importlib

    ncs = importlib.import_module("comfy_extras.nodes_custom_sampler")
    patched, routing = env.apply(eta=1.0, gamma=1.0)
    m, probe = F.with_probe(patched, env)
    lat = _lat()
    guider = ncs.Guider_DualCFG(m)
    guider.set_conds(env.pos, env.harness.tiny_cond(ctx=F.CTX, seed=55), env.neg)
    guider.set_cfg(4.0, 2.0)
    sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "normal", 1)
    guider.sample(comfy.sample.prepare_noise(lat, 0), lat, comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                  disable_pbar=True)
    assert routing.runs[-1].batch == 1  # one image: the positive rows are recorded, not the middle's too
    for rec in probe.calls:
        assert rec["cond_or_uncond"] == [2, 1, 0]
        assert rec["row_is_pos"] == [True, False, False] and rec["row_is_neg"] == [False, False, True]
        cond = probe.cond_rows(rec)
        assert cond[0] and not cond[2], (rec["key"], rec["chunks"])
        assert bool((rec["index"][2] == 2).all())


def test_two_positive_entries_both_routed_recorded_once_per_image(env, harness):
    """ConditioningCombine gives the positive CONDITIONING two entries: ComfyUI batches them as two cond
    chunks ([1, 0, 0]). Both are routed; the recorder keeps one row per IMAGE (the first positive), so
    the preview does not count the second prompt as another image."""
    import torch

    pos2 = env.pos + harness.tiny_cond(ctx=F.CTX, seed=77)
    patched, routing = env.apply(eta=1.0, gamma=1.0)
    m, probe = F.with_probe(patched, env)
    out = env.sample(m, _lat(), steps=2, pos=pos2)
    assert torch.isfinite(out).all()
    for rec in probe.calls:
        assert rec["cond_or_uncond"] == [1, 0, 0]
        assert probe.cond_rows(rec) == [False, True, True]
        want = F.expected_half_index(rec["hw"])
        assert torch.equal(rec["index"][1], want) and torch.equal(rec["index"][2], want)
    run = routing.runs[-1]
    assert run.batch == 1, f"1 image recorded as {run.batch}"
    with pytest.raises(F.pack_error(), match="image_index 1 does not exist"):
        F.node(env.pack, "AnyStoryRoutingPreview").preview(routing, {"samples": out}, image_index=1)


# ------------------------------------------------------------------------------------------------
# 5. batch 2 and odd latent sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 4, 25, 15), (2, 4, 25, 15)])
def test_batch_and_odd_sizes_route_per_image(env, shape):
    import torch

    patched, routing = env.apply(eta=1.0, gamma=1.0)
    out = env.sample(patched, _lat(*shape), steps=2, cfg=5.0, seed=4)
    assert out.shape == shape and torch.isfinite(out).all()
    run = routing.runs[-1]
    assert run.batch == shape[0] and run.step_ids == [0, 1]
    assert run.meta.get("latent_hw") == shape[-2:]
    for st in run.step_ids:
        assert set(run.steps[st]) == {s.key for s in env.layout}
        for spec in env.layout:
            hw, idx, src = run.steps[st][spec.key]
            assert hw == F.tiny_grid(spec.dim, shape[-2:]), (spec.key, hw)
            assert idx.shape == (shape[0], hw[0] * hw[1]) and src.shape == idx.shape
            want = F.expected_half_index(hw)
            for b in range(shape[0]):  # every image routed by the masks on its own grid
                assert torch.equal(idx[b].long(), want), (spec.key, b)


# ------------------------------------------------------------------------------------------------
# 6. fp16 / bf16 models
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_precision_models(harness, pack, temp_dir, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name)
    e = F.build_env(harness, pack, dtype=dtype)
    assert e.model.model.get_dtype() == dtype
    assert e.subjects.subjects[0].refs.features[F.TINY_KEYS[1]].dtype == dtype  # references captured in it
    lat = _lat(1, 4, 16, 16)
    base = e.sample(e.model, lat, steps=2, seed=1)
    on, routing = e.apply(eta=1.0, gamma=1.0)
    out = e.sample(on, lat, steps=2, seed=1)
    assert torch.isfinite(base).all() and torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3
    assert routing.runs[-1].step_ids == [0, 1]
    off, _ = e.apply(eta=0.0, gamma=0.0)
    assert torch.equal(e.sample(off, lat, steps=2, seed=1), base)


# ------------------------------------------------------------------------------------------------
# 7. refusals, each with a message that says what is wrong
# ------------------------------------------------------------------------------------------------
def test_refuses_non_sdxl_model(env, harness, pack):
    sd15 = harness.tiny_sd15()
    msg = F.raises_pack_error(lambda: env.apply(model=sd15), "SDXL")
    assert "BaseModel" in msg and "context 64" in msg  # it says what it found


def test_refuses_adapter_with_other_layer_layout(env, pack):
    layers = F.pack_mod("anystory.layers")
    big = F.make_anystory(layers.sdxl_layout(), meta_device=True, name="sdxl-70")
    subs = F.pack_mod("nodes.types").SubjectList(big.uid, big.name, env.subjects.subjects, env.subjects.E_bg,
                                                 env.subjects.R_bg)
    msg = F.raises_pack_error(lambda: env.apply(am=big, subjects=subs), "70 cross-attention layers",
                              "7 cross-attention layers")
    assert "640" in msg and "1280" in msg
    assert "(C=" not in msg and len(msg) < 320  # the per-block layout goes to the log (issue 18)


def test_refuses_subjects_from_another_loader(env, pack):
    other = F.make_anystory(env.layout, seed=1, name="other-file")
    F.raises_pack_error(lambda: env.apply(am=other), "another AnyStory model", "other-file")


def test_refuses_start_after_end(env, pack):
    F.raises_pack_error(lambda: env.apply(start_percent=0.8, end_percent=0.2), "start_percent", "end_percent")


def test_refuses_router_mode_without_router(env, pack):
    ip = F.make_anystory(env.layout, kind="ip-adapter-plus-sdxl", name="ip-plus")
    assert not ip.adapter.has_router
    subs = env.encode(F.subject_image(), am=ip, reference="off")["result"][0]
    F.raises_pack_error(lambda: env.apply(am=ip, subjects=subs, router_mode="router", region_masks=None),
            "router_mode 'router'", "router", "masks")
    # mixed without a learned router falls back to the attention router, which needs labels
    F.raises_pack_error(lambda: env.apply(am=ip, subjects=subs, router_mode="mixed", region_masks=env.masks[:1]),
            "router_mode 'mixed' uses the attention router", "no label")
    F.raises_pack_error(lambda: env.apply(am=ip, subjects=subs, router_mode="auto", region_masks=None),
            "no learned router", "region_masks")
    # with a mask it works and says so through the recorder
    patched, routing = env.apply(am=ip, subjects=subs, router_mode="auto", region_masks=env.masks[:1])
    assert routing.mode == "masks"


def test_refuses_masks_mode_without_or_with_wrong_masks(env, pack):
    F.raises_pack_error(lambda: env.apply(router_mode="masks", region_masks=None), "'masks' needs region_masks")
    F.raises_pack_error(lambda: env.apply(region_masks=env.masks[:1]), "1 mask", "2 subjects")
    import torch
    F.raises_pack_error(lambda: env.apply(region_masks=torch.zeros(3, 32, 32)), "3 masks for 2 subjects")


def test_attention_router_needs_label_positions_in_the_prompt(env, pack):
    """router_mode 'attention' with plain CLIPTextEncode-style conditioning: refused when sampling, with
    a message that names the node to use."""
    ip = F.make_anystory(env.layout, kind="ip-adapter-plus-sdxl", name="ip-plus")
    subs = env.encode(F.subject_image(), am=ip, reference="off", label="the cat")["result"][0]
    patched, routing = env.apply(am=ip, subjects=subs, router_mode="auto", region_masks=None)
    assert routing.mode == "attention"
    F.raises_pack_error(lambda: env.sample(patched, _lat(), steps=1), "AnyStory Text Encode", "region_masks")


def test_learned_router_and_mixed_modes(env):
    """Native file: 'router' routes every cond token by the learned router; 'mixed' lets a region mask
    decide where it covers (subject 1's left half) and the router elsewhere (subject 2's mask is black)."""
    import torch

    src_mod = F.pack_mod("anystory.routing")
    patched, routing = env.apply(router_mode="router", region_masks=None)
    out = env.sample(patched, _lat(), steps=2, seed=3)
    assert torch.isfinite(out).all() and routing.mode == "router"
    for rec in routing.runs[-1].steps.values():
        for hw, idx, src in rec.values():
            assert bool((src == src_mod.SOURCE_ROUTER).all()) and int(idx.max()) <= 2
    masks = env.masks.clone()
    masks[1] = 0  # "not given": the router decides there
    mixed, routing = env.apply(router_mode="auto", region_masks=masks)
    assert routing.mode == "mixed"
    env.sample(mixed, _lat(), steps=2, seed=3)
    for rec in routing.runs[-1].steps.values():
        for hw, idx, src in rec.values():
            left = F.expected_half_index(hw) == 0
            assert bool((src[0][left] == src_mod.SOURCE_MASK).all()) and bool((idx[0][left] == 0).all())
            assert bool((src[0][~left] == src_mod.SOURCE_ROUTER).all())


# ------------------------------------------------------------------------------------------------
# 8. an attn2 replace that was there before (IPAdapter-like) is chained, not dropped
# ------------------------------------------------------------------------------------------------
class FakeIPAdapterAttn2:
    """IPAdapter-like attn2 replace: text attention + a term of its own. Counts its calls and ``.to``
    calls in a class-level registry (ModelPatcher.clone() deep-copies instances like this one)."""

    calls = collections.Counter()
    to_args: list = []

    def __init__(self, tag: str, scale: float = 0.5):
        self.tag, self.scale = tag, scale

    def to(self, *args, **kwargs):
        FakeIPAdapterAttn2.to_args.append(args)
        return self

    def __call__(self, q, k, v, extra_options):
        import torch

        import comfy.ldm.modules.attention as A
        FakeIPAdapterAttn2.calls[self.tag] += 1
        out = A.optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))
        return out + self.scale * torch.tanh(q)


def test_chains_existing_attn2_replace(env, pack):
    import torch

    FakeIPAdapterAttn2.calls.clear()
    FakeIPAdapterAttn2.to_args.clear()
    ip_model = env.model.clone()
    for spec in env.layout:
        k = spec.key
        if k == ("middle", 0, 0):  # one as a 2-tuple key (applies to every block of that transformer)
            ip_model.set_model_attn2_replace(FakeIPAdapterAttn2("middle"), k[0], k[1])
        else:
            ip_model.set_model_attn2_replace(FakeIPAdapterAttn2(f"{k[0]}{k[1]}"), *k)
    lat = _lat()
    plain = env.sample(env.model, lat, steps=2, seed=9)
    ip_only = env.sample(ip_model, lat, steps=2, seed=9)
    assert (ip_only - plain).abs().max() > 1e-3  # the fake does something
    n_ip_only = sum(FakeIPAdapterAttn2.calls.values())
    assert n_ip_only == 2 * len(env.layout)  # 2 steps × one batched UNet call × 7 layers

    FakeIPAdapterAttn2.calls.clear()
    off, _ = env.apply(model=ip_model, eta=0.0, gamma=0.0)
    reps = F.anystory_replaces(off)
    assert len(reps) == len(env.layout)
    assert all(type(r.previous).__name__ == "FakeIPAdapterAttn2" for r in reps.values()), "a replace was dropped"
    FakeIPAdapterAttn2.to_args.clear()
    out = env.sample(off, lat, steps=2, seed=9)
    assert sum(FakeIPAdapterAttn2.calls.values()) == n_ip_only, FakeIPAdapterAttn2.calls
    assert set(FakeIPAdapterAttn2.calls) == {f"{s.key[0]}{s.key[1]}" for s in env.layout if s.key[0] != "middle"} | {"middle"}
    assert torch.equal(out, ip_only), "η=γ=0 on top of the IPAdapter-like replace is not that replace alone"
    assert FakeIPAdapterAttn2.to_args, "ComfyUI's .to() on the patches did not reach the chained replace"

    FakeIPAdapterAttn2.calls.clear()
    on, _ = env.apply(model=ip_model, eta=1.0, gamma=0.0)
    out_on = env.sample(on, lat, steps=2, seed=9)
    assert sum(FakeIPAdapterAttn2.calls.values()) == n_ip_only
    only_anystory, _ = env.apply(eta=1.0, gamma=0.0)
    assert (out_on - ip_only).abs().max() > 1e-3
    assert (out_on - env.sample(only_anystory, lat, steps=2, seed=9)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# 9. start / end percent
# ------------------------------------------------------------------------------------------------
def _active_steps(model, steps, start, end, comfy):
    """Steps whose sigma lies in [percent_to_sigma(end), percent_to_sigma(start)] (IPAdapter's rule)."""
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps)
    s_start, s_end = ms.percent_to_sigma(start), ms.percent_to_sigma(end)
    return [i for i in range(steps) if s_end <= float(sigmas[i]) <= s_start], sigmas


def test_start_end_percent(env, comfy):
    import torch

    lat = _lat()
    base = env.sample(env.model, lat, steps=3, seed=21)
    _, sigmas = _active_steps(env.model, 3, 0.0, 1.0, comfy)
    ms = env.model.get_model_object("model_sampling")
    ps = [i / 1000 for i in range(1001)]
    sig = [float(ms.percent_to_sigma(p)) for p in ps]
    gap01 = [p for p, s in zip(ps, sig) if float(sigmas[1]) < s < float(sigmas[0])]  # between steps 0 and 1
    gap12 = [p for p, s in zip(ps, sig) if float(sigmas[2]) < s < float(sigmas[1])]  # between steps 1 and 2

    # (a) windows that no step falls in: the output is the un-patched one, nothing is recorded
    for start, end in ((gap01[0], gap01[-1]), (1.0, 1.0)):
        active, _ = _active_steps(env.model, 3, start, end, comfy)
        assert active == [], (start, end, sigmas)
        idle, routing = env.apply(eta=1.0, gamma=1.0, start_percent=start, end_percent=end)
        assert torch.equal(env.sample(idle, lat, steps=3, seed=21), base), (start, end)
        assert routing.runs == []

    # (b) windows around one step only: maps recorded for that step only, the output changes
    for start, end, want in ((gap01[0], gap12[0], [1]), (0.99, 1.0, [2])):
        active, _ = _active_steps(env.model, 3, start, end, comfy)
        assert active == want, (start, end, sigmas, active)
        part, routing = env.apply(eta=1.0, gamma=1.0, start_percent=start, end_percent=end)
        m, probe = F.with_probe(part, env)
        out = env.sample(m, lat, steps=3, seed=21)
        assert routing.runs[-1].step_ids == want, "maps recorded for steps outside the window"
        actives = {round(r["sigma"], 4): r["active"] for r in probe.calls}
        assert [actives[round(float(s), 4)] for s in sigmas[:3]] == [i in want for i in range(3)]
        assert (out - base).abs().max() > 1e-4

    # (c) the full window is every step
    full, routing = env.apply(eta=1.0, gamma=1.0, start_percent=0.0, end_percent=1.0)
    env.sample(full, lat, steps=3, seed=21)
    assert routing.runs[-1].step_ids == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# 10. the reference attention really uses the references
# ------------------------------------------------------------------------------------------------
class _Attn1Out:
    """attn1_output_patch recording the output of one layer's self-attention per UNet call."""

    def __init__(self, key):
        self.key, self.outs = key, []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, extra_options):
        b = extra_options["block"]
        if (b[0], b[1], extra_options.get("block_index", 0)) == self.key:
            self.outs.append(n.detach().clone())
        return n


def test_reference_attention_uses_references(env):
    import torch

    lat = _lat()
    base = env.sample(env.model, lat, steps=2, seed=5)
    refs_on, _ = env.apply(eta=0.0, gamma=1.0)
    owner = F.owner_of(refs_on)
    assert owner.runtime.inputs.refs is not None and owner.runtime.inputs.refs.source == "shared"
    assert len(F.anystory_replaces(refs_on, "attn1")) == len(env.layout) - 1  # layer 1 has no M^0
    assert (env.sample(refs_on, lat, steps=2, seed=5) - base).abs().max() > 1e-3, "γ>0 had no effect"
    refs_off, _ = env.apply(eta=0.0, gamma=0.0)
    assert torch.equal(env.sample(refs_off, lat, steps=2, seed=5), base)
    # subjects encoded with reference='off': γ > 0 has nothing to attend to
    noref, _ = env.apply(subjects=env.subjects_noref, eta=0.0, gamma=1.0)
    assert F.owner_of(noref).runtime.inputs.refs is None and not F.anystory_replaces(noref, "attn1")
    assert torch.equal(env.sample(noref, lat, steps=2, seed=5), base)


def test_reference_projections_of_the_file_are_used_and_loaded_while_sampling(env):
    """A native file with W̃_k^l, W̃_v^l (reference_proj.N): AnyStoryApply's reference attention projects
    G_i^l with them (the image differs from the same file without W̃, whose other weights are identical)
    and ComfyUI loads the adapter with the UNet while sampling (W̃ are projected once per run)."""
    import torch

    lat = _lat()
    with_w = F.make_anystory(env.layout, seed=0, reference_proj="all")
    assert with_w.adapter.reference_layers == sorted(s.ckpt_index for s in env.layout)
    out = {}
    for name, am in (("with", with_w), ("without", env.am)):
        s1 = env.encode(F.subject_image((0.9, 0.2, 0.1), seed=1), am=am, label="the cat")["result"][0]
        subs = env.encode(F.subject_image((0.1, 0.3, 0.9), (64, 80), seed=2), am=am, subjects=s1,
                          label="the dog")["result"][0]
        patched, _ = env.apply(subjects=subs, am=am, eta=0.0, gamma=1.0)
        owner = F.owner_of(patched)
        assert owner.runtime.uses_reference_proj == (am is with_w)
        assert patched.get_additional_models_with_key(owner.state_key) == ([am.patcher] if am is with_w else [])
        out[name] = env.sample(patched, lat, steps=2, seed=5)
    assert torch.isfinite(out["with"]).all()
    assert (out["with"] - out["without"]).abs().max() > 1e-3, "W̃ had no effect"


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_negative_rows_same_references_as_positive(env, cfg):
    """negative_rows 'same references as positive': the uncond rows attend to the references too, so the
    image differs from the default ('background only') under CFG; at cfg 1 ComfyUI runs no uncond rows and
    the two are the same bit for bit. η = 0: the references alone."""
    import torch

    lat = _lat()
    default, _ = env.apply(eta=0.0, gamma=1.0)
    same, _ = env.apply(eta=0.0, gamma=1.0, negative_rows="same references as positive")
    assert F.owner_of(same).runtime.inputs.references_on_negative
    assert not F.owner_of(default).runtime.inputs.references_on_negative
    a, b = env.sample(default, lat, steps=2, seed=5, cfg=cfg), env.sample(same, lat, steps=2, seed=5, cfg=cfg)
    if cfg == 1.0:
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() > 1e-4, "the uncond rows saw no references"
    with pytest.raises(Exception, match="negative_rows 'both' is not known"):
        env.apply(eta=0.0, gamma=1.0, negative_rows="both")


def test_reference_off_subject_gets_no_references(env, caplog):
    """Subject 1 reference='off', subject 2 shared: at the first layer with references, tokens routed to
    subject 1 get plain self-attention, tokens routed to subject 2 get its references."""
    import torch

    s1 = env.encode(F.subject_image((0.9, 0.2, 0.1), seed=1), label="off", reference="off")["result"][0]
    mixed = env.encode(F.subject_image((0.1, 0.3, 0.9), (64, 80), seed=2), subjects=s1, label="on")["result"][0]
    with caplog.at_level(logging.WARNING):
        patched, _ = env.apply(subjects=mixed, eta=0.0, gamma=1.0)
    assert any("no ReferenceNet features" in r.getMessage() for r in caplog.records)
    rt = F.owner_of(patched).runtime
    assert rt.inputs.gamma.tolist() == [0.0, 1.0]
    key = env.layout[1].key  # first layer with references (execution order)
    assert rt.inputs.refs.subject_tokens(key, 0).shape[0] == 0
    assert rt.inputs.refs.subject_tokens(key, 1).shape[0] > 0

    rec_p, rec_u = _Attn1Out(key), _Attn1Out(key)
    mp, mu = patched.clone(), env.model.clone()
    mp.set_model_attn1_output_patch(rec_p)
    mu.set_model_attn1_output_patch(rec_u)
    lat = _lat()
    env.sample(mp, lat, steps=1, seed=8)
    env.sample(mu, lat, steps=1, seed=8)
    a, b = rec_p.outs[0], rec_u.outs[0]   # [2 rows (uncond, cond), L, C]; inputs identical up to here (η=0)
    hw = F.tiny_grid(env.layout[1].dim, (16, 16))
    idx = F.expected_half_index(hw)
    # uncond rows: plain attention, up to the fp32 rounding of the routing dims of the fused call
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=5e-4, msg="uncond rows got references")
    left, right = idx == 0, idx == 1
    torch.testing.assert_close(a[1][left], b[1][left], rtol=0, atol=5e-4)  # subject 1: no references
    assert ((a[1][right] - b[1][right]).abs().amax(-1) > 1e-4).all(), "subject 2's tokens ignored its references"


# ------------------------------------------------------------------------------------------------
# 13. sampler × scheduler matrix; step attribution of samplers with intermediate evaluations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde", "uni_pc", "ddim"])
def test_sampler_scheduler_matrix(env, sampler, scheduler):
    import torch

    patched, routing = env.apply(eta=1.0, gamma=1.0)
    out = env.sample(patched, _lat(), steps=3, cfg=5.0, sampler=sampler, scheduler=scheduler, seed=1)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    run = routing.runs[-1]
    assert run.step_ids == [0, 1, 2], run.step_ids
    for st in run.step_ids:
        assert set(run.steps[st]) == {s.key for s in env.layout}


def test_intermediate_evaluations_are_recorded_under_their_step(env):
    """dpmpp_sde evaluates the model between two schedule sigmas; those maps belong to that step (they
    used to be filed under step 0, overwriting its maps)."""
    patched, routing = env.apply(eta=1.0, gamma=1.0)
    m, probe = F.with_probe(patched, env)
    env.sample(m, _lat(), steps=3, sampler="dpmpp_sde", scheduler="karras", seed=1)
    sched = [float(s) for s in routing.runs[-1].sigmas]
    seen = {}
    for rec in probe.calls:
        s = rec["sigma"]
        want = max(i for i in range(len(sched) - 1) if sched[i] >= s * (1 - 1e-4))
        assert rec["step"] == want, (s, rec["step"], want, sched)
        seen[round(s, 4)] = rec["step"]
    assert len(seen) == 5  # 3 schedule sigmas + 2 midpoints (the last step has none)


@pytest.mark.parametrize("sampler,by_count", [("euler", True), ("dpmpp_2m", True), ("heun", False),
                                              ("dpmpp_sde", False)])
def test_step_sigma_from_the_call_count_only_for_one_call_per_step_samplers(env, sampler, by_count):
    """For samplers that call the model once per step, σ of a call is the run's sigma at the call's position
    (no device sync per step); for the others it is read from the device — the recorded steps agree."""
    patched, routing = env.apply(eta=1.0, gamma=1.0)
    owner = F.owner_of(patched)
    env.sample(patched, _lat(), steps=3, sampler=sampler, scheduler="karras", seed=1)
    assert owner._by_count is by_count
    assert routing.runs[-1].step_ids == [0, 1, 2]


@pytest.mark.skipif("not __import__('torch').cuda.is_available()",
                    reason="NO CUDA DEVICE: the sync-free σ lookup reads σ from the count only for CUDA "
                           "timesteps (run this test on a GPU machine)")
def test_step_sigma_from_the_count_falls_back_when_the_device_disagrees(env):
    import torch
    patched, _ = env.apply(eta=1.0, gamma=1.0)
    owner = F.owner_of(patched)
    owner._by_count, owner._calls, owner._check = True, 0, None
    host = [3.0, 2.0, 1.0, 0.5, 0.0]
    ts = lambda v: torch.full((2,), v, device="cuda")  # noqa: E731
    assert owner._step_sigma(ts(3.0), host) == (3.0, 0) and owner._by_count
    torch.cuda.synchronize()
    assert owner._step_sigma(ts(2.0), host) == (2.0, 1) and owner._by_count  # the check of call 0 agreed
    torch.cuda.synchronize()
    assert owner._step_sigma(ts(1.5), host) == (1.0, 2)  # a call the count gets wrong: found one call later
    torch.cuda.synchronize()
    assert owner._step_sigma(ts(1.25), host) == (1.25, None) and not owner._by_count


# ------------------------------------------------------------------------------------------------
# 14. the adapter is loaded/offloaded with the UNet
# ------------------------------------------------------------------------------------------------
def test_adapter_stays_out_of_sampling_without_the_learned_router(env, comfy):
    """masks/attention modes: E_i Ŵ_k/Ŵ_v are projected once at apply time, so the adapter's weights
    need not be loaded while sampling (VRAM); the routed term still uses them."""
    import torch
    patched, _ = env.apply(eta=1.0, gamma=0.0)
    owner = F.owner_of(patched)
    assert patched.get_additional_models_with_key(owner.state_key) == []
    assert set(owner.runtime.kv._static_route_kv) == {s.key for s in env.layout}
    out = env.sample(patched, _lat())
    assert not torch.equal(out, env.sample(env.model, _lat()))


def test_adapter_is_an_additional_model_of_the_patched_model(env, comfy):
    patched, _ = env.apply(eta=1.0, gamma=1.0, router_mode="router", region_masks=None)
    owner = F.owner_of(patched)
    assert patched.get_additional_models_with_key(owner.state_key) == [env.am.patcher]
    assert env.am.patcher in patched.get_nested_additional_models()
    clone = patched.clone()  # e.g. a LoRA node after AnyStoryApply
    nested = clone.get_nested_additional_models()
    assert any(m.model is env.am.adapter for m in nested), "lost on clone()"
    # during a real sampling, ComfyUI has loaded it with the UNet (model_management's loaded models)
    seen = []

    def callback(step, x0, x, total_steps):
        seen.append([lm.model for lm in comfy.model_management.current_loaded_models])

    lat = _lat()
    noise = comfy.sample.prepare_noise(lat, 0)
    comfy.sample.sample(clone, noise, 2, 5.0, "euler", "normal", env.pos, env.neg, lat, disable_pbar=True, seed=0,
                        callback=callback)
    assert len(seen) == 2
    for loaded in seen:
        assert any(m is not None and m.model is clone.model for m in loaded)
        assert any(m is not None and m.model is env.am.adapter for m in loaded), "adapter not loaded with the UNet"


def test_sampling_releases_the_encoders_graphs(env):
    """The encoders' CUDA graphs (kept between the subjects of a prompt) are dropped when a sampling run
    with AnyStory starts: they add nothing to sampling's VRAM."""
    state = F.pack_mod("nodes.state")
    state.ENCODER_GRAPHS._entries["stand-in"] = ["a graph and its pool"]
    patched, _ = env.apply(eta=1.0, gamma=1.0)
    assert "stand-in" in state.ENCODER_GRAPHS._entries  # applying alone keeps them (more subjects may follow)
    env.sample(patched, _lat(), steps=1, sampler="euler", scheduler="normal", seed=1)
    assert "stand-in" not in state.ENCODER_GRAPHS._entries


def test_recorder_buffer_is_made_before_the_second_steps_call(env, monkeypatch):
    """Through ComfyUI's sampler: the recorder's buffer for the later steps is made before the model
    call of the second step (before any of its layers records), so no map is allocated inside a call
    after the first step; the recorded maps still cover every step."""
    patched, routing = env.apply(eta=1.0, gamma=1.0)
    events = []
    pv = F.pack_mod("anystory.fast.slab")
    orig_reserve, orig_keep = pv.StepSlab.reserve, pv.StepSlab.keep

    def reserve(self, step):
        had = self.buf is not None
        orig_reserve(self, step)
        if not had and self.buf is not None:
            events.append(("made", step))

    def keep(self, step, key, part, t):
        events.append(("keep", step))
        return orig_keep(self, step, key, part, t)

    monkeypatch.setattr(pv.StepSlab, "reserve", reserve)
    monkeypatch.setattr(pv.StepSlab, "keep", keep)
    with torch.inference_mode():  # as ComfyUI runs nodes: maps without version counters
        env.sample(patched, _lat(), steps=3, sampler="euler", scheduler="normal", seed=1)
    made = events.index(("made", 1))
    assert all(e == ("keep", 0) for e in events[:made]) and ("keep", 1) in events[made:]
    assert sorted(routing.runs[-1].steps) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# issue 18: user words, old names, the simple Apply
# ------------------------------------------------------------------------------------------------
def test_widgets_and_tooltips_use_user_words(pack):
    """Point 8: no paper symbols in the Apply nodes' widget names, tooltips or descriptions."""
    for name in ("AnyStoryApply", "AnyStoryApplySimple", "AnyStorySubjectEncode"):
        cls = F.node(pack, name).__class__
        spec = cls.INPUT_TYPES()
        shown = {**spec.get("required", {}), **spec.get("optional", {})}
        assert not {"eta", "gamma", "threshold", "warmup_steps"} & set(shown), (name, list(shown))
        texts = [o[1].get("tooltip", "") for o in shown.values() if len(o) > 1] + [cls.DESCRIPTION]
        for t in texts:
            assert not any(sym in t for sym in ("η", "γ", "eq.", "E_i", "R_i", "G_i", "ln ")), (name, t)
    adv = F.node(pack, "AnyStoryApply").INPUT_TYPES()
    assert list(adv["optional"])[:4] == ["subject_strength", "detail_strength", "start_percent", "end_percent"]


def test_old_input_names_of_an_api_prompt_still_reach_the_node(env, pack):
    """An API prompt of an older version ({"eta", "gamma", "threshold", "warmup_steps"}) validates (the new names
    are optional) and ComfyUI hands the old values to the node, which uses them as the new inputs."""
    import torch

    import execution

    cls = F.node(pack, "AnyStoryApply").__class__
    spec = cls.INPUT_TYPES()
    assert {"subject_strength", "detail_strength", "region_warmup", "region_threshold"} <= set(spec["optional"])
    assert {"eta", "gamma", "warmup_steps", "threshold"} <= set(spec["hidden"])  # read, not shown
    old = {"router_mode": "masks", "eta": 0.4, "gamma": 0.0, "start_percent": 0.0, "end_percent": 1.0,
           "threshold": 0.5, "warmup_steps": 3}
    data, missing, _ = execution.get_input_data(old, cls, "7")
    assert {k: v[0] for k, v in data.items() if k in old} == old and not missing
    kw = {k: v[0] for k, v in data.items() if k != "unique_id"}
    a = cls().apply(env.model, env.am, env.subjects_noref, region_masks=env.masks, **kw)[0]
    b = cls().apply(env.model, env.am, env.subjects_noref, "masks", 0.4, 0.0, region_masks=env.masks)[0]
    c = cls().apply(env.model, env.am, env.subjects_noref, "masks", 1.0, 0.0, region_masks=env.masks)[0]
    out = [env.sample(m, _lat(), steps=2, seed=5) for m in (a, b, c)]
    assert torch.equal(out[0], out[1]), "the old name 'eta' was not used as subject_strength"
    assert not torch.equal(out[0], out[2])


def test_region_warmup_share_and_old_step_counts():
    apply = F.pack_mod("nodes.apply")
    assert apply.warmup_setting(None, None) == (0.1, None)
    assert apply.warmup_setting(0.25, None) == (0.25, None)
    assert apply.warmup_setting(2.0, None) == (0.1, 2)  # a UI workflow of an older version stored 2 (steps) here
    assert apply.warmup_setting(None, 3) == (0.1, 3)    # an API prompt with the old name


def test_simple_apply_equals_advanced_apply(env, pack):
    """Point 10: AnyStory Apply (simple) == AnyStory Apply (Advanced) with the same settings, bit for bit."""
    import torch

    simple = F.node(pack, "AnyStoryApplySimple").apply(env.model, env.am, env.subjects, 0.8, 1.3, 0.1, 0.9)
    adv = F.node(pack, "AnyStoryApply").apply(env.model, env.am, env.subjects, "auto", 0.8, 1.3, 0.1, 0.9)
    assert simple[1].mode == adv[1].mode == "router"
    a = env.sample(simple[0], _lat(), steps=3, seed=9)
    b = env.sample(adv[0], _lat(), steps=3, seed=9)
    plain = env.sample(env.model, _lat(), steps=3, seed=9)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    spec = F.node(pack, "AnyStoryApplySimple").INPUT_TYPES()
    assert list(spec["required"]) == ["model", "anystory", "subjects", "subject_strength", "detail_strength",
                                      "start_percent", "end_percent"]
