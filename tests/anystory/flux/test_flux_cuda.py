"""The CUDA kernels of the FLUX fast path (skipped without CUDA; run on the GPU machine): every kernel that
``attention_lse`` may pick gives the math form's output and log-sum-exp, on views as the blocks pass them, and the
key-group attention equals the authors' dense bias in bf16."""
import pytest
import torch

from anystory.flux import fast
from anystory.flux.routing import TokenLayout, attention_bias

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: the GPU kernels of attention_lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_attention_lse_kernels_agree(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 300, 128, device="cuda", dtype=dtype, generator=g)
    kv = torch.randn(2, 1, 4, 520, 128, device="cuda", dtype=dtype, generator=g)
    k, v = kv[0][:, :, 20:], kv[1][:, :, 20:]  # views with an offset, as the shared keys are
    want, want_lse = fast._math(q.float(), k.float(), v.float())
    worked = []
    for kernel in fast._ORDER["cuda"]:
        try:
            out, lse = kernel(q, k, v)
        except (RuntimeError, NotImplementedError):
            continue
        worked.append(kernel.__name__)
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse.reshape(1, 4, -1)[..., :300].float(), want_lse, atol=2e-2, rtol=1e-2)
    assert "_math" in worked and len(worked) >= 2, worked
    out, lse = fast.attention_lse(q, k, v)
    torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=1e-2)


def test_cuda_key_groups_equal_the_dense_bias():
    g = torch.Generator(device="cuda").manual_seed(1)
    n, P, R, img, Lr, H, D = 2, 40, 9, 256, 32, 4, 128
    lay = TokenLayout(prompt=P, redux=n * R, image=img, ref=n * Lr, num_conds=n)
    q, k, v = (torch.randn(1, H, m, D, device="cuda", dtype=torch.bfloat16, generator=g)
               for m in (lay.queries, lay.keys, lay.keys))
    rmap = torch.zeros(1, n, img, device="cuda").scatter_(1, torch.randint(0, n, (1, 1, img), device="cuda",
                                                                         generator=g), 1.0)
    bias = attention_bias(lay, 1, torch.bfloat16, "cuda", None, 0.5, rmap)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
    order = torch.cat([torch.arange(P, P + n * R), torch.arange(P), torch.arange(lay.text, lay.queries)]).cuda()
    refs = {j: (k[:, :, lay.queries + j * Lr:lay.queries + (j + 1) * Lr].contiguous(),
                v[:, :, lay.queries + j * Lr:lay.queries + (j + 1) * Lr].contiguous()) for j in range(n)}
    plan = fast.KeyPlan([0] * R + [1] * R, P, img, [0, 1], [0.5, 0.5], n, routed=True)
    log_w = fast.subject_log_weights(lay.text, img, n, 1, "cuda", rmap)
    got = fast.joint_attention(q[:, :, order], k[:, :, order], v[:, :, order], plan, refs, log_w)
    got = got[:, torch.argsort(order)]
    assert (got.float() - want.float()).abs().max().item() < 3e-2
    # a routing map ignored would differ by far more
    wrong = fast.joint_attention(q[:, :, order], k[:, :, order], v[:, :, order], plan, refs, None)
    assert (wrong[:, torch.argsort(order)].float() - want.float()).abs().max().item() > 0.1


def test_cuda_key_groups_with_a_batch_equal_each_row_alone():
    """b = 2 (a CFG batch): the subjects' reference keys (batch 1) serve both rows; each row as it is alone."""
    g = torch.Generator(device="cuda").manual_seed(2)
    n, P, R, img, Lr, H, D = 2, 40, 9, 256, 32, 4, 128
    T = P + n * R
    q, k, v = (torch.randn(2, H, T + img, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    refs = {j: tuple(torch.randn(1, H, Lr, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            for j in range(n)}
    rmap = torch.zeros(2, n, img, device="cuda").scatter_(1, torch.randint(0, n, (2, 1, img), device="cuda",
                                                                         generator=g), 1.0)
    null = torch.tensor([False, True], device="cuda")
    plan = fast.KeyPlan([0] * R + [1] * R, P, img, [0, 1], [0.0, 0.25], n, routed=True, null_rows=True)
    both = fast.joint_attention(q, k, v, plan, refs, fast.subject_log_weights(T, img, n, 2, "cuda", rmap, null))
    for row in range(2):
        alone = fast.joint_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], plan, refs,
                                     fast.subject_log_weights(T, img, n, 1, "cuda", rmap[row:row + 1],
                                                              null[row:row + 1]))
        assert (both[row:row + 1].float() - alone.float()).abs().max().item() < 1e-2
