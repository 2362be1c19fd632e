"""The routed model patch across the layers of one simulated UNet call (no host needed)."""
import functools

import pytest
import torch

from anystory.layers import LayerLayout
from anystory.paper.attention import sdpa
from anystory.paper.reference import ReferenceFeatures, routed_reference_attention
from anystory.paper.router import resize_index
from anystory.patch import (
    NEGATIVE_BACKGROUND,
    NEGATIVE_REFERENCES,
    CallState,
    RoutedPatch,
    RoutingInputs,
    chunks_from_roles,
)
from anystory.recorder import RoutingRecorder
from anystory.routing import MODE_MASKS, MODE_MIXED, MODE_ROUTER, make_routing, resolve_mode
from anystory.synthetic import random_adapter

C, HEADS = 32, 2
LAYOUT = LayerLayout([(("input", 1, 0), C, HEADS), (("middle", 0, 0), C, HEADS), (("output", 1, 0), C, HEADS)])
GRIDS = {("input", 1, 0): (4, 6), ("middle", 0, 0): (2, 3), ("output", 1, 0): (4, 6)}


def halves(n: int) -> torch.Tensor:
    """Region masks: subject 1 the left half, subject 2 the right half of an 8×12 image."""
    region = torch.zeros(n, 8, 12)
    region[0, :, :6] = 1
    if n > 1:
        region[1, :, 6:] = 1
    return region


class Attn1:
    """A stand-in for the UNet's attn1 of a layer: its to_k / to_v project G_i^l."""

    def __init__(self, proj):
        self.proj = proj

    def to_k(self, g):
        return self.proj(g)

    def to_v(self, g):
        return self.proj(g) * 0.5


def routing_for(mode, ad, emb, n, masks=None, attention_router=None, feather=False):
    """The routing source AnyStory Apply would build for ``mode``."""
    plan = resolve_mode(mode, learned=ad.has_router and emb.R is not None,
                        unlabelled=[] if attention_router is not None else list(range(1, n + 1)),
                        has_masks=masks is not None)
    return make_routing(plan, n + 1, adapter=ad, R=emb.R, attention_router=attention_router, masks=masks,
                        feather=feather)


def make(mode=MODE_MASKS, eta=1.0, gamma=1.0, n=2, masks=True, refs=True, seed=0, recorder=None,
         attention_router=None, feather=False, reference_proj=None, negative_rows=NEGATIVE_BACKGROUND):
    """``masks``: True = :func:`halves`, a tensor = those masks, False = none; ``reference_proj``: the
    adapter's W̃_k^l, W̃_v^l ("all" or a list of layers N; the other weights stay the same)."""
    torch.manual_seed(seed)
    ad = random_adapter(LAYOUT, qformer_dim=64, clip_dim=48, depth=1, router_dim=16, router_heads=2, seed=seed,
                        reference_proj=reference_proj)
    emb = ad.encode(torch.randn(n, 5, 48), torch.zeros(1, 5, 48))
    region = halves(n) if masks is True else (masks if torch.is_tensor(masks) else None)
    rf = None
    if refs:
        rf = ReferenceFeatures({k: torch.randn(n, 7, C) for k in GRIDS}, {k: (1, 7) for k in GRIDS})
    inputs = RoutingInputs(E=emb.E, eta=torch.full((n + 1,), float(eta)), gamma=torch.full((n,), float(gamma)),
                           refs=rf, negative_rows=negative_rows)
    proj = torch.nn.Linear(C, C, bias=False)
    routing = routing_for(mode, ad, emb, n, region, attention_router, feather)
    rp = RoutedPatch(ad, LAYOUT, inputs, routing, attn1={k: Attn1(proj) for k in GRIDS}, recorder=recorder)
    return rp, proj


