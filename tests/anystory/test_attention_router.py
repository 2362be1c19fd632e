"""The training-free attention router: label positions, label attention, planted-region recovery."""
import math

import torch

from anystory.attention_router import AttentionRouter, find_label_positions, label_attention
from anystory.patch import CallState, chunks_from_roles


def test_find_label_positions():
    chunks = [[49406, 1, 2, 3, 7, 8, 49407], [49406, 7, 8, 9, 49407]]
    assert find_label_positions(chunks, [7, 8], chunk_len=7) == [4, 5, 8, 9]
    # a label cut by the chunk border
    assert find_label_positions([[0, 5, 6], [7, 0]], [6, 7], chunk_len=3) == [2, 3]
    # stop words ("the") are dropped unless the label is only stop words
    assert find_label_positions([[0, 11, 12, 13]], [11, 12], chunk_len=4, stop_ids={11}) == [2]
    assert find_label_positions([[0, 11, 13]], [11], chunk_len=3, stop_ids={11}) == [1]
    assert find_label_positions([[0, 1, 2]], [5], chunk_len=3) == []


def test_label_attention_matches_slow_formula():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    out = label_attention(q, k, 2, [[1, 3], [4]])
    ref = torch.zeros(2, 2, 6)
    for b in range(2):
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            p = (q[b, :, sl] @ k[b, :, sl].T / math.sqrt(4)).softmax(-1)
            ref[b, 0] += (p[:, 1] + p[:, 3]) / 2
            ref[b, 1] += p[:, 4] / 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _planted(hw=(8, 8), T=10, C=16, seed=0):
    """Text keys; queries in the left block attend to token 2 ('fox'), right block to token 6 ('robot')."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, T, C, generator=g)
    h, w = hw
    q = 0.3 * torch.randn(1, h * w, C, generator=g)
    truth = torch.full((h, w), 2)
    truth[1:7, 0:3] = 0
    truth[2:8, 5:8] = 1
    t = truth.flatten()
    q[0, t == 0] += 3.0 * k[0, 2]
    q[0, t == 1] += 3.0 * k[0, 6]
    return q, k, truth


def _state(step, labels):
    st = CallState(chunks_from_roles([True, False], 1), step=step)
    st.labels = [labels, None]
    return st


def test_recovers_planted_regions_after_warmup():
    q, k, truth = _planted()
    hw = (8, 8)
    qq, kk = torch.cat([q, torch.randn_like(q)]), torch.cat([k, torch.randn_like(k)])  # + an uncond row
    router = AttentionRouter(2, warmup_steps=1, threshold=0.3, smooth=1)
    labels = [[2], [6]]
    for step in range(3):
        st = _state(step, labels)
        route = router.route(None, hw, 1, "cpu", st)
        if step < 1:
            assert route is None  # warm-up: background everywhere
        elif step == 1:
            assert route is not None
            got = route.view(8, 8)
            for i in range(3):
                inter = ((got == i) & (truth == i)).sum().item()
                union = ((got == i) | (truth == i)).sum().item()
                assert inter / union > 0.9, (i, got, truth)
        for key in (("input", 4, 0), ("middle", 0, 0)):
            st.layer_hw[key] = hw
            router.observe(st, key, qq, kk, 2)


def test_maps_carry_per_image_and_reset_per_run():
    q, k, truth = _planted()
    router = AttentionRouter(2, warmup_steps=0, smooth=1)
    st = _state(0, [[2], [6]])
    st.layer_hw["k"] = (8, 8)
    router.observe(st, "k", torch.cat([q, q]), torch.cat([k, k]), 2)
    assert router.route(None, (4, 4), 1, "cpu", _state(1, [[2], [6]])).shape == (1, 16)
    assert router.maps().shape == (1, 2, 8, 8)
    router.begin_run()
    assert router.maps() is None


def _observe_planted(router, step, q, k):
    st = _state(step, [[2], [6]])
    st.layer_hw["k"] = (8, 8)
    router.observe(st, "k", q, k, 2)


def test_warmup_is_a_share_of_the_steps_so_few_step_models_route():
    """Issue 18 point 5: the warm-up scales with the schedule. 20 steps: 2 (as the fixed 2 steps before);
    a 2-step sampling (Lightning / Turbo / LCM) routes at its second step — the fixed 2 steps never did."""
    router = AttentionRouter(2, smooth=1)
    assert [router.warmup_for(n) for n in (20, 30, 8, 4, 2, 1)] == [2, 3, 1, 0, 0, 0]
    assert router.first_routed_step(2) == 1 and router.run_warning(2) is None
    q, k, _ = _planted()
    router.begin_run(steps=2)
    st0 = _state(0, [[2], [6]])
    st0.steps = 2
    assert router.route(None, (8, 8), 1, "cpu", st0) is None  # step 0: no previous step's maps yet
    _observe_planted(router, 0, q, k)
    st1 = _state(1, [[2], [6]])
    st1.steps = 2
    route = router.route(None, (8, 8), 1, "cpu", st1)
    assert route is not None and (route < 2).any()
    fixed = AttentionRouter(2, warmup_steps=2, smooth=1)  # what old workflows stored: a number of steps
    fixed.begin_run(steps=2)
    _observe_planted(fixed, 0, q, k)
    assert fixed.route(None, (8, 8), 1, "cpu", st1) is None


def test_a_run_that_cannot_route_says_why():
    assert "1-step" in AttentionRouter(2).run_warning(1)
    w = AttentionRouter(2, warmup=0.9).run_warning(4)
    assert "never starts" in w and "region_warmup" in w and "step 5 of a 4-step" in w
    assert AttentionRouter(2, warmup=0.6).run_warning(20) is None
    assert AttentionRouter(2).run_warning(None) is None  # length unknown: nothing to say
