"""AnyStory FLUX core (no ComfyUI): the file reader and its conversion, the LoRA semantics, the subject encoders
against the authors' outputs (goldens), the routing map and attention bias against the authors' formulas."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anystory.flux import checkpoint as ckpt
from anystory.flux.encoder import SubjectEncoder, siglip_token_mask
from anystory.flux.lora import REF_SITES, ROUTER_SITES, LoraWeight, StreamLoRA, lora_targets, parse_peft_lora, peft_alpha
from anystory.flux.routing import TokenLayout, attention_bias, routing_map

REPO = Path(__file__).resolve().parents[3]
GOLDEN = REPO / "tests" / "goldens" / "flux"
BIN = GOLDEN / "anystory_flux_tiny.bin"


@pytest.fixture(scope="module")
def weights():
    return ckpt.load_flux_checkpoint(str(BIN))


# --- the file ------------------------------------------------------------------------------------
def test_reads_the_released_layout(weights):
    assert (weights.depth, weights.depth_single) == (2, 2)
    assert len(weights.ref_lora) == 1 + 2 * 7 + 2 * 6 and len(weights.router_lora) == 1 + 2 * 6 + 2 * 6
    assert set(weights.routing) == {("double", 0), ("double", 1), ("single", 0), ("single", 1)}
    w = weights.ref_lora["transformer_blocks.0.attn.to_q"]
    assert w.rank == 4 and w.scale == 0.5 and w.bias is None          # α = 2 from the .alpha keys
    r = weights.router_lora["transformer_blocks.1.attn.add_k_proj"]
    assert r.scale == 1.0 and r.bias is not None                       # no α keys: α = rank → 1
    q = weights.routing[("single", 1)]["q"]
    assert q.rank == 128 and q.bias is not None and q.scale == 1.0
    assert "gate_proj.weight" in weights.redux and "redux_up_lora_A.weight" in weights.router_embedder
    assert "AnyStory FLUX" in weights.describe()


def test_safetensors_conversion_round_trip(tmp_path, weights):
    out = tmp_path / "anystory_flux.safetensors"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_anystory_flux.py"), str(BIN), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "anystory-flux" and json.loads(meta["alpha.ref"]) == 2.0
    back = ckpt.load_flux_checkpoint(str(out))
    assert back.alphas == weights.alphas
    for name, w in weights.ref_lora.items():
        b = back.ref_lora[name]
        assert torch.equal(b.down, w.down) and torch.equal(b.up, w.up) and b.scale == w.scale
    assert all(torch.equal(back.redux[k], v) for k, v in weights.redux.items())


def _raises(path, *needles):
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_flux_checkpoint(str(path))
    msg = str(e.value)
    assert "anystory_flux.bin" in msg and "models/anystory" in msg, msg  # the fix
    assert len(msg) < 260 and "()" not in msg, msg  # one sentence (issue 18); the evidence goes to the log
    for n in needles:
        assert n in e.value.detail, e.value.detail
    return msg


def test_refuses_other_files_naming_what_was_found(tmp_path):
    flat = tmp_path / "ip-adapter.safetensors"
    save_file({"image_proj.latents": torch.zeros(1, 16, 8)}, str(flat))
    _raises(flat, "format=None", "image_proj.latents")
    sdxl = tmp_path / "anystory_sdxl.bin"
    torch.save({"image_proj": {"a": torch.zeros(1)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}}, sdxl)
    _raises(sdxl, "image_proj")
    code = tmp_path / "evil.bin"
    with open(code, "wb") as f:
        pickle.dump({"ref": print}, f)
    _raises(code, "weights_only")
    _raises(tmp_path / "x.gguf", "no such file")
    raw = torch.load(str(BIN), weights_only=True)
    del raw["router"]["router_embedder.gate_proj.weight"]
    raw["ref"]["transformer.x_embedder.lora_magnitude_vector"] = torch.zeros(4)
    bad = tmp_path / "damaged.bin"
    torch.save(raw, bad)
    msg = _raises(bad, "DoRA", "router_embedder: missing ['gate_proj.weight']")
    assert "damaged.bin" in msg


# --- LoRA semantics --------------------------------------------------------------------------------
def test_peft_alpha_follows_the_authors_loader():
    r4 = {"a.lora_A.weight": torch.zeros(4, 3), "a.lora_B.weight": torch.zeros(5, 4),
          "b.lora_A.weight": torch.zeros(8, 3), "b.lora_B.weight": torch.zeros(5, 8)}
    assert peft_alpha(r4) == 4.0                     # no alphas: the first lora_B's rank
    loras, problems = parse_peft_lora(r4)
    assert not problems and loras["a"].scale == 1.0 and loras["b"].scale == 0.5
    with_alpha = dict(r4, **{"a.alpha": torch.tensor(2.0), "b.alpha": torch.tensor(2.0), "c.alpha": torch.tensor(6.)})
    assert peft_alpha(with_alpha) == 2.0             # the most common α for every module


def test_lora_delta_and_targets_on_fused_weights():
    g = torch.Generator().manual_seed(0)
    w = LoraWeight(torch.randn(2, 6, generator=g), torch.randn(6, 2, generator=g), torch.randn(6, generator=g), 0.5)
    x = torch.randn(3, 6, generator=g)
    assert torch.allclose(w.delta(x), (x @ w.down.T @ w.up.T + w.bias) * 0.5)
    key_map = {"transformer.transformer_blocks.0.attn.to_k": ("diffusion_model.double_blocks.0.img_attn.qkv.weight",
                                                              (0, 6, 6)),
               "transformer.x_embedder": "diffusion_model.img_in.weight"}
    placed, ignored = lora_targets({"transformer_blocks.0.attn.to_k": w, "transformer_blocks.0.ff.net.0.proj": w,
                                    "x_embedder": w}, REF_SITES, 1, 0, key_map)
    assert ignored == ["transformer_blocks.0.ff.net.0.proj"]      # never enabled by the authors' code
    base = torch.zeros(3, 18)
    out = placed.apply("double_blocks.0.img_attn.qkv", x, base)
    assert torch.equal(out[:, :6], base[:, :6]) and torch.allclose(out[:, 6:12], w.delta(x))
    assert torch.equal(base, torch.zeros(3, 18))                   # the module output is not changed in place
    assert "img_in" in placed and len(placed) == 2
    assert set(ROUTER_SITES["double"]).isdisjoint(REF_SITES["double"])


# --- subject encoders vs the authors' outputs -----------------------------------------------------------
def test_subject_and_router_tokens_match_authors(weights):
    inp = load_file(str(GOLDEN / "inputs.safetensors"))
    wts = load_file(str(GOLDEN / "weights.safetensors"))
    base = {k[len("redux."):]: v for k, v in wts.items() if k.startswith("redux.")}
    redux, router = SubjectEncoder(base, weights.redux, 9), SubjectEncoder(base, weights.router_embedder, 3)
    for k in (0, 1):
        f, m = inp[f"subject{k}.siglip"], inp[f"subject{k}.token_mask"]
        e, r = redux(f, m), router(f, m)
        assert e.shape == (1, 81, 32) and r.shape == (1, 9, 32)
        assert torch.allclose(e, inp[f"subject{k}.redux_tokens"], atol=1e-5, rtol=1e-5)
        assert torch.allclose(r, inp[f"subject{k}.router_tokens"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lack"):
        SubjectEncoder({}, weights.redux, 9)


def test_token_mask_pools_like_the_authors():
    mask = torch.zeros(1, 384, 384)
    mask[:, :20, :20] = 1
    tm = siglip_token_mask(mask)
    assert tm.shape == (1, 729, 1) and tm.sum() == 4  # 20 px of 384 touch 2 of 27 cells per side


# --- routing ---------------------------------------------------------------------------------------
def _authors_bias(lay, ref_mask, ref_shift, rmap, heads=2):
    """The dense [b, heads, q, k] mask of the authors' separable_scaled_dot_product_attention (their formulas)."""
    b = rmap.shape[0]
    P, T, E, R = lay.prompt, lay.text, lay.queries, lay.keys
    m = torch.zeros(b, heads, E, R)
    m[:, :, :E, E:R] += ref_shift
    m[:, :, :E, E:R] += (ref_mask.transpose(-1, -2).unsqueeze(1) - 1.0) * 100.0
    red = rmap.unsqueeze(2).repeat((1, 1, lay.redux // lay.num_conds, 1)).flatten(1, 2)
    m[:, :, T:E, P:T] += ((red.unsqueeze(1) - 1) * 100.0).transpose(2, 3)
    ref = rmap.unsqueeze(2).repeat((1, 1, lay.ref // lay.num_conds, 1)).flatten(1, 2)
    m[:, :, T:E, E:R] += ((ref.unsqueeze(1) - 1) * 100.0).transpose(2, 3)
    return m


def test_attention_bias_equals_the_authors_dense_mask():
    g = torch.Generator().manual_seed(3)
    lay = TokenLayout(prompt=5, redux=2 * 4, image=6, ref=2 * 3, num_conds=2)
    rmap = torch.zeros(1, 2, 6).scatter_(1, torch.randint(0, 2, (1, 1, 6), generator=g), 1.0)
    ref_mask = (torch.rand(1, 6, 1, generator=g) > 0.3).float()
    got = attention_bias(lay, 1, torch.float32, "cpu", ref_mask, 0.5, rmap)
    assert got.shape == (1, 1, lay.queries, lay.keys)
    assert torch.equal(got.expand(1, 2, -1, -1), _authors_bias(lay, ref_mask, 0.5, rmap))
    assert attention_bias(lay, 1, torch.float32, "cpu") is None


def test_routing_map_is_one_hot_argmax():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 2 * 9, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    m = routing_map(q, k, 2)
    assert m.shape == (1, 2, 10) and torch.equal(m.sum(1), torch.ones(1, 10))
    logits = torch.einsum("bnd,bld->bnl", q.view(1, 2, 2, 9, 8).mean((1, 3)), k.mean(1))
    assert torch.equal(m.argmax(1), logits.argmax(1))


# --- the fast joint attention (no bias tensor) vs the dense bias ---------------------------------------
def _merged(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@pytest.mark.parametrize("shift,routed,redux", [(0.5, True, True), (0.0, True, True), (-1.25, False, True),
                                                 (0.0, False, False), (0.75, True, False)])
def test_fast_joint_attention_equals_the_dense_bias(shift, routed, redux):
    """Keys the ref_mask hides left out, the rest in key groups merged by their log-sum-exp: the same attention as
    the authors' dense mask (their −100 offsets: exp(−100) is below fp32's resolution of the sums). The pack puts
    the Redux tokens first in the text, the authors last: the rows are compared in the authors' order."""
    from anystory.flux.fast import KeyPlan, joint_attention, subject_log_weights, visible_reference
    g = torch.Generator().manual_seed(11)
    n, P, R, img, Lr, H, D, b = 2, 5, 3 if redux else 0, 6, 4, 2, 16, 2
    lay = TokenLayout(prompt=P, redux=n * R, image=img, ref=n * Lr, num_conds=n)
    q = torch.randn(b, H, lay.queries, D, generator=g)
    k, v = torch.randn(b, H, lay.keys, D, generator=g), torch.randn(b, H, lay.keys, D, generator=g)
    rmap = torch.zeros(b, n, img).scatter_(1, torch.randint(0, n, (b, 1, img), generator=g), 1.0)
    ref_mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.float32).view(1, n * Lr, 1)
    bias = attention_bias(lay, b, torch.float32, "cpu", ref_mask.expand(b, -1, -1), shift, rmap if routed else None)
    want = _merged(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias))

    keep = visible_reference([ref_mask[:, :Lr], ref_mask[:, Lr:]], [Lr, Lr], True)
    assert [t.tolist() for t in keep] == [[0, 2, 3], [1, 2]]
    # the pack's layout: text = [Redux, prompt], then image; reference keys per subject
    order = torch.cat([torch.arange(P, P + n * R), torch.arange(P), torch.arange(lay.text, lay.queries)])
    qp, kp, vp = q[:, :, order], k[:, :, order], v[:, :, order]
    refs = {j: (k[:, :, lay.queries + j * Lr + keep[j]], v[:, :, lay.queries + j * Lr + keep[j]]) for j in range(n)}
    plan = KeyPlan([0] * R + [1] * R, P, img, [0, 1], [shift, shift], n, routed=routed)
    assert plan.grouped
    log_w = subject_log_weights(lay.text, img, n, b, "cpu", rmap) if routed else None
    got = joint_attention(qp, kp, vp, plan, refs, log_w)
    back = torch.argsort(order)
    assert (got[:, back] - want).abs().max() < 2e-6

    # a row of a negative prompt sees no subject: the plain attention over prompt and image keys
    plan = KeyPlan([0] * R + [1] * R, P, img, [0, 1], [shift, shift], n, routed=routed, null_rows=True)
    null = torch.tensor([False, True])
    log_w = subject_log_weights(lay.text, img, n, b, "cpu", rmap if routed else None, null)
    got = joint_attention(qp, kp, vp, plan, refs, log_w)[:, back]
    shared = torch.cat([torch.arange(P), torch.arange(lay.text, lay.queries)])
    plain = _merged(torch.nn.functional.scaled_dot_product_attention(q[1:], k[1:, :, shared], v[1:, :, shared]))
    assert (got[1:] - plain).abs().max() < 2e-6 and (got[:1] - want[:1]).abs().max() < 2e-6

    # a subject without Redux tokens or references adds no group; nothing to group: the plain attention
    assert len(KeyPlan([0] * R, P, img, [], [], n, routed=routed).groups) == (1 if redux and routed else 0)
    assert not KeyPlan([0] * R + [1] * R, P, img, [], [], n, routed=False).grouped


def test_attention_lse_kernels_agree():
    """Every kernel attention_lse may pick gives the math form's output and log-sum-exp (the CPU ones here; the
    CUDA ones in tests/anystory/flux/test_flux_cuda.py)."""
    from anystory.flux import fast
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (7, 11, 11))
    want, want_lse = fast._math(q, k, v)
    torch.testing.assert_close(want, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    for kernel in fast._ORDER["cpu"]:
        out, lse = kernel(q, k, v)
        torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse.reshape(2, 3, -1)[..., :7].float(), want_lse, atol=2e-6, rtol=1e-5)
    chunked = fast._math(q, k, v, budget=2 * 3 * 11 * 3)  # 3 queries a chunk (devices without a fused kernel)
    torch.testing.assert_close(chunked[0], want)
    torch.testing.assert_close(chunked[1], want_lse)
    out, lse = fast.attention_lse(q, k[:, :, 2:], v[:, :, 2:])  # views, as the shared keys are
    want, want_lse = fast._math(q, k[:, :, 2:].contiguous(), v[:, :, 2:].contiguous())
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=1e-5)

def test_attention_lse_falls_back_where_its_kernel_refuses_a_shape(monkeypatch):
    """A fused kernel that takes some shapes and refuses others (as cuDNN may): the refused call is served by the
    next kernel, the cached choice stays."""
    from anystory.flux import fast
    calls = []

    def picky(q, k, v):
        calls.append(k.shape[2])
        if k.shape[2] > 10:
            raise RuntimeError("no kernel for this shape")
        return fast._math(q, k, v)

    monkeypatch.setattr(fast, "_KERNEL", {})
    monkeypatch.setitem(fast._ORDER, "cpu", (picky, fast._math))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (4, 16, 16))
    for keys in (8, 16, 8):
        out, lse = fast.attention_lse(q, k[:, :, :keys], v[:, :, :keys])
        want, want_lse = fast._math(q, k[:, :, :keys], v[:, :, :keys])
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(lse, want_lse)
    assert fast._KERNEL[("cpu", torch.float32, 8)] is picky and calls == [8, 16, 8]


