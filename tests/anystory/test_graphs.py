"""CUDA graphs of the hook bodies (anystory.graphs): the slot logic on the CPU (a stand-in capture), the
row split of eq. 6-8 they enable, and — on a CUDA machine — that graph replays give the eager outputs."""
import functools

import pytest
import torch

from anystory.fast.graphs import HookGraphs
from anystory.fast.grouped import GroupedBuffers, query_extra
from anystory.fast.reference import prepare_references, reference_attention_body
from anystory.paper.attention import sdpa
from anystory.paper.reference import routed_reference_attention
from anystory.patch import NEGATIVE_BACKGROUND, NEGATIVE_REFERENCES, CallState, chunks_from_roles
from anystory.routing import MODE_ATTENTION, MODE_MASKS, MODE_ROUTER

from .test_patch import GRIDS, HEADS, LAYOUT, C, make


class FakeGraph:
    def __init__(self, body):
        self.body, self.replays = body, 0

    def replay(self):
        self.replays += 1
        self.body()  # a real graph re-runs the captured kernels on the captured addresses


def fake_graphs(monkeypatch, **kw):
    hg = HookGraphs(enabled=True, **kw)
    captured = []

    def capture(body, inputs, device):
        g = FakeGraph(lambda: body(*inputs))
        g.inputs = inputs
        captured.append(g)
        return g, body(*inputs)

    monkeypatch.setattr(hg, "_capture", capture)
    return hg, captured


def test_slot_runs_eagerly_then_captures_then_replays(monkeypatch):
    hg, captured = fake_graphs(monkeypatch)
    x = torch.zeros(3)
    static = torch.zeros(1)
    calls = []

    def body(x):
        calls.append(1)
        return static

    assert hg.run("a", (x,), (static,), body) is static and len(calls) == 1 and not captured  # warm-up, eager
    hg.run("a", (x,), (static,), body)
    assert len(captured) == 1 and captured[0].replays == 1  # captured, then replayed for this call
    hg.run("a", (x,), (static,), body)
    assert captured[0].replays == 2 and len(captured) == 1
    assert hg.stats == {"eager": 1, "capture": 1, "replay": 1, "staged": 0}


def test_a_new_address_is_a_new_variant_and_the_last_variant_reads_copies(monkeypatch):
    hg, captured = fake_graphs(monkeypatch, max_variants=3)
    static = torch.zeros(4)

    def body(x):  # what the graph computes from its input
        return static.copy_(x * 2)

    xs = [torch.full((4,), float(i)) for i in range(5)]
    hg.run("a", (xs[0],), (static,), body)
    hg.run("a", (xs[0],), (static,), body)  # captured on xs[0]'s address
    hg.run("a", (xs[1],), (static,), body)  # another address: the graph would read stale memory
    assert len(captured) == 2 and captured[1].inputs[0] is xs[1]
    out = hg.run("a", (xs[2],), (static,), body)  # the last variant: staged, it reads a copy of the input
    assert len(captured) == 3 and captured[2].inputs[0] is not xs[2] and torch.equal(out, xs[2] * 2)
    out = hg.run("a", (xs[3],), (static,), body)  # any further address: copied in, replayed
    assert len(captured) == 3 and captured[2].replays == 2 and torch.equal(out, xs[3] * 2)
    out = hg.run("a", (xs[1],), (static,), body)
    assert captured[1].replays == 2 and torch.equal(out, xs[1] * 2)
    assert hg.stats == {"eager": 1, "capture": 3, "replay": 2, "staged": 1}
    hg.run("a", (torch.zeros(5),), (static.new_zeros(5),), lambda x: x)  # other shapes: eager
    assert hg.stats["eager"] == 2
    other = torch.zeros(4)
    hg.run("a", (xs[0],), (other,), lambda x: other)  # same address, other static tensor: not replayed
    assert captured[0].replays == 1
    hg.run("b", (xs[0],), (static,), body)  # slots are independent
    assert hg.stats["eager"] == 4
    hg._failed, hg.last_error = True, "a capture failed"
    hg.clear()
    assert not hg._failed and hg.last_error is None  # the next run tries graphs again
    hg.run("a", (xs[0],), (static,), body)
    assert hg.stats["eager"] == 5  # dropped with the run: warm-up again


