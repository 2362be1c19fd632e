"""Eq. 6-8 (routed reference attention) against a slow per-token reference written here."""
import math

import pytest
import torch

from anystory.paper.attention import sdpa
from anystory.paper.reference import (
    ReferenceFeatures,
    reference_bias,
    reference_token_mask,
    routed_reference_attention,
    routed_reference_attention_sparse,
)


def routed_reference_attention_fast(q, k, v, refs, index, heads, buffers=None):
    """The fast path of eq. 6-8 (anystory.fast.reference) for one call, eagerly: every row through the
    fused attention, the query extras from the route index."""
    from anystory.fast.grouped import GroupedBuffers, query_extra
    from anystory.fast.reference import reference_attention_body
    from anystory.paper.attention import sdpa as plain
    if refs is None:
        return plain(q, k, v, heads)
    qe = query_extra(index, refs.num_subjects, q.dtype)
    return reference_attention_body(q, k, v, refs, heads, qe, buffers or GroupedBuffers())(q, k, v)


def slow_eq6(q, k, v, k_ref, v_ref, index, heads, gamma):
    """For every query token u separately: softmax over [own keys; K̃_j of its subject j] with logit
    offset ln γ_j on the reference keys; background tokens use their own keys only."""
    b, L, C = q.shape
    d = C // heads
    N = k_ref.shape[0]
    gam = gamma if isinstance(gamma, (list, tuple)) else [gamma] * N
    out = torch.zeros(b, L, C, dtype=torch.float64)
    for bi in range(b):
        for u in range(L):
            j = int(index[bi, u])
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                qs = q[bi, u, sl].double()
                keys, vals, offs = [k[bi, :, sl].double()], [v[bi, :, sl].double()], [torch.zeros(L)]
                if j < N and gam[j] > 0:
                    keys.append(k_ref[j, :, sl].double())
                    vals.append(v_ref[j, :, sl].double())
                    offs.append(torch.full((k_ref.shape[1],), math.log(gam[j])))
                K, V, off = torch.cat(keys), torch.cat(vals), torch.cat(offs).double()
                w = (K @ qs / math.sqrt(d) + off).softmax(0)
                out[bi, u, sl] = w @ V
    return out


def _setup(b=2, L=12, C=16, heads=2, N=2, Lr=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, L, C, generator=g) for _ in range(3))
    k_ref = torch.randn(N, Lr, C, generator=g)
    v_ref = torch.randn(N, Lr, C, generator=g)
    index = torch.randint(0, N + 1, (b, L), generator=g)  # N = background
    return q, k, v, k_ref, v_ref, index, heads


@pytest.mark.parametrize("gamma", [1.0, 2.5, [0.5, 3.0], [0.0, 1.0]])
def test_dense_and_sparse_match_slow_reference(gamma):
    q, k, v, k_ref, v_ref, index, heads = _setup()
    ref = slow_eq6(q, k, v, k_ref, v_ref, index, heads, gamma)
    gam_t = torch.tensor(gamma) if isinstance(gamma, list) else gamma
    dense = routed_reference_attention(q, k, v, k_ref, v_ref, index, heads, gamma=gam_t)
    sparse = routed_reference_attention_sparse(q, k, v, k_ref, v_ref, index, heads, gamma=gam_t)
    torch.testing.assert_close(dense.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.double(), ref, atol=1e-5, rtol=1e-5)