def test_a_kernel_whose_lse_follows_another_convention_is_not_adopted(monkeypatch):
    """attention_lse checks a kernel against the plain form when it first picks it (private ops are called without
    torch's eligibility checks): a base-2 log-sum-exp would mis-weight the key groups; the next kernel serves."""
    import math

    from anystory.flux import fast

    def base2(q, k, v):
        out, lse = fast._math(q, k, v)
        return out, lse / math.log(2.0)

    g = torch.Generator().manual_seed(0)
    n, P, R, img, Lr, H, D = 2, 5, 3, 6, 4, 2, 16
    lay = TokenLayout(prompt=P, redux=n * R, image=img, ref=n * Lr, num_conds=n)
    q, k, v = (torch.randn(1, H, m, D, generator=g) * 2 for m in (lay.queries, lay.keys, lay.keys))
    rmap = torch.zeros(1, n, img).scatter_(1, torch.randint(0, n, (1, 1, img), generator=g), 1.0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(
        lay, 1, torch.float32, "cpu", None, 0.5, rmap)).transpose(1, 2).flatten(2)
    order = torch.cat([torch.arange(P, P + n * R), torch.arange(P), torch.arange(lay.text, lay.queries)])
    refs = {j: (k[:, :, lay.queries + j * Lr:lay.queries + (j + 1) * Lr],
                v[:, :, lay.queries + j * Lr:lay.queries + (j + 1) * Lr]) for j in range(n)}
    plan = fast.KeyPlan([0] * R + [1] * R, P, img, [0, 1], [0.5, 0.5], n, routed=True)
    log_w = fast.subject_log_weights(lay.text, img, n, 1, "cpu", rmap)
    monkeypatch.setattr(fast, "_KERNEL", {})
    monkeypatch.setitem(fast._ORDER, "cpu", (base2, fast._math))
    got = fast.joint_attention(q[:, :, order], k[:, :, order], v[:, :, order], plan, refs, log_w)
    assert fast._KERNEL[("cpu", torch.float32, D)] is fast._math
    assert (got[:, torch.argsort(order)] - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("logit_std", [2.0, 20.0])
def test_router_attention_in_bf16_is_as_close_as_sdpa(logit_std):
    """The routing tokens' attention keeps its scores in fp32 (as the authors' SDPA): in bf16 its error against
    fp32 is that of SDPA, not more (scores rounded to bf16 before the softmax were 2.3× worse)."""
    from anystory.flux.blocks import _router_attention, merge_heads
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    H, D, R, I = 4, 128, 18, 1024
    s = (logit_std * D ** 0.5) ** 0.5 / D ** 0.25
    q = torch.randn(1, H, R, D, generator=g) * s
    ik, rk = torch.randn(1, H, I, D, generator=g) * s, torch.randn(1, H, R, D, generator=g) * s
    iv, rv = torch.randn(1, H, I, D, generator=g), torch.randn(1, H, R, D, generator=g)
    want = merge_heads(F.scaled_dot_product_attention(q, torch.cat((ik, rk), 2), torch.cat((iv, rv), 2)))
    b = [t.bfloat16() for t in (q, ik, iv, rk, rv)]
    got = _router_attention(*b).float()
    sdpa = merge_heads(F.scaled_dot_product_attention(b[0], torch.cat((b[1], b[3]), 2),
                                                      torch.cat((b[2], b[4]), 2))).float()
    rel = lambda x: ((x - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(got) <= 1.5 * rel(sdpa), (rel(got), rel(sdpa))


@pytest.mark.parametrize("batch,bias", [(1, False), (1, True), (2, True)])
def test_lora_added_in_place_equals_its_delta(batch, bias):
    """LoraWeight.add_to / add_into (addmm, the bias added after) give out + delta(x), on row slices of a module's
    output as the blocks pass them (b > 1: not a 2-d view, the plain sum)."""
    from anystory.flux.lora import LoraWeight
    g = torch.Generator().manual_seed(1)
    w = LoraWeight(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g),
                   torch.randn(6, generator=g) if bias else None, 0.5)
    x = torch.randn(batch, 5, 8, generator=g)
    full = torch.randn(batch, 7, 12, generator=g)
    view = full[:, 2:, 3:9]
    want = view + w.delta(x)
    torch.testing.assert_close(w.add_to(x, view), want)
    w.add_into(x, view)
    torch.testing.assert_close(full[:, 2:, 3:9], want)
