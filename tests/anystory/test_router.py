"""§1.2 routing: coarse map, masked refinement, refined maps, one-hot / Gumbel, resize."""
import math

import pytest
import torch

from anystory.fast.router import fold_router, route_logits
from anystory.fast.router import route as fast_route
from anystory.paper.attention import NEG
from anystory.paper.router import (
    LayerRouter,
    coarse_attention_bias,
    gumbel_maps,
    one_hot_maps,
    resize_index,
    route_index,
    routing_loss,
    soft_maps,
)


def slow_router(r: LayerRouter, z, R):
    """The router's three steps written out per route and per token, in float64."""
    B, L, C = z.shape
    K = R.shape[1]
    D = r.router_dim
    P = lambda lin, x: x.double() @ lin.weight.double().T + (lin.bias.double() if lin.bias is not None else 0)
    zp = P(r.proj_z, z)
    coarse = torch.einsum("bkd,bld->bkl", P(r.proj_r, R), zp) / math.sqrt(D)
    owner = coarse.argmax(1)  # [B, L]
    rn = torch.nn.functional.layer_norm(R.double(), (R.shape[-1],), r.refine_norm.weight.double(),
                                        r.refine_norm.bias.double(), r.refine_norm.eps)
    q = P(r.refine_q, rn)
    k = P(r.refine_k, z)
    v = P(r.refine_v, z)
    H = r.heads
    d = D // H
    upd = torch.zeros(B, K, D, dtype=torch.float64)
    for b in range(B):
        for i in range(K):
            allowed = owner[b] == i
            if not allowed.any():
                allowed = torch.ones(L, dtype=torch.bool)
            for h in range(H):
                sl = slice(h * d, (h + 1) * d)
                w = (k[b][allowed][:, sl] @ q[b, i, sl]) / math.sqrt(d)
                upd[b, i, sl] = w.softmax(0) @ v[b][allowed][:, sl]
    R_new = R.double() + P(r.refine_out, upd)
    refined = torch.einsum("bkd,bld->bkl", P(r.proj_r, R_new), zp) / math.sqrt(D)
    return refined, coarse


def test_router_matches_slow_reference():
    torch.manual_seed(0)
    r = LayerRouter(dim=24, route_dim=16, router_dim=32, heads=4)
    z = torch.randn(2, 30, 24)
    R = torch.randn(2, 3, 16)
    refined, coarse = r(z, R, return_coarse=True)
    ref_refined, ref_coarse = slow_router(r, z, R)
    torch.testing.assert_close(coarse.double(), ref_coarse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(refined.double(), ref_refined, atol=1e-4, rtol=1e-4)
    assert refined.dtype == torch.float32 and refined.shape == (2, 3, 30)


def test_refinement_sees_only_the_routes_own_tokens():
    """Route 1's refined feature depends only on the tokens its coarse map gives it.

    The projections are set so that the coarse owner of a token is decided by the sign of its first
    feature (route 0 if > 0) and the map projections only read that feature; changing the other
    features of route-0 tokens then changes route 0's refined logits but not route 1's."""
    torch.manual_seed(1)
    r = LayerRouter(dim=8, route_dim=8, router_dim=8, heads=1)
    with torch.no_grad():
        r.proj_z.weight.zero_(); r.proj_z.bias.zero_(); r.proj_z.weight[0, 0] = 1.0
        r.proj_r.weight.zero_(); r.proj_r.bias.zero_(); r.proj_r.weight[0, 0] = 1.0
    z = torch.randn(1, 20, 8)
    z[0, :10, 0] = z[0, :10, 0].abs() + 0.1   # tokens 0-9 → route 0
    z[0, 10:, 0] = -z[0, 10:, 0].abs() - 0.1  # tokens 10-19 → route 1
    R = torch.zeros(1, 2, 8)
    R[0, 0, 0], R[0, 1, 0] = 1.0, -1.0
    refined, coarse = r(z, R, return_coarse=True)
    assert coarse.argmax(1)[0].tolist() == [0] * 10 + [1] * 10
    z2 = z.clone()
    z2[0, :10, 1:] = torch.randn(10, 7)  # change route-0 tokens, ownership unchanged
    refined2, coarse2 = r(z2, R, return_coarse=True)
    assert torch.equal(coarse2.argmax(1), coarse.argmax(1))
    assert torch.equal(refined2[0, 1], refined[0, 1])
    assert not torch.allclose(refined2[0, 0], refined[0, 0])


def test_coarse_bias_never_masks_a_whole_row():
    logits = torch.tensor([[[5.0, 5.0, 5.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]])  # route 0 owns all
    bias = coarse_attention_bias(logits)
    assert (bias[0, 0] == 0).all()
    assert (bias[0, 1] == 0).all() and (bias[0, 2] == 0).all()  # empty routes see everything
    logits2 = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])
    b2 = coarse_attention_bias(logits2)
    assert b2[0].tolist() == [[0.0, NEG], [NEG, 0.0]]