def test_variable_reference_lengths_per_subject():
    """Subjects whose references keep different numbers of tokens (their masks differ)."""
    q, k, v, k_ref, v_ref, index, heads = _setup(seed=7)
    kl, vl = [k_ref[0, :3], k_ref[1]], [v_ref[0, :3], v_ref[1]]
    dense = routed_reference_attention(q, k, v, kl, vl, index, heads, gamma=1.5)
    sparse = routed_reference_attention_sparse(q, k, v, kl, vl, index, heads, gamma=1.5)
    # per route, the slow formula with that subject's (truncated) reference alone
    ref = torch.zeros_like(dense, dtype=torch.float64)
    for j in range(3):
        sel = index == j
        if j < 2:
            part = slow_eq6(q, k, v, kl[j].unsqueeze(0), vl[j].unsqueeze(0), torch.where(sel, 0, 1), heads, 1.5)
        else:
            part = slow_eq6(q, k, v, k_ref[:0], v_ref[:0], torch.zeros_like(index), heads, 1.5)
        ref[sel] = part[sel]
    torch.testing.assert_close(dense.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.double(), ref, atol=1e-5, rtol=1e-5)


def test_reference_features_valid_tokens():
    key = ("input", 4, 0)
    f = torch.randn(2, 6, 8)
    valid = torch.tensor([[1, 1, 0, 0, 1, 0], [1] * 6], dtype=torch.bool)
    rf = ReferenceFeatures({key: f}, {key: (2, 3)}, valid={key: valid})
    assert torch.equal(rf.subject_tokens(key, 0), f[0, [0, 1, 4]])
    assert rf.subject_tokens(key, 1).shape == (6, 8)
    rows, lengths = rf.valid_rows(key)  # the same tokens as row indices, for one gather of all subjects
    assert lengths == [3, 6]
    assert torch.equal(f.flatten(0, 1)[rows], torch.cat([rf.subject_tokens(key, 0), rf.subject_tokens(key, 1)]))
    both = rf.concat(ReferenceFeatures({key: torch.randn(1, 6, 8)}, {key: (2, 3)}))
    assert both.valid[key].shape == (3, 6) and both.valid[key][2].all()


def test_reference_token_mask_keeps_any_coverage_as_the_authors_code():
    """A reference token is the subject's when any of its pixels is (pooled coverage > 0), as the authors'
    ``adaptive_avg_pool2d(mask, (s, s)) > 0`` (junjiehe96/AnyStory, generate.py ``encode_ref_condition``);
    the old rule (coverage > 0.5) dropped the subject's edge."""
    mask = torch.zeros(1, 8, 8)
    mask[0, 0:4, 0:4] = 1.0      # token (0, 0) of a 2×2 grid: fully covered
    mask[0, 4:5, 0:1] = 1.0      # token (1, 0): 1/16 covered
    mask[0, 0:2, 4:8] = 1.0      # token (0, 1): half covered (exactly 0.5: dropped by "> 0.5")
    got = reference_token_mask(mask, (2, 2))
    assert got.tolist() == [True, True, True, False]
    authors = (torch.nn.functional.adaptive_avg_pool2d(mask[:, None], (2, 2)) > 0).flatten()
    assert torch.equal(got, authors)
    g = torch.Generator().manual_seed(0)
    soft = (torch.rand(3, 64, 64, generator=g) > 0.97).float() * torch.rand(3, 64, 64, generator=g)
    for hw in ((8, 8), (16, 16), (4, 4)):  # any grid, soft masks, several views
        authors = (torch.nn.functional.adaptive_avg_pool2d(soft[:, None], hw) > 0).flatten()
        assert torch.equal(reference_token_mask(soft, hw), authors)
    assert reference_token_mask(torch.zeros(1, 8, 8), (2, 2)).all()  # no subject pixel: every token


def test_gamma_zero_is_unpatched_bit_for_bit():
    q, k, v, k_ref, v_ref, index, heads = _setup(seed=1)
    plain = sdpa(q, k, v, heads)
    assert torch.equal(routed_reference_attention(q, k, v, k_ref, v_ref, index, heads, gamma=0.0), plain)
    assert torch.equal(routed_reference_attention_sparse(q, k, v, k_ref, v_ref, index, heads, gamma=0.0), plain)