def run_call(rp, roles=(True, False), rows=1, active=True, step=0, seed=1, labels=None):
    """One UNet call: per layer attn1 → route → attn2, as ComfyUI's BasicTransformerBlock orders them."""
    g = torch.Generator().manual_seed(seed)
    B = rows * len(roles)
    state = CallState(chunks_from_roles(list(roles), rows), active=active, step=step)
    if labels is not None:
        state.labels = [labels if r else None for r in roles]
    base = functools.partial(sdpa, heads=HEADS)
    outs = {}
    for spec in LAYOUT:
        hw = GRIDS[spec.key]
        L = hw[0] * hw[1]
        q, k, v, n = (torch.randn(B, L, C, generator=g) for _ in range(4))
        prev = (state.last_index, state.last_hw)
        a1 = rp.self_attention(state, spec.key, q, k, v, HEADS, hw, lambda q, k, v: sdpa(q, k, v, HEADS))
        rp.route(state, spec.key, n, hw)
        kt, vt = torch.randn(B, 9, C, generator=g), torch.randn(B, 9, C, generator=g)
        a2 = rp.cross_attention(state, spec.key, q, kt, vt, HEADS, lambda q, k, v: sdpa(q, k, v, HEADS))
        outs[spec.key] = dict(q=q, k=k, v=v, kt=kt, vt=vt, a1=a1, a2=a2, prev=prev, index=state.index.get(spec.key))
    del base
    return outs


def test_eta_and_gamma_zero_give_the_unpatched_outputs_bit_for_bit():
    rp, _ = make(eta=0.0, gamma=0.0)
    rp.begin_run()
    for key, o in run_call(rp).items():
        assert torch.equal(o["a1"], sdpa(o["q"], o["k"], o["v"], HEADS))
        assert torch.equal(o["a2"], sdpa(o["q"], o["kt"], o["vt"], HEADS))


def test_inactive_call_is_unpatched():
    rp, _ = make()
    rp.begin_run()
    for o in run_call(rp, active=False).values():
        assert torch.equal(o["a1"], sdpa(o["q"], o["k"], o["v"], HEADS))
        assert torch.equal(o["a2"], sdpa(o["q"], o["kt"], o["vt"], HEADS))


def test_masks_route_each_subject_to_its_half_and_uncond_to_background():
    rp, _ = make(mode=MODE_MASKS, gamma=0.0)
    rp.begin_run()
    outs = run_call(rp, roles=(True, False))
    o = outs[("input", 1, 0)]
    idx = o["index"]
    assert idx.shape == (2, 24)
    grid = idx[0].view(4, 6)
    assert (grid[:, :3] == 0).all() and (grid[:, 3:] == 1).all()  # cond row: masks decide
    assert (idx[1] == 2).all()                                    # uncond row: background route
    kr, vr = rp.route_kv(LAYOUT.by_key(("input", 1, 0)), o["q"])
    text = sdpa(o["q"], o["kt"], o["vt"], HEADS)
    for row, route_of in ((0, grid.flatten()), (1, torch.full((24,), 2))):
        for r in range(3):
            sel = route_of == r
            if not sel.any():
                continue
            want = text[row, sel] + sdpa(o["q"][row:row + 1, sel], kr[r:r + 1], vr[r:r + 1], HEADS)[0]
            torch.testing.assert_close(o["a2"][row, sel], want, atol=1e-5, rtol=1e-5)


def test_subject_change_only_affects_its_region():
    """Changing subject 2's tokens E_2 changes attn2 outputs only where subject 2 is routed."""
    rp, _ = make(mode=MODE_MASKS, gamma=0.0)
    rp.begin_run()
    a = run_call(rp)
    rp.inputs.E = rp.inputs.E.clone()
    rp.inputs.E[1] += 3.0
    rp.begin_run()
    b = run_call(rp)
    for key in GRIDS:
        idx = a[key]["index"]
        same = idx != 1
        assert torch.equal(a[key]["a2"][same], b[key]["a2"][same])
        assert not torch.allclose(a[key]["a2"][~same], b[key]["a2"][~same])


