"""Live routing preview: while a sampler runs a MODEL patched by AnyStoryApply, push one small map per
step to the editor that queued the prompt, as a PromptServer message

    "anystory.routing": {"node": <AnyStoryApply id>, "step": i (0-based), "steps": n, "final": bool,
                         "image": "data:image/png;base64,…" (≤ 128 px), "labels": [...], "colors": [...],
                         "background": "#…", "mode": router mode, "warning": text or null, "prompt_id": …}

and serve the subject palette as ``GET /anystory/palette`` (one source of truth for the web extension:
anystory/preview.py). The web extension (web/anystory.js) draws the maps on the AnyStoryApply node and
on AnyStoryRoutingPreview nodes fed by it; without the extension nothing changes (the messages are
ignored by other clients and nothing is sent when no client with an id waits for the prompt).

The map of a step: every layer's route index of image 0, voted at the finest grid of that step
(subjects in palette order, background dark, striped where a region mask decided). One transfer of
the step's tiny uint8 maps to the CPU per step, only when a client listens; never per layer. Any
failure here is logged once and dropped: the preview never breaks sampling.
"""
from __future__ import annotations

import base64
import io
import logging
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from aiohttp import web
from PIL import Image

from ..anystory.preview import BACKGROUND_HEX, MAX_SUBJECTS, PALETTE_HEX, index_image, palette

log = logging.getLogger("anystory")

EVENT = "anystory.routing"
MAX_SIDE = 128          # px, longest side of the map sent
MIN_INTERVAL_S = 0.05   # at most ~20 maps a second per node (the last step is always sent)
_warned: set = set()


def _prompt_server():
    """ComfyUI's running PromptServer, or None (in-process use: ``server`` was never imported)."""
    mod = sys.modules.get("server")
    cls = getattr(mod, "PromptServer", None) if mod is not None else None
    return getattr(cls, "instance", None) if cls is not None else None


def palette_payload() -> dict:
    return {"subjects": list(PALETTE_HEX), "background": BACKGROUND_HEX, "max_subjects": MAX_SUBJECTS}


def register_routes() -> bool:
    """Add ``GET /anystory/palette`` to the running PromptServer (once). False when there is none."""
    srv = _prompt_server()
    routes = getattr(srv, "routes", None)
    if routes is None or getattr(srv, "_anystory_routes", False):
        return False
    try:
        @routes.get("/anystory/palette")
        async def anystory_palette(request):  # noqa: ARG001
            return web.json_response(palette_payload())

        srv._anystory_routes = True
        return True
    except Exception as e:  # never stop the pack from loading because of the editor extras
        log.warning("AnyStory: could not register /anystory/palette (%s); the editor uses the colours sent "
                    "with each preview", e)
        return False


def _listening_client(srv) -> Optional[str]:
    """The id of the client that queued the running prompt if it is connected, else None."""
    sid = getattr(srv, "client_id", None)
    if sid is None:
        return None
    sockets = getattr(srv, "sockets", None)
    if sockets is not None and sid not in sockets:
        return None
    return sid


def step_map(rec: dict, num_subjects: int, image: int = 0) -> Optional[tuple]:
    """(index [H, W] long, mask-decided [H, W] bool) of one step: the route of every token voted over
    all recorded layers at the finest grid (one device→CPU transfer). ``rec``: {layer: (hw, index
    [B, L] uint8, source [B, L] uint8)}."""
    items = [(hw, idx, src) for hw, idx, src in rec.values() if idx.shape[0] > image]
    if not items:
        return None
    flat = torch.cat([torch.cat([idx[image].reshape(-1), src[image].reshape(-1)]) for _, idx, src in items])
    flat = flat.to("cpu", torch.uint8)  # the one transfer of the step
    H, W = max((hw for hw, _, _ in items), key=lambda s: s[0] * s[1])
    k = num_subjects + 1  # routes: subjects, then the background
    votes = None
    mask_votes = torch.zeros(H, W)
    pos = 0
    for (h, w), _, _ in items:
        n = h * w
        idx = flat[pos:pos + n].long().view(1, 1, h, w)
        src = flat[pos + n:pos + 2 * n].view(1, 1, h, w)
        pos += 2 * n
        oh = F.one_hot(idx.view(h, w).clamp_max(k - 1), k).permute(2, 0, 1)[None].float()
        if (h, w) != (H, W):
            oh = F.interpolate(oh, size=(H, W), mode="nearest")
            src = F.interpolate(src.float(), size=(H, W), mode="nearest")
        votes = oh[0] if votes is None else votes + oh[0]
        mask_votes += (src[0, 0] == 1).float()
    return votes.argmax(0), mask_votes * 2 > len(items)


def render_png(index: torch.Tensor, masked: torch.Tensor, num_subjects: int, max_side: int = MAX_SIDE) -> bytes:
    H, W = index.shape
    m = max(H, W)
    if m > max_side:  # a very large image: shrink (nearest) to the limit
        size = (max(1, round(H * max_side / m)), max(1, round(W * max_side / m)))
    else:             # enlarge by a whole factor (crisp cells)
        s = max(1, max_side // m)
        size = (H * s, W * s)
    img = index_image((H, W), index.clamp_max(num_subjects), masked.to(torch.uint8), palette(num_subjects), size)
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


class LivePreview:
    """A RoutingRecorder listener that sends each completed step's map to the editor."""

    def __init__(self, node_id: str):
        self.node_id = str(node_id)
        self._last_sent = 0.0

    def __call__(self, recorder, run, step) -> None:
        try:
            srv = _prompt_server()
            if srv is None:
                return
            sid = _listening_client(srv)
            if sid is None:
                return
            final = recorder.current() is not run
            now = time.monotonic()
            if not final and now - self._last_sent < MIN_INTERVAL_S:
                return
            rec = run.steps.get(step)
            if not rec:
                return
            n = recorder.num_subjects
            voted = step_map(rec, n, 0)
            if voted is None:
                return
            index, masked = voted
            png = render_png(index, masked, n)
            sigmas = run.sigmas
            steps = int(sigmas.numel() - 1) if sigmas is not None and sigmas.numel() > 1 else len(run.steps)
            srv.send_sync(EVENT, {
                "node": self.node_id,
                "step": int(step),
                "steps": max(steps, int(step) + 1),
                "final": bool(final),
                "image": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                "width": int(index.shape[1]), "height": int(index.shape[0]),
                "labels": list(recorder.labels),
                "colors": [PALETTE_HEX[i % MAX_SUBJECTS] for i in range(n)],
                "background": BACKGROUND_HEX,
                "mode": getattr(recorder, "mode", None),
                "warning": run.meta.get("warning"),  # e.g. routing cannot start within the run's steps
                "prompt_id": getattr(srv, "last_prompt_id", None),
            }, sid)
            self._last_sent = now
        except Exception as e:  # the preview must never break sampling
            key = (self.node_id, type(e).__name__)
            if key not in _warned:
                _warned.add(key)
                log.warning("AnyStory: live routing preview of node %s failed (%s: %s); sampling goes on",
                            self.node_id, type(e).__name__, e)


def attach(recorder, node_id) -> None:
    """Register the live preview on an AnyStoryApply recorder (no-op without a node id or PromptServer)."""
    if node_id is None or recorder is None or _prompt_server() is None:
        return
    listeners = getattr(recorder, "listeners", None)
    if listeners is None:
        return
    if any(isinstance(cb, LivePreview) and cb.node_id == str(node_id) for cb in listeners):
        return
    listeners.append(LivePreview(node_id))


__all__ = ["EVENT", "attach", "register_routes", "palette_payload", "step_map", "render_png", "LivePreview"]