def test_maps_one_hot_soft_gumbel():
    logits = torch.randn(2, 3, 10)
    idx = route_index(logits)
    oh = one_hot_maps(idx, 3)
    assert torch.equal(oh.sum(1), torch.ones(2, 10))
    assert torch.equal(oh.argmax(1), logits.argmax(1))
    sm = soft_maps(logits)
    torch.testing.assert_close(sm.sum(1), torch.ones(2, 10))
    logits.requires_grad_(True)
    g = gumbel_maps(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    (g * torch.randn_like(g)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_with_confident_logits_is_argmax():
    logits = torch.zeros(1, 3, 50)
    logits[0, 2] = 100.0
    assert (gumbel_maps(logits).argmax(1) == 2).all()


def test_routing_loss():
    target = one_hot_maps(torch.tensor([[0, 1, 2, 2]]), 3)
    assert routing_loss(target, target, 2).item() == 0.0
    wrong = one_hot_maps(torch.tensor([[1, 0, 2, 2]]), 3)
    # each subject map differs at 2 of 4 tokens → ‖·‖² = 2 per subject → (2+2)/2 (eq. 4); mean: ‖·‖²/L = 0.5
    assert abs(routing_loss(wrong, target, 2).item() - 2.0) < 1e-6
    assert abs(routing_loss(wrong, target, 2, reduction="mean").item() - 0.5) < 1e-6
    with pytest.raises(ValueError, match="reduction"):
        routing_loss(wrong, target, 2, reduction="max")


def test_routing_loss_is_eq4_written_out():
    """Eq. 4 by hand on soft maps: (1/N) Σ_i Σ_u (M_i[u] − M_i^gt[u])², per sample, averaged over the batch;
    λ = 0.1 is the trainer's. The "mean" option is exactly the sum / (h·w)."""
    g = torch.Generator().manual_seed(3)
    B, N, h, w = 2, 3, 4, 5
    maps = torch.rand(B, N + 1, h * w, generator=g, dtype=torch.float64).softmax(1)
    target = one_hot_maps(torch.randint(0, N + 1, (B, h * w), generator=g), N + 1, torch.float64)
    by_hand = 0.0
    for b in range(B):
        per_sample = 0.0
        for i in range(N):  # subject routes only: the background (last) route is not in eq. 4
            per_sample += sum((float(maps[b, i, u]) - float(target[b, i, u])) ** 2 for u in range(h * w))
        by_hand += per_sample / N
    by_hand /= B
    got = routing_loss(maps, target, N)
    assert abs(got.item() - by_hand) < 1e-6
    assert abs(0.1 * got.item() - 0.1 * by_hand) < 1e-7  # λ·L_route with the paper's λ
    torch.testing.assert_close(routing_loss(maps, target, N, reduction="mean"), got / (h * w))


def test_resize_index_nearest():
    idx = torch.tensor([[0, 1, 2, 3]])  # 2x2 grid
    up = resize_index(idx, (2, 2), (4, 4)).view(4, 4)
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    odd = resize_index(torch.arange(6).view(1, 6) % 3, (2, 3), (3, 5))
    assert odd.shape == (1, 15) and set(odd.unique().tolist()) <= {0, 1, 2}
    assert resize_index(idx, (2, 2), (2, 2)) is idx


def test_prepared_route_equals_forward_argmax():
    torch.manual_seed(3)
    r = LayerRouter(dim=24, route_dim=16, router_dim=32, heads=4)
    z = torch.randn(2, 30, 24)
    R = torch.randn(1, 3, 16)
    want = r(z, R.expand(2, -1, -1)).argmax(1)
    assert torch.equal(fast_route(r, z, fold_router(r, R)), want)


def test_folded_route_logits_equal_forward():
    """route_logits (the projections folded into R-dependent matrices) is forward()'s refined map, for a
    batch of latents sharing one R."""
    torch.manual_seed(4)
    r = LayerRouter(dim=40, route_dim=24, router_dim=32, heads=4)
    z = torch.randn(3, 50, 40)
    R = torch.randn(1, 4, 24)
    want = r(z, R.expand(3, -1, -1))
    got = route_logits(r, z, fold_router(r, R))
    assert got.shape == (3, 4, 50)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one image"):  # per-image R would be merged silently
        fold_router(r, R.expand(2, -1, -1))


def test_folded_route_lets_a_route_without_tokens_see_all_tokens():
    """A route that the coarse map gives no token attends to every token (not to none, not uniformly):
    the folded path agrees with forward() and with the float64 reference in that case."""
    torch.manual_seed(5)
    r = LayerRouter(dim=8, route_dim=6, router_dim=8, heads=2)
    with torch.no_grad():
        r.proj_r.weight.zero_()
        r.proj_r.bias.zero_()
        r.proj_r.weight[0, 0] = 1.0   # the map reads feature 0 of R and of z only
        r.proj_z.weight.zero_()
        r.proj_z.bias.zero_()
        r.proj_z.weight[0, 0] = 1.0
    z = torch.randn(1, 20, 8)
    z[..., 0] = z[..., 0].abs() + 0.5       # every token has z_0 > 0
    R = torch.randn(1, 3, 6)
    R[0, :, 0] = torch.tensor([2.0, 1.0, -1.0])  # route 0 owns every token; routes 1 and 2 own none
    _, coarse = r(z, R, return_coarse=True)
    assert (coarse.argmax(1) == 0).all()
    got = route_logits(r, z, fold_router(r, R))
    want, _ = slow_router(r, z, R)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # with the empty routes' rows fully masked instead, the routes' refined features would differ
    masked = coarse_attention_bias(coarse)
    assert (masked[0, 1] == 0).all() and (masked[0, 2] == 0).all()
