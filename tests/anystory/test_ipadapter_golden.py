"""The pack's QFormer (``anystory.paper.encoder.Resampler``: E_i with m queries, R_i with one) against figures
recorded from the OFFICIAL IP-Adapter Resampler (github tencent-ailab/IP-Adapter, ``ip_adapter/resampler.py`` at
commit 62e4af9d, run unmodified by ``scripts/make_ipadapter_goldens.py`` on seeded random weights; that script says
how to remake them). The same weights are loaded strictly under IP-Adapter's own key names — the keys of the
IP-Adapter Plus checkpoints the pack reads — and the outputs must agree to fp32 rounding."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from anystory.paper.encoder import Resampler

GOLDEN = Path(__file__).resolve().parents[1] / "goldens" / "ipadapter" / "resampler.safetensors"


def _golden():
    with safe_open(str(GOLDEN), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("m", [1, 16, 64])
def test_qformer_equals_the_official_ipadapter_resampler(m):
    tensors, meta = _golden()
    assert meta["commit"].startswith("62e4af9d") and json.loads(meta["queries"]) == [1, 16, 64]
    cfg = json.loads(meta["config"])
    ours = Resampler(num_queries=m, **cfg).eval()
    sd = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    sd["latents"] = tensors[f"latents.m{m}"]
    ours.load_state_dict(sd, strict=True)  # IP-Adapter's key names, every one of them
    assert ours.num_queries == m
    with torch.no_grad():
        got = ours(tensors["x"])
    want = tensors[f"out.m{m}"]
    assert got.shape == want.shape == (2, m, cfg["output_dim"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert want.abs().max() > 0.5  # not a degenerate output


def test_goldens_stay_small():
    assert GOLDEN.stat().st_size < 200 * 1024
