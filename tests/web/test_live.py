"""nodes/live.py in-process, with REAL ComfyUI sampling on the tiny SDXL-family model and a stand-in
PromptServer: one small map per step goes to the client that queued the prompt, coloured like the
preview node; nothing is rendered or sent when no client listens or there is no server; a failing
preview never changes or breaks sampling; GET /anystory/palette is registered once."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import sys
import types
from pathlib import Path

import pytest
from comfy_harness import load_module  # registered by tests/nodes/conftest.py

NODES_DIR = Path(__file__).resolve().parents[1] / "nodes"




F = load_module("anystory_fixtures", NODES_DIR / "anystory_fixtures.py")
env = F.env
temp_dir = F.temp_dir


class FakePromptServer:
    """What nodes/live.py uses of server.PromptServer.instance."""

    def __init__(self, client_id="client-1", connected=True, fail=False):
        from aiohttp import web

        self.client_id = client_id
        self.sockets = {client_id: object()} if (client_id and connected) else {}
        self.sent = []
        self.fail = fail
        self.last_prompt_id = "prompt-1"
        self.routes = web.RouteTableDef()

    def send_sync(self, event, data, sid=None):
        if self.fail:
            raise RuntimeError("socket gone")
        self.sent.append((event, data, sid))


@pytest.fixture
def fake_server(monkeypatch):
    monkeypatch.setattr(live_mod(), "MIN_INTERVAL_S", 0.0)  # every step, however fast the tiny model is

    def install(**kw):
        srv = FakePromptServer(**kw)
        mod = types.ModuleType("server")
        mod.PromptServer = type("PromptServer", (), {"instance": srv})
        monkeypatch.setitem(sys.modules, "server", mod)
        return srv
    return install


def live_mod():
    return F.pack_mod("nodes.live")


def apply_node(env, unique_id="30", router_mode="masks"):
    return F.node(env.pack, "AnyStoryApply").apply(env.model, env.am, env.subjects, router_mode, 1.0, 1.0, 0.0, 1.0,
                                                   region_masks=env.masks, unique_id=unique_id)


def decode(data_url: str):
    import numpy as np
    from PIL import Image

    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_live_map_per_step_to_the_queueing_client(env, fake_server):
    import numpy as np
    import torch

    srv = fake_server()
    patched, routing = apply_node(env)
    assert sum(isinstance(cb, live_mod().LivePreview) for cb in routing.listeners) == 1
    env.sample(patched, torch.zeros(1, 4, 16, 16), steps=3, seed=0)
    msgs = [m for m in srv.sent if m[0] == "anystory.routing"]
    assert [m[1]["step"] for m in msgs] == [0, 1, 2]
    assert [m[1]["final"] for m in msgs] == [False, False, True]
    assert all(m[2] == "client-1" and m[1]["node"] == "30" and m[1]["steps"] == 3 for m in msgs)
    pal = F.pack_mod("anystory.preview")
    d = msgs[-1][1]
    assert d["labels"] == ["the cat", "the dog"] and d["colors"] == pal.PALETTE_HEX[:2]
    assert d["background"] == pal.BACKGROUND_HEX and d["mode"] == "masks" and d["prompt_id"] == "prompt-1"
    json.dumps(d)  # what send_json will do
    img = decode(d["image"]).astype(np.float32) / 255
    assert max(img.shape[:2]) <= 128 and min(img.shape[:2]) >= 64
    # masks mode with half masks: left half subject 1's colour, right half subject 2's (striped = darker)
    cols = [np.array(pal.hex_to_rgb(h)) for h in pal.PALETTE_HEX[:2]]
    h, w = img.shape[:2]
    for i, half in enumerate((img[:, : w // 2 - 4], img[:, w // 2 + 4:])):
        px = half.reshape(-1, 3)
        ok = (np.abs(px - cols[i]).max(-1) < 0.02) | (np.abs(px - 0.55 * cols[i]).max(-1) < 0.02)
        assert ok.all(), f"subject {i + 1}'s half has other colours"
    assert len(d["image"]) < 20_000


def test_one_listener_per_recorder_and_none_without_a_server(env, fake_server, monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    _, routing = apply_node(env)
    assert routing.listeners == []           # in-process use: nothing attached at all
    fake_server()
    _, routing = apply_node(env, unique_id=None)
    assert routing.listeners == []           # no node id (called outside the executor)
    _, routing = apply_node(env)
    live_mod().attach(routing, "30")
    assert len(routing.listeners) == 1


@pytest.mark.parametrize("client", ["none", "disconnected"])
def test_nothing_rendered_when_no_client_listens(env, fake_server, monkeypatch, client):
    import torch

    srv = fake_server(client_id=None) if client == "none" else fake_server(connected=False)
    calls = []
    monkeypatch.setattr(live_mod(), "step_map", lambda *a, **k: calls.append(1))
    patched, _ = apply_node(env)
    env.sample(patched, torch.zeros(1, 4, 16, 16), steps=2, seed=0)
    assert srv.sent == [] and calls == []


def test_a_failing_preview_never_changes_or_breaks_sampling(env, fake_server, monkeypatch, caplog):
    import torch

    monkeypatch.delitem(sys.modules, "server", raising=False)
    patched, _ = apply_node(env)
    ref = env.sample(patched, torch.zeros(1, 4, 16, 16), steps=3, seed=4)
    srv = fake_server()
    patched, _ = apply_node(env)
    with_live = env.sample(patched, torch.zeros(1, 4, 16, 16), steps=3, seed=4)
    assert len(srv.sent) == 3
    assert torch.equal(ref, with_live), "the live preview changed the sampling result"
    fake_server(fail=True)
    patched, _ = apply_node(env)
    with caplog.at_level(logging.WARNING, logger="anystory"):
        failed = env.sample(patched, torch.zeros(1, 4, 16, 16), steps=3, seed=4)
    assert torch.equal(ref, failed)
    warned = [r for r in caplog.records if "live routing preview" in r.getMessage()]
    assert len(warned) == 1, "expected exactly one warning for the failing preview"


def test_palette_route_registered_once(fake_server, pack):
    srv = fake_server()
    live = live_mod()
    assert live.register_routes() is True
    assert live.register_routes() is False
    routes = [r for r in srv.routes if getattr(r, "path", None) == "/anystory/palette"]
    assert len(routes) == 1 and routes[0].method == "GET"
    resp = asyncio.run(routes[0].handler(None))
    body = json.loads(resp.body)
    pal = F.pack_mod("anystory.preview")
    assert body == {"subjects": pal.PALETTE_HEX, "background": pal.BACKGROUND_HEX, "max_subjects": pal.MAX_SUBJECTS}


def test_step_map_votes_layers_at_the_finest_grid(pack):
    import torch

    live = live_mod()
    # two layers at 4×4 say subject 0 on the left, subject 1 on the right; one 2×2 layer says background
    left = torch.tensor([[0, 0, 1, 1]] * 4, dtype=torch.uint8).view(1, 16)
    rec = {("input", 4, 0): ((4, 4), left, torch.zeros(1, 16, dtype=torch.uint8)),
           ("input", 5, 0): ((4, 4), left, torch.ones(1, 16, dtype=torch.uint8)),
           ("input", 7, 0): ((2, 2), torch.full((1, 4), 2, dtype=torch.uint8), torch.ones(1, 4, dtype=torch.uint8))}
    index, masked = live.step_map(rec, num_subjects=2)
    assert index.tolist() == [[0, 0, 1, 1]] * 4
    assert bool(masked.all())  # 2 of 3 layers were decided by a mask
    png = live.render_png(index, masked, 2)
    from PIL import Image
    im = Image.open(io.BytesIO(png))
    assert im.size == (128, 128)
    # an odd grid enlarges by a whole factor; a huge one (8192 px wide image) shrinks to 128
    assert Image.open(io.BytesIO(live.render_png(torch.zeros(40, 96, dtype=torch.long), torch.zeros(40, 96, dtype=torch.bool), 2))).size == (96, 40)
    big = live.render_png(torch.zeros(100, 512, dtype=torch.long), torch.zeros(100, 512, dtype=torch.bool), 2)
    assert Image.open(io.BytesIO(big)).size == (128, 25)