def test_five_direct_variants_before_the_staged_one():
    """By default a slot captures five variants at the inputs' own addresses before the staged one (the
    allocator's addresses can take a few steps to settle after another sampling)."""
    assert HookGraphs(enabled=True).max_variants == 6


def test_graphs_are_not_used_off_cuda_or_while_autograd_records(monkeypatch):
    hg = HookGraphs(enabled=True)
    assert not hg.usable(torch.zeros(2))
    monkeypatch.setenv("ANYSTORY_CUDA_GRAPHS", "0")
    assert not HookGraphs().enabled
    monkeypatch.setenv("ANYSTORY_CUDA_GRAPHS", "1")
    assert HookGraphs().enabled


def test_split_rows_give_the_fused_reference_attention():
    """Cond rows through the fused call, uncond rows (background) through the plain attention: the same
    as all rows through the fused call, and as the dense definition."""
    g = torch.Generator().manual_seed(3)
    B, L, T = 4, 12, 5
    q, k, v = (torch.randn(B, L, C, generator=g) for _ in range(3))
    kr, vr = [torch.randn(T, C, generator=g) for _ in range(2)], [torch.randn(T, C, generator=g) for _ in range(2)]
    index = torch.randint(0, 3, (B, L), generator=g)
    index[2:] = 2  # rows 2-3: uncond, background
    prep = prepare_references(kr, vr, HEADS, torch.tensor([1.0, 2.0]))
    qe = query_extra(index, 2, q.dtype)
    fused = reference_attention_body(q, k, v, prep, HEADS, qe, GroupedBuffers())(q, k, v)
    split = reference_attention_body(q, k, v, prep, HEADS, qe[0:2], GroupedBuffers(), rows=slice(0, 2))(q, k, v)
    dense = routed_reference_attention(q, k, v, kr, vr, index, HEADS, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(split, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split, dense, atol=1e-4, rtol=1e-4)
    out = torch.empty(B, L, C)
    assert reference_attention_body(q, k, v, prep, HEADS, qe[2:], GroupedBuffers(), rows=slice(2, 4),
                                    out=out)(q, k, v) is out  # cond rows last (ComfyUI may batch uncond first)


def test_cond_rows_of_a_call():
    assert CallState(chunks_from_roles([True, False], 2)).cond_rows() == slice(0, 2)
    assert CallState(chunks_from_roles([False, True, True], 1)).cond_rows() == slice(1, 3)
    assert CallState(chunks_from_roles([True, False, True], 1)).cond_rows() is None  # not contiguous
    assert CallState(chunks_from_roles([True], 1)).cond_rows() is None  # all rows: one fused call


@pytest.mark.parametrize("mode,roles,negative", [(MODE_MASKS, (True, False), False),
                                                 (MODE_ROUTER, (True, True, False), False),
                                                 (MODE_ATTENTION, (False, True), False),
                                                 (MODE_ROUTER, (True, False), True)])  # uncond rows with references
@torch.inference_mode()
def test_every_body_writes_the_tensor_it_returns(monkeypatch, mode, roles, negative):
    """With a stand-in capture whose replay re-runs the body (on the CPU), the outputs of every step equal
    the eager ones although the inputs change every step: a body must write its result into the tensor it
    returns (a result made inside a real capture would be stale, or overwritten in the shared pool)."""
    from anystory.attention_router import AttentionRouter
    labels = [[1, 2], [5]] if mode == MODE_ATTENTION else None

    def patch(graphs):
        ar = AttentionRouter(2, warmup_steps=1, threshold=0.2, smooth=1) if labels else None
        rp, _ = make(mode=mode, gamma=1.5, masks=labels is None, attention_router=ar,
                     negative_rows=NEGATIVE_REFERENCES if negative else NEGATIVE_BACKGROUND)
        if graphs:
            rp.graphs = fake_graphs(monkeypatch, max_variants=3)[0]  # the staged variant from step 3 on
            monkeypatch.setattr(rp.graphs, "usable", lambda *t: True)
        rp.begin_run()
        return rp

    eager, graphed = patch(False), patch(True)
    want = _steps(eager, 6, dtype=torch.float32, roles=roles, labels=labels, dev="cpu", new_inputs=True)
    got = _steps(graphed, 6, dtype=torch.float32, roles=roles, labels=labels, dev="cpu", new_inputs=True)
    assert graphed.graphs.stats["replay"] > 0, graphed.graphs.stats
    for s, (ws, gs) in enumerate(zip(want, got)):
        for w, o in zip(ws, gs):
            torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {s}: {m}")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="NO CUDA DEVICE: CUDA graph replay is only checked on a GPU machine "
                                       "(run this file there)")