def test_reference_attention_uses_previous_layer_map_and_skips_uncond():
    rp, proj = make(mode=MODE_MASKS, eta=0.0, gamma=2.0)
    rp.begin_run()
    outs = run_call(rp, roles=(True, False))
    first = outs[("input", 1, 0)]
    assert torch.equal(first["a1"], sdpa(first["q"], first["k"], first["v"], HEADS))  # no M^0
    o = outs[("middle", 0, 0)]
    prev_index, prev_hw = o["prev"]
    assert prev_hw == (4, 6)
    index = resize_index(prev_index, prev_hw, (2, 3))
    feats = rp.inputs.refs.features[("middle", 0, 0)]
    kr = [proj(feats[i]) for i in range(2)]
    vr = [proj(feats[i]) * 0.5 for i in range(2)]
    want = routed_reference_attention(o["q"][:1], o["k"][:1], o["v"][:1], kr, vr, index[:1], HEADS,
                                      torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(o["a1"][:1], want, atol=5e-4, rtol=5e-4)
    # uncond rows: their plain attention (one fused call for the batch: equal up to the fp32 rounding of
    # the extra routing dims, ~1e-4 of a logit)
    torch.testing.assert_close(o["a1"][1:], sdpa(o["q"][1:], o["k"][1:], o["v"][1:], HEADS), atol=5e-4, rtol=5e-4)
    assert not torch.allclose(o["a1"][:1], sdpa(o["q"][:1], o["k"][:1], o["v"][:1], HEADS))


def test_reference_projections_of_the_file_replace_the_unet_attn1():
    """Eq. 6-8 with the file's W̃_k^l, W̃_v^l (``reference_proj.N``): K̃_i = G_i W̃_k, Ṽ_i = G_i W̃_v. The fast
    path equals the dense paper form computed with W̃, differs from the UNet's attn1 stand-in, and a layer
    without W̃ in the file keeps the attn1 stand-in bit for bit."""
    mid, out = ("middle", 0, 0), ("output", 1, 0)
    n_mid = LAYOUT.by_key(mid).ckpt_index
    rp, _ = make(mode=MODE_MASKS, eta=0.0, gamma=2.0, reference_proj=[n_mid])
    base, proj = make(mode=MODE_MASKS, eta=0.0, gamma=2.0)  # the same weights, no W̃
    assert rp.adapter.reference_layers == [n_mid] and base.adapter.reference_layers == []
    assert rp.uses_reference_proj and not base.uses_reference_proj
    for p in (rp, base):
        p.begin_run()
    with_w, without = run_call(rp), run_call(base)
    o = with_w[mid]
    index = resize_index(*o["prev"], (2, 3))
    feats = rp.inputs.refs.features[mid]
    wt = rp.adapter.reference_proj[str(n_mid)]
    kr = [feats[i] @ wt.to_k.weight.T for i in range(2)]
    vr = [feats[i] @ wt.to_v.weight.T for i in range(2)]
    want = routed_reference_attention(o["q"][:1], o["k"][:1], o["v"][:1], kr, vr, index[:1], HEADS,
                                      torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(o["a1"][:1], want, atol=5e-4, rtol=5e-4)
    assert (o["a1"][:1] - without[mid]["a1"][:1]).abs().max() > 1e-2  # W̃ is not the UNet's attn1
    assert torch.equal(with_w[out]["a1"], without[out]["a1"])  # no W̃ for this layer: attn1 as before
    stand_in = [proj(feats[i]) for i in range(2)], [proj(feats[i]) * 0.5 for i in range(2)]
    torch.testing.assert_close(without[mid]["a1"][:1], routed_reference_attention(
        o["q"][:1], o["k"][:1], o["v"][:1], *stand_in, index[:1], HEADS, torch.tensor([2.0, 2.0])),
        atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("roles", [(True, False), (False, True), (False,)])
def test_negative_rows_with_the_same_references_as_positive(roles):
    """negative_rows = "same references as positive": the uncond rows are routed as the cond rows (here the
    region masks: the same map) and attend to the references (eq. 6-8 with W_k, W_v of attn1 and M^{l-1}),
    while their attn2 still gets the background route only (the dropped CLIP condition). Also in a call of
    uncond rows alone (ComfyUI splits cond and uncond when memory is short)."""
    rp, proj = make(mode=MODE_MASKS, eta=1.0, gamma=2.0, negative_rows=NEGATIVE_REFERENCES)
    bg_rp, _ = make(mode=MODE_MASKS, eta=1.0, gamma=2.0)
    rp.begin_run()
    bg_rp.begin_run()
    outs, bg_outs = run_call(rp, roles=roles), run_call(bg_rp, roles=roles)
    key = ("middle", 0, 0)
    o = outs[key]
    neg = [i for i, r in enumerate(roles) if not r]
    index = resize_index(o["prev"][0], o["prev"][1], (2, 3))
    assert (o["prev"][0] == o["prev"][0][neg[0]]).all()  # every row routed alike by the masks
    feats = rp.inputs.refs.features[key]
    kr, vr = [proj(feats[i]) for i in range(2)], [proj(feats[i]) * 0.5 for i in range(2)]
    want = routed_reference_attention(o["q"], o["k"], o["v"], kr, vr, index, HEADS, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(o["a1"], want, atol=5e-4, rtol=5e-4)  # all rows, uncond included
    for i in neg:
        plain = sdpa(o["q"][i:i + 1], o["k"][i:i + 1], o["v"][i:i + 1], HEADS)
        assert (o["a1"][i:i + 1] - plain).abs().max() > 1e-3  # the references reach the uncond row
        torch.testing.assert_close(bg_outs[key]["a1"][i:i + 1], plain, atol=5e-4, rtol=5e-4)  # default: none
        for k in GRIDS:  # attn2: the background route on the uncond rows in both settings
            assert (outs[k]["index"][i] == 2).all()
            assert torch.equal(outs[k]["index"], bg_outs[k]["index"])
    for i in (i for i, r in enumerate(roles) if r):  # cond rows: the same in both settings
        torch.testing.assert_close(o["a1"][i], bg_outs[key]["a1"][i], atol=1e-6, rtol=1e-6)


def test_negative_rows_setting_is_checked():
    with pytest.raises(ValueError, match="negative_rows must be one of"):
        make(negative_rows="both")


def test_learned_router_and_mixed_mode():
    rp, _ = make(mode=MODE_ROUTER, masks=False, gamma=0.0)
    rp.begin_run()
    outs = run_call(rp, roles=(True,), rows=2)
    idx = outs[("middle", 0, 0)]["index"]
    assert idx.shape == (2, 6) and idx.max() <= 2
    region = halves(2)
    region[1] = 0  # subject 2 not given → router decides outside subject 1's mask
    rp2, _ = make(mode=MODE_MIXED, gamma=0.0, masks=region)
    rp2.begin_run()
    o2 = run_call(rp2, roles=(True,))[("input", 1, 0)]
    grid = o2["index"][0].view(4, 6)
    assert (grid[:, :3] == 0).all()


def test_recorder_keeps_cond_rows_per_step_and_layer():
    rec = RoutingRecorder(2, ["a", "b"])
    rp, _ = make(recorder=rec)
    rp.begin_run(sigmas=torch.tensor([10.0, 5.0, 0.0]))
    run_call(rp, roles=(True, False), step=0)
    run_call(rp, roles=(False, True), step=1)
    rp.end_run(output=torch.ones(1, 4, 8, 12))
    run = rec.runs[-1]
    assert run.step_ids == [0, 1]
    assert run.layer_order == list(GRIDS)
    hw, idx, src = run.steps[1][("input", 1, 0)]
    assert hw == (4, 6) and idx.shape == (1, 24) and idx.dtype == torch.uint8 and idx.device.type == "cpu"
    assert (idx.view(4, 6)[:, :3] == 0).all()
    found, matched = rec.find_run(torch.ones(1, 4, 8, 12))
    assert found is run and matched
    assert rec.find_run(torch.zeros(1, 4, 8, 12))[1] is False


def test_attention_router_mode_routes_after_warmup_with_its_source():
    from anystory.attention_router import AttentionRouter
    from anystory.routing import MODE_ATTENTION, SOURCE_ATTENTION

    rec = RoutingRecorder(2)
    rp, _ = make(mode=MODE_ATTENTION, masks=False, gamma=0.0, recorder=rec,
                 attention_router=AttentionRouter(2, warmup_steps=1, threshold=0.2, smooth=1))
    rp.begin_run()
    first = run_call(rp, step=0, labels=[[1, 2], [5]])
    assert all((o["index"] == 2).all() for o in first.values())  # warm-up: background only
    second = run_call(rp, step=1, labels=[[1, 2], [5]], seed=2)
    idx = second[("input", 1, 0)]["index"][0]
    assert (idx < 2).any()  # the label attention of step 0 routes tokens to subjects at step 1
    assert (second[("input", 1, 0)]["index"][1] == 2).all()  # uncond row stays background
    rp.end_run()
    hw, ridx, src = rec.runs[-1].steps[1][("input", 1, 0)]
    assert (src == SOURCE_ATTENTION).all()


def test_a_run_the_attention_router_cannot_route_is_reported(caplog):
    """Issue 18 point 5: a 1-step sampling with the attention router never routes; the console and the run's
    record (read by the preview and the live map) say so. A 4-step sampling routes and says nothing."""
    import logging

    from anystory.attention_router import AttentionRouter
    from anystory.routing import MODE_ATTENTION

    rec = RoutingRecorder(2)
    rp, _ = make(mode=MODE_ATTENTION, masks=False, gamma=0.0, recorder=rec,
                 attention_router=AttentionRouter(2, threshold=0.2, smooth=1))
    with caplog.at_level(logging.WARNING, logger="anystory"):
        rp.begin_run(sigmas=torch.tensor([10.0, 0.0]))
    run_call(rp, step=0, labels=[[1, 2], [5]])
    rp.end_run()
    assert "1-step sampling is never routed" in rec.runs[-1].meta["warning"]
    assert any("1-step" in r.getMessage() for r in caplog.records)
    rp.begin_run(sigmas=torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0]))
    run_call(rp, step=0, labels=[[1, 2], [5]])
    second = run_call(rp, step=1, labels=[[1, 2], [5]], seed=2)
    rp.end_run()
    assert "warning" not in rec.runs[-1].meta
    assert (second[("input", 1, 0)]["index"][0] < 2).any()  # the default warm-up (0.1 of 4 steps) is over


def test_feathered_masks_fade_injection_at_edges():
    soft = torch.zeros(2, 8, 12)
    soft[0, :, :6] = torch.linspace(1.0, 0.6, 6)  # fades towards the middle of the image
    soft[1, :, 6:] = 1.0
    rp, _ = make(mode=MODE_MASKS, gamma=0.0, masks=soft, feather=True)
    rp.begin_run()
    o = run_call(rp, roles=(True,))[("input", 1, 0)]
    text = sdpa(o["q"], o["kt"], o["vt"], HEADS)
    kr, vr = rp.route_kv(LAYOUT.by_key(("input", 1, 0)), o["q"])
    full = sdpa(o["q"], kr[0:1], vr[0:1], HEADS)
    added = o["a2"] - text
    grid = o["index"][0].view(4, 6)
    assert (grid[:, :3] == 0).all()
    # token (0,0) lies where the mask is ~1 (full injection), token (0,2) where it is ~0.65 (faded)
    m = torch.nn.functional.interpolate(soft[:1, None], size=(4, 6), mode="area")[0, 0]
    for col in (0, 2):
        w = float((2 * m[0, col] - 1).clamp(0, 1))
        torch.testing.assert_close(added[0, col], w * full[0, col], atol=1e-5, rtol=1e-5)
    assert float(m[0, 2]) < 0.9


def test_mode_requirements():
    ad = random_adapter(LAYOUT, kind="ip-adapter-plus-sdxl", qformer_dim=64, clip_dim=48, depth=1)
    emb = ad.encode(torch.randn(1, 5, 48), torch.zeros(1, 5, 48))
    with pytest.raises(ValueError, match="needs the learned AnyStory router"):
        routing_for(MODE_ROUTER, ad, emb, 1)
    with pytest.raises(ValueError, match="needs region_masks"):
        make(mode=MODE_MASKS, masks=False)
    with pytest.raises(ValueError, match="needs a routing source"):
        RoutedPatch(ad, LAYOUT, RoutingInputs(emb.E, torch.ones(2), torch.ones(1)), None)


def test_direct_text_attention_equals_the_host_base():
    """attn2 with the text attention called directly (heads kept, merge fused with eq. 5's sum) gives what
    the host's attention + the routed term give; where no routed term is added, the host's base runs."""
    rp, _ = make(mode=MODE_MASKS, gamma=0.0)
    rp.begin_run()
    g = torch.Generator().manual_seed(5)
    state = CallState(chunks_from_roles([True, False], 1))
    calls = []
    text_sdpa = torch.nn.functional.scaled_dot_product_attention

    def base(q, k, v):
        calls.append(1)
        return sdpa(q, k, v, HEADS)

    for spec in LAYOUT:
        hw = GRIDS[spec.key]
        L = hw[0] * hw[1]
        q, n = torch.randn(2, L, C, generator=g), torch.randn(2, L, C, generator=g)
        kt, vt = torch.randn(2, 9, C, generator=g), torch.randn(2, 9, C, generator=g)
        rp.route(state, spec.key, n, hw)
        calls.clear()
        direct = rp.cross_attention(state, spec.key, q, kt, vt, HEADS, base, text_sdpa=text_sdpa, base_owned=True)
        assert not calls  # the host's attention was not needed
        hosted = rp.cross_attention(state, spec.key, q, kt, vt, HEADS, base)
        assert calls
        assert direct.shape == hosted.shape and direct.is_contiguous()
        torch.testing.assert_close(direct, hosted, atol=1e-5, rtol=1e-5)
    rp.run.eta_zero = True  # no routed term: the host's attention, untouched
    calls.clear()
    out = rp.cross_attention(state, ("input", 1, 0), q, kt, vt, HEADS, base, text_sdpa=text_sdpa)
    assert calls and torch.equal(out, sdpa(q, kt, vt, HEADS))


def test_base_output_is_changed_in_place_only_when_owned():
    """The routed term goes into the host's attention output in place only when the host says it owns it
    (a chained patch may hand out a tensor it keeps)."""
    rp, _ = make(mode=MODE_MASKS, gamma=0.0)
    rp.begin_run()
    g = torch.Generator().manual_seed(6)
    state = CallState(chunks_from_roles([True, False], 1))
    key, hw = ("input", 1, 0), GRIDS[("input", 1, 0)]
    q, n = torch.randn(2, 24, C, generator=g), torch.randn(2, 24, C, generator=g)
    kt, vt = torch.randn(2, 9, C, generator=g), torch.randn(2, 9, C, generator=g)
    rp.route(state, key, n, hw)
    kept = sdpa(q, kt, vt, HEADS)
    before = kept.clone()
    shared = rp.cross_attention(state, key, q, kt, vt, HEADS, lambda q, k, v: kept)
    assert torch.equal(kept, before) and shared is not kept
    owned = rp.cross_attention(state, key, q, kt, vt, HEADS, lambda q, k, v: kept, base_owned=True)
    assert owned is kept and not torch.equal(kept, before)
    torch.testing.assert_close(owned, shared)


def test_grad_enabled_sampling_backpropagates_through_reused_layers():
    """With autograd recording (a sampler run with grad enabled), neither the staging buffers reused across
    layers nor the fused/in-place sums may break the backward pass."""
    rp, _ = make(mode=MODE_MASKS)
    rp.begin_run()
    g = torch.Generator().manual_seed(7)
    state = CallState(chunks_from_roles([True, False], 1))
    loss = 0
    leaves = []
    for spec in LAYOUT:
        hw = GRIDS[spec.key]
        L = hw[0] * hw[1]
        q, k, v = (torch.randn(2, L, C, generator=g, requires_grad=True) for _ in range(3))
        kt, vt = torch.randn(2, 9, C, generator=g), torch.randn(2, 9, C, generator=g)
        leaves.append(q)
        a1 = rp.self_attention(state, spec.key, q, k, v, HEADS, hw, lambda q, k, v: sdpa(q, k, v, HEADS))
        rp.route(state, spec.key, torch.randn(2, L, C, generator=g), hw)
        a2 = rp.cross_attention(state, spec.key, q, kt, vt, HEADS, lambda q, k, v: sdpa(q, k, v, HEADS),
                                text_sdpa=torch.nn.functional.scaled_dot_product_attention, base_owned=True)
        loss = loss + a1.square().sum() + a2.square().sum()
    loss.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
