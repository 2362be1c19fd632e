"""Eq. 5 (routed decoupled cross-attention) against a plain, slow reference written here."""
import pytest
import torch

from anystory.paper.attention import sdpa
from anystory.paper.injection import (
    DecoupledKV,
    project_routes,
    route_bias,
    routed_cross_attention,
    routed_cross_attention_sum,
)


def slow_attention(q, k, v, heads):
    """softmax(QKᵀ/√d)V per head, in float64, with explicit loops over heads."""
    b, L, C = q.shape
    d = C // heads
    out = torch.zeros(b, L, C, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = (q[..., sl].double() @ k[..., sl].double().transpose(1, 2)) / d ** 0.5
        out[..., sl] = w.softmax(-1) @ v[..., sl].double()
    return out


def slow_eq5_routed_term(q, k_routes, v_routes, maps, heads, eta):
    """η · Σ_i M_i ⊙ Attn(Q, K_i, V_i) literally: one attention per route, weighted per token."""
    b = q.shape[0]
    total = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(k_routes.shape[0]):
        ki = k_routes[i].unsqueeze(0).expand(b, -1, -1)
        vi = v_routes[i].unsqueeze(0).expand(b, -1, -1)
        e = eta[i] if isinstance(eta, (list, tuple)) else eta
        total += e * maps[:, i].unsqueeze(-1).double() * slow_attention(q, ki, vi, heads)
    return total


def _setup(b=2, L=24, C=32, heads=4, K=3, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, L, C, generator=g)
    kr = torch.randn(K, m, C, generator=g)
    vr = torch.randn(K, m, C, generator=g)
    index = torch.randint(0, K, (b, L), generator=g)
    return q, kr, vr, index, heads


def test_one_biased_attention_equals_sum_over_routes():
    q, kr, vr, index, heads = _setup()
    maps = torch.nn.functional.one_hot(index, 3).transpose(1, 2).float()
    fast = routed_cross_attention(q, kr, vr, index, heads, eta=0.7)
    ref = slow_eq5_routed_term(q, kr, vr, maps, heads, 0.7)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)


def test_sum_form_matches_reference_with_soft_maps():
    q, kr, vr, index, heads = _setup(seed=1)
    maps = torch.randn(2, 3, q.shape[1]).softmax(1)
    out = routed_cross_attention_sum(q, kr, vr, maps, heads, eta=1.3)
    ref = slow_eq5_routed_term(q, kr, vr, maps, heads, 1.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_per_route_eta():
    q, kr, vr, index, heads = _setup(seed=2)
    eta = torch.tensor([0.5, 2.0, 1.0])
    maps = torch.nn.functional.one_hot(index, 3).transpose(1, 2).float()
    ref = slow_eq5_routed_term(q, kr, vr, maps, heads, [0.5, 2.0, 1.0])
    torch.testing.assert_close(routed_cross_attention(q, kr, vr, index, heads, eta=eta).double(), ref,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed_cross_attention_sum(q, kr, vr, maps, heads, eta=eta).double(), ref,
                               atol=1e-5, rtol=1e-5)


def test_tokens_routed_elsewhere_get_exactly_their_own_route():
    """A token routed to route j receives exactly Attn(Q, K_j, V_j): changing another route's tokens
    leaves it bit-for-bit unchanged."""
    q, kr, vr, index, heads = _setup(seed=3)
    out1 = routed_cross_attention(q, kr, vr, index, heads)
    kr2, vr2 = kr.clone(), vr.clone()
    kr2[1] += 5 * torch.randn_like(kr2[1])
    vr2[1] += 5 * torch.randn_like(vr2[1])
    out2 = routed_cross_attention(q, kr2, vr2, index, heads)
    not1 = index != 1
    assert torch.equal(out1[not1], out2[not1])
    assert not torch.allclose(out1[index == 1], out2[index == 1])


def test_eta_zero_adds_nothing():
    q, kr, vr, index, heads = _setup(seed=4)
    assert torch.count_nonzero(routed_cross_attention(q, kr, vr, index, heads, eta=0.0)) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_bias_is_exact_mask(dtype):
    """The finite NEG bias in fp16/bf16 excludes other routes exactly (no leakage)."""
    q, kr, vr, index, heads = _setup(seed=5)
    index[:] = 0
    out = routed_cross_attention(q.to(dtype), kr.to(dtype), vr.to(dtype), index, heads)
    only0 = sdpa(q.to(dtype), kr[0:1].expand(2, -1, -1).to(dtype), vr[0:1].expand(2, -1, -1).to(dtype), heads)
    torch.testing.assert_close(out.float(), only0.float(), atol=2e-2, rtol=2e-2)


def test_route_bias_layout():
    index = torch.tensor([[0, 2, 1]])
    bias = route_bias(index, tokens_per_route=2, num_routes=3, dtype=torch.float32)
    assert bias.shape == (1, 1, 3, 6)
    allowed = bias[0, 0] == 0
    assert allowed.tolist() == [[True, True, False, False, False, False],
                                [False, False, False, False, True, True],
                                [False, False, True, True, False, False]]


def test_project_routes_uses_layer_weights():
    layer = DecoupledKV(16, route_dim=8)
    E = torch.randn(3, 4, 8)
    k, v = project_routes(layer, E)
    torch.testing.assert_close(k, E @ layer.to_k_ip.weight.T)
    torch.testing.assert_close(v, E @ layer.to_v_ip.weight.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_fast_path_equals_eq5(dtype):
    from anystory.fast.injection import prepare_routes, routed_cross_attention_fast
    q, kr, vr, index, heads = _setup(C=128, heads=2, seed=9)
    maps = torch.nn.functional.one_hot(index, 3).transpose(1, 2).float()
    eta = torch.tensor([0.5, 2.0, 1.0])
    ref = slow_eq5_routed_term(q, kr, vr, maps, heads, [0.5, 2.0, 1.0])
    fast = routed_cross_attention_fast(q.to(dtype), prepare_routes(kr.to(dtype), vr.to(dtype), heads), index, heads, eta)
    tol = 5e-4 if dtype == torch.float32 else 3e-2  # ±M of the extra dims cancel to ~1e-4 in fp32
    torch.testing.assert_close(fast.double(), ref, atol=tol, rtol=tol)


def test_eta_folded_into_values_and_buffers():
    from anystory.fast.grouped import GroupedBuffers
    from anystory.fast.injection import prepare_routes, routed_cross_attention_fast
    q, kr, vr, index, heads = _setup(seed=13)
    eta = torch.tensor([0.5, 2.0, 0.0])
    ref = routed_cross_attention(q, kr, vr, index, heads, eta)
    bufs = GroupedBuffers()
    for _ in range(2):
        fast = routed_cross_attention_fast(q, prepare_routes(kr, vr, heads, eta=eta), index, heads, 1.0, buffers=bufs)
        torch.testing.assert_close(fast, ref, atol=5e-4, rtol=5e-4)
    assert torch.count_nonzero(fast[index == 2]) == 0