def _cudnn_first(q, k, v, *args, **kwargs):
    """ComfyUI's SDPA: torch's under the backend priority cuDNN, flash, efficient, math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, *args, **kwargs)


def _steps(rp, steps, dtype=torch.float16, shift_at=None, roles=(True, False), flip_at=None, labels=None,
           host_sdpa=None, dev="cuda", new_inputs=False):
    """Sampler-like steps: per layer fresh q/k/v (the same allocation order every step, as ComfyUI's UNet),
    attn1 → route → attn2 with ComfyUI's direct text-attention path. ``roles``: cond/uncond of the batch's
    chunks (one row each), reversed from step ``flip_at`` on; ``new_inputs``: other values every step
    (else the same). Returns the outputs per step on the host."""
    text_sdpa = torch.nn.functional.scaled_dot_product_attention
    base = functools.partial(sdpa, heads=HEADS)
    results = []
    for step in range(steps):
        g = torch.Generator(device=dev).manual_seed(100 + (step if new_inputs else 0))
        pad = torch.empty(1 << 20, device=dev) if step == shift_at else None  # moves the allocations
        order = list(roles)[::-1] if flip_at is not None and step >= flip_at else list(roles)
        state = CallState(chunks_from_roles(order, 1), step=step)
        if labels is not None:
            state.labels = [labels if r else None for r in order]
        B = len(order)
        outs = []
        for spec in LAYOUT:
            hw = GRIDS[spec.key]
            L = hw[0] * hw[1]
            q, k, v, n = (torch.randn(B, L, C, device=dev, dtype=dtype, generator=g) for _ in range(4))
            a1 = rp.self_attention(state, spec.key, q, k, v, HEADS, hw, lambda q, k, v: base(q, k, v),
                                   plain_sdpa=host_sdpa or text_sdpa)
            outs.append(a1.float().cpu().clone())  # the output buffer is reused by the next layer
            rp.route(state, spec.key, n, hw)
            kt, vt = (torch.randn(B, 9, C, device=dev, dtype=dtype, generator=g) for _ in range(2))
            a2 = rp.cross_attention(state, spec.key, q, kt, vt, HEADS, lambda q, k, v: base(q, k, v),
                                    text_sdpa=text_sdpa, base_owned=True)
            outs.append(a2.float().cpu().clone())
            del q, k, v, n, kt, vt, a1, a2
        del pad
        results.append(outs)
    return results


def _label_router(rp):
    """The AttentionRouter of a patch's routing (AttentionRouting, or the base of a MixedRouting)."""
    routing = getattr(rp.routing, "base", rp.routing)
    return routing.router


@needs_cuda
@pytest.mark.parametrize("mode,roles,flip_at", [(MODE_MASKS, (True, False), None), (MODE_ROUTER, (True, False), None),
                                                (MODE_ROUTER, (True, True, False), None),  # two positive chunks
                                                (MODE_MASKS, (True, False), 4),  # cond/uncond order changes
                                                (MODE_ATTENTION, (True, False), None)])  # the attention router
@torch.inference_mode()
def test_graph_replays_give_the_eager_outputs_on_cuda(mode, roles, flip_at):
    from anystory.attention_router import AttentionRouter
    labels = [[1, 2], [5]] if mode == MODE_ATTENTION else None

    def patch(graphs):
        ar = AttentionRouter(2, warmup_steps=1, threshold=0.2, smooth=1) if labels else None
        rp, proj = make(mode=mode, gamma=1.5, masks=labels is None, attention_router=ar)
        rp.graphs = HookGraphs(enabled=graphs, max_variants=3)  # the staged variant after the shift
        proj.to("cuda", torch.float16)  # the UNet's attn1 projections (route K/V and G_i move by themselves)
        rp.adapter.to("cuda")  # the learned router runs where the latent is
        rp.begin_run()
        return rp

    eager, graphed = patch(False), patch(True)
    want = _steps(eager, 7, roles=roles, flip_at=flip_at, labels=labels)
    # where inputs move every step, the staged variant serves (steps 3+)
    # and with ComfyUI's backend priority: cuDNN on the staging buffers' strided views (eager: flash)
    got = _steps(graphed, 7, shift_at=3, roles=roles, flip_at=flip_at, labels=labels, host_sdpa=_cudnn_first)
    stats = dict(graphed.graphs.stats)
    assert graphed.graphs.last_error is None
    assert stats["capture"] > 0 and stats["replay"] > 0, stats
    assert eager.graphs.stats == {"replay": 0, "capture": 0, "eager": 0, "staged": 0}
    for s, (ws, gs) in enumerate(zip(want, got)):
        for w, o in zip(ws, gs):
            torch.testing.assert_close(o, w, atol=2e-3, rtol=2e-3, msg=lambda m: f"step {s}: {m}")
    if labels:  # the label attention saw the same attention (and routed the same)
        assert torch.equal(_label_router(graphed).maps().cpu() > 0.2, _label_router(eager).maps().cpu() > 0.2)
    graphed.end_run()
    assert not graphed.graphs._slots


# ------------------------------------------------------------------------------------------------
# ForwardGraphs: whole encoder forwards (ReferenceNet pass, CLIP vision) kept across encodes
# ------------------------------------------------------------------------------------------------

def fake_forward_graphs(monkeypatch, **kw):
    from anystory.fast.graphs import ForwardGraphs
    fg = ForwardGraphs(enabled=True, **kw)
    captured = []

    def capture(fn, static, device):
        out = fn(*static)
        g = FakeGraph(lambda: _rewrite(out, fn(*static)))  # a replay rewrites the captured outputs in place
        captured.append(g)
        return g, out

    monkeypatch.setattr(fg, "_capture", capture)
    monkeypatch.setattr(fg, "_usable", lambda inputs: True)
    return fg, captured


def _rewrite(out, new):
    if isinstance(out, dict):
        for k in out:
            _rewrite(out[k], new[k])
    else:
        out.copy_(new)


def test_forward_graph_runs_eagerly_then_captures_then_replays_on_new_inputs(monkeypatch):
    fg, captured = fake_forward_graphs(monkeypatch)
    net = torch.nn.Linear(4, 3)
    fn = lambda x: {"y": net(x)}  # noqa: E731
    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        first = fg.run("net", fn, (xs[0],), net)
        assert not captured and fg.stats == {"eager": 1, "capture": 0, "replay": 0}
        second = fg.run("net", fn, (xs[1],), net)
        assert len(captured) == 1 and captured[0].replays == 1
        torch.testing.assert_close(second["y"], net(xs[1]))
        third = fg.run("net", fn, (xs[2],), net)  # replayed on a copy of the new input
        assert third is second and captured[0].replays == 2
        torch.testing.assert_close(third["y"], net(xs[2]))
        torch.testing.assert_close(first["y"], net(xs[0]))  # the eager result is the caller's own
        fg.run("net", fn, (torch.randn(5, 4),), net)  # another shape: the graph is not replayed
        assert captured[0].replays == 2 and len(captured) == 2


def test_forward_graph_is_dropped_when_the_weights_move_or_are_computed_at_call_time(monkeypatch):
    fg, captured = fake_forward_graphs(monkeypatch)
    net = torch.nn.Linear(4, 3)
    fn = lambda x: net(x)  # noqa: E731
    x = torch.randn(2, 4)
    with torch.no_grad():
        fg.run("net", fn, (x,), net)
        fg.run("net", fn, (x,), net)
        assert len(captured) == 1
        net.weight = torch.nn.Parameter(net.weight * 2)  # ComfyUI re-patched (LoRA) or reloaded the model
        out = fg.run("net", fn, (x,), net)
        assert len(captured) == 2 and captured[0].replays == 1  # the stale graph is never replayed
        torch.testing.assert_close(out, net(x))
        other = torch.nn.Linear(4, 3)
        fg.run("net", lambda x: other(x), (x,), other)  # another model under the same key: captured anew
        assert len(captured) == 3
        net.weight_function = [lambda w: w]  # a weight computed at call time: never baked into a graph
        before = dict(fg.stats)
        torch.testing.assert_close(fg.run("net", fn, (x,), net), net(x))
        assert fg.stats["eager"] == before["eager"] + 1 and len(captured) == 3


def test_forward_graphs_keep_the_most_recent_and_a_failed_capture_runs_eagerly(monkeypatch, caplog):
    fg, captured = fake_forward_graphs(monkeypatch, max_entries=2, warmup=0)
    nets = [torch.nn.Linear(2, 2) for _ in range(3)]
    x = torch.randn(1, 2)
    with torch.no_grad():
        for i, n in enumerate(nets):
            fg.run(i, n, (x,), n)
        assert list(fg._entries) == [1, 2]  # the least recently used (0) was dropped
        fg.run(1, nets[1], (x,), nets[1])
        assert list(fg._entries) == [2, 1]

        def boom(fn, static, device):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(fg, "_capture", boom)
        n = torch.nn.Linear(2, 2)
        with caplog.at_level("WARNING", logger="anystory"):
            torch.testing.assert_close(fg.run("bad", n, (x,), n), n(x))
            fg.run("bad", n, (x,), n)
        assert sum("capture of bad failed" in r.getMessage() for r in caplog.records) == 1


def test_forward_graphs_are_not_used_off_cuda_or_when_turned_off(monkeypatch):
    from anystory.fast.graphs import ForwardGraphs
    net = torch.nn.Linear(2, 2)
    fg = ForwardGraphs()
    with torch.no_grad():
        fg.run("k", net, (torch.randn(1, 2),), net)
        fg.run("k", net, (torch.randn(1, 2),), net)
    assert fg.stats == {"eager": 2, "capture": 0, "replay": 0} and not fg._entries
    monkeypatch.setenv("ANYSTORY_CUDA_GRAPHS", "0")
    assert not ForwardGraphs()._usable((torch.zeros(1),))


@needs_cuda
@torch.inference_mode()
def test_forward_graph_replays_give_the_eager_outputs_on_cuda():
    from anystory.fast.graphs import ForwardGraphs
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 4, 3, padding=1)).cuda().half()
    fg = ForwardGraphs(enabled=True, min_vram_gb=0)
    fn = lambda x: {"out": net(x), "mid": net[0](x)}  # noqa: E731
    for i in range(4):
        x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
        got = fg.run("net", fn, (x,), net)
        want = fn(x)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    assert fg.stats == {"eager": 1, "capture": 1, "replay": 2}
    net.cpu().cuda()  # the weights move, as when ComfyUI unloads and reloads a model
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(fg.run("net", fn, (x,), net)["out"], net(x))
    assert fg.stats["capture"] == 2