def test_background_tokens_equal_plain_attention():
    q, k, v, k_ref, v_ref, index, heads = _setup(seed=2)
    out = routed_reference_attention(q, k, v, k_ref, v_ref, index, heads, gamma=2.0)
    plain = sdpa(q, k, v, heads)
    bg = index == k_ref.shape[0]
    assert bg.any()
    torch.testing.assert_close(out[bg], plain[bg], atol=1e-6, rtol=1e-6)


def test_subject_tokens_see_only_their_own_reference():
    """Changing subject 1's reference changes only the tokens routed to subject 1."""
    q, k, v, k_ref, v_ref, index, heads = _setup(seed=3)
    a = routed_reference_attention(q, k, v, k_ref, v_ref, index, heads)
    k2, v2 = k_ref.clone(), v_ref.clone()
    k2[1] = torch.randn_like(k2[1])
    v2[1] = torch.randn_like(v2[1])
    b = routed_reference_attention(q, k, v, k2, v2, index, heads)
    torch.testing.assert_close(a[index != 1], b[index != 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[index == 1], b[index == 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_dtype_follows_q(dtype):
    q, k, v, k_ref, v_ref, index, heads = _setup(seed=4)
    bias = reference_bias(index, [5, 5], 12, 1.0, dtype)
    assert bias.dtype == dtype and bias.shape == (2, 1, 12, 22)
    out = routed_reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), k_ref.to(dtype), v_ref.to(dtype),
                                     index, heads)
    ref = slow_eq6(q, k, v, k_ref, v_ref, index, heads, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def test_every_row_keeps_its_self_columns():
    index = torch.tensor([[0, 1, 2, 2]])
    bias = reference_bias(index, [3, 3], 4, 1.0, torch.float32)
    assert (bias[0, 0, :, :4] == 0).all()
    assert (bias[0, 0, 2:, 4:] < -1e3).all()  # background rows see no reference


def test_reference_features_concat_and_select():
    a = ReferenceFeatures({("input", 4, 0): torch.randn(1, 6, 8)}, {("input", 4, 0): (2, 3)})
    b = ReferenceFeatures({("input", 4, 0): torch.randn(2, 6, 8)}, {("input", 4, 0): (2, 3)})
    c = a.concat(b)
    assert c.num_subjects == 3
    assert torch.equal(c.features[("input", 4, 0)][1:], b.features[("input", 4, 0)])
    assert torch.equal(c.select([0]).features[("input", 4, 0)], a.features[("input", 4, 0)])
    with pytest.raises(ValueError, match="same reference size"):
        a.concat(ReferenceFeatures({("input", 4, 0): torch.randn(1, 7, 8)}))


@pytest.mark.parametrize("gamma", [1.0, [0.5, 3.0], [0.0, 2.0]])
def test_grouped_fast_path_equals_slow_reference(gamma):
    """The extra-dimension formulation (no bias tensor) gives eq. 6-8."""
    from anystory.fast.reference import prepare_references
    q, k, v, k_ref, v_ref, index, heads = _setup(seed=11)
    kl, vl = [k_ref[0, :3], k_ref[1]], [v_ref[0, :3], v_ref[1]]
    g = torch.tensor(gamma) if isinstance(gamma, list) else gamma
    prep = prepare_references(kl, vl, heads, g)
    fast = routed_reference_attention_fast(q, k, v, prep, index, heads)
    dense = routed_reference_attention(q, k, v, kl, vl, index, heads, gamma=g)
    # the ±M of the extra dims cancel in fp32 up to ~1e-4 of a logit
    torch.testing.assert_close(fast, dense, atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_fast_path_low_precision(dtype):
    from anystory.fast.reference import prepare_references
    q, k, v, k_ref, v_ref, index, heads = _setup(seed=12, C=128, heads=2)  # 64-d heads as SDXL
    prep = prepare_references(k_ref.to(dtype), v_ref.to(dtype), heads, torch.tensor([1.5, 0.7]))
    fast = routed_reference_attention_fast(q.to(dtype), k.to(dtype), v.to(dtype), prep, index, heads)
    ref = slow_eq6(q, k, v, k_ref, v_ref, index, heads, [1.5, 0.7])
    torch.testing.assert_close(fast.double(), ref, atol=3e-2, rtol=3e-2)


def test_buffered_fast_path_equals_unbuffered_across_shapes_and_routes():
    """Staging buffers are reused between calls: results must not depend on what was staged before."""
    from anystory.fast.grouped import GroupedBuffers
    from anystory.fast.reference import prepare_references
    bufs = GroupedBuffers()
    for seed in (1, 2, 3):
        q, k, v, k_ref, v_ref, index, heads = _setup(seed=seed, L=12 if seed != 2 else 20)
        prep = prepare_references(k_ref, v_ref, heads, 1.3)
        a = routed_reference_attention_fast(q, k, v, prep, index, heads, buffers=bufs)
        b = routed_reference_attention_fast(q, k, v, prep, index, heads)
        assert torch.equal(a, b)


def test_pinned_staging_hands_out_the_buffer_prepared_after_the_previous_take():
    """Each take of a size returns the buffer allocated in the background after the previous take (the
    slow page-locking is off the encode's path from the second subject on); distinct buffers every time;
    spares kept for the most recent sizes only; a failed background allocation falls back to one now."""
    import threading

    from anystory.fast.transfer import PinnedStaging
    calls = []

    def alloc(numel, dtype):
        calls.append((numel, threading.current_thread().name))
        return torch.zeros(numel, dtype=dtype)

    st = PinnedStaging(keep_sizes=2, alloc=alloc)
    a = st.take(10, torch.float16)
    assert calls[0] == (10, threading.current_thread().name)  # nothing prepared yet: allocated here
    b = st.take(10, torch.float16)
    st._pending[(10, torch.float16)].result()  # the next one is being prepared
    assert len(calls) == 3 and calls[1][1].startswith("anystory-pinned")  # b was prepared in the background
    assert all(name.startswith("anystory-pinned") for _, name in calls[1:])
    assert a.data_ptr() != b.data_ptr() and b.numel() == 10 and b.dtype == torch.float16
    st.take(20, torch.float16)
    st.take(30, torch.float16)
    assert [k[0] for k in st._pending] == [20, 30]  # the spare of size 10 was let go

    def broken(numel, dtype):
        if threading.current_thread().name.startswith("anystory-pinned"):
            raise RuntimeError("out of page-locked memory")
        return torch.zeros(numel, dtype=dtype)

    st2 = PinnedStaging(alloc=broken)
    st2.take(4, torch.float32)
    assert st2.take(4, torch.float32).numel() == 4


def test_move_together_lands_in_the_staging_buffer():
    """To the CPU with a staging: all tensors are views of one buffer taken from it, with their values
    (the page-locked path itself needs a GPU; on the CPU the staging is not used)."""
    from anystory.fast.transfer import PinnedStaging, move_together
    taken = []
    st = PinnedStaging(alloc=lambda n, dt: taken.append(n) or torch.zeros(n, dtype=dt))
    xs = [torch.randn(2, 3), torch.randn(4)]
    out = move_together(xs, "cpu", copy=True, staging=st)
    assert taken == [] and all(torch.equal(o, x) for o, x in zip(out, xs))  # CPU → CPU: a plain copy
    assert out[0].data_ptr() != xs[0].data_ptr()
    if torch.cuda.is_available():
        def refused(n, dt):
            raise RuntimeError("CUDA error: out of memory (page-locked)")
        out = move_together([x.cuda() for x in xs], "cpu", staging=PinnedStaging(alloc=refused))
        assert all(torch.equal(o, x) for o, x in zip(out, xs))  # pageable instead
        st = PinnedStaging()
        out = move_together([x.cuda() for x in xs], "cpu", staging=st)
        assert all(torch.equal(o, x) for o, x in zip(out, xs)) and out[0].is_pinned()
        assert out[0]._base is out[1]._base