def test_released_forward_graphs_are_captured_again_at_the_next_call(monkeypatch):
    """release() (at every sampling start) frees the graphs; a key already warmed up is captured at once."""
    fg, captured = fake_forward_graphs(monkeypatch)
    net = torch.nn.Linear(2, 2)
    x = torch.randn(1, 2)
    with torch.no_grad():
        fg.run("k", net, (x,), net)
        fg.run("k", net, (x,), net)
        fg.release()
        assert not fg._entries
        fg.run("k", net, (x,), net)
    assert len(captured) == 2 and fg.stats == {"eager": 1, "capture": 2, "replay": 0}


@needs_cuda
@torch.inference_mode()
def test_forward_graph_captures_leave_no_memory_behind_on_cuda():
    """Capture → release, again and again (a prompt's encodes, then sampling): allocated memory returns to
    the same level every cycle (a new capture stream per capture used to leave cuBLAS's 32 MB workspace)."""
    from anystory.fast.graphs import ForwardGraphs
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda().half()
    fg = ForwardGraphs(enabled=True, min_vram_gb=0)
    x = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    levels = []
    for _ in range(4):
        for _ in range(2):
            torch.testing.assert_close(fg.run("mlp", net, (x,), net), net(x))
        fg.release()
        torch.cuda.synchronize()
        levels.append(torch.cuda.memory_allocated())
    assert fg.stats["capture"] == 4 and levels[1] == levels[2] == levels[3], levels
