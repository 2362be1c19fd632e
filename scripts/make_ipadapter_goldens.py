#!/usr/bin/env python3
"""Make the IP-Adapter Resampler goldens in tests/goldens/ipadapter/ by running the OFFICIAL IP-Adapter code, unmodified.

What runs
---------
``ip_adapter/resampler.py`` of the official IP-Adapter repository (github tencent-ailab/IP-Adapter, commit
62e4af9d0c1ac7d5f8dd386a0ccf2211346af1a2) — the "Resampler" QFormer of IP-Adapter Plus, the architecture of this
pack's subject QFormer (E_i) and routing QFormer (R_i, one query) — imported from the path given on the command
line (their code is never copied into this repository). Its ``Resampler`` is built with a small configuration of
IP-Adapter Plus's structure (the defaults of ``IPAdapterPlus.init_proj`` with smaller widths: depth 2, 2 heads of
16, ff_mult 4, no positional embedding, no mean-pooled latents), with m = 1, 16 and 64 queries (R_i, IP-Adapter
Plus's 16 tokens, a long one), all three sharing every weight but their own ``latents``. Every parameter is drawn
from ``torch.Generator().manual_seed(SEED)`` (weights ~ N(0, 1/fan_in), LayerNorm weights 1 + N(0, 0.1²), biases
N(0, 0.1²), latents ~ N(0, 1/dim)), and the module runs in fp32 on the CPU on a random input x [2, 65, 24].

Output: ``tests/goldens/ipadapter/resampler.safetensors`` (fp32, ≈ 0.15 MB): ``x``, the shared weights under
their own key names prefixed ``weights.`` (IP-Adapter's state_dict keys, which are also the checkpoint keys the
pack reads), ``latents.m{m}`` and ``out.m{m}`` (their ``Resampler.forward(x)``, [2, m, 40]); ``__metadata__``
has the configuration, the commit and the torch version. tests/anystory/test_ipadapter_golden.py loads the
weights into the pack's ``anystory.paper.encoder.Resampler`` (strictly, same keys) and holds its output to these
(fp32, ≤ 1e-5).

Remake
------
    git clone https://github.com/tencent-ailab/IP-Adapter /tmp/IP-Adapter
    git -C /tmp/IP-Adapter checkout 62e4af9d0c1ac7d5f8dd386a0ccf2211346af1a2
    ~/.cache/comfyui-anystory/venv/bin/python scripts/make_ipadapter_goldens.py /tmp/IP-Adapter/ip_adapter/resampler.py

(it needs torch, einops and safetensors: the pack's test environment has them). A bare mirror works too:
``git --git-dir=<mirror> show 62e4af9d…:ip_adapter/resampler.py > /tmp/resampler.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "goldens" / "ipadapter" / "resampler.safetensors"
IPADAPTER_COMMIT = "62e4af9d0c1ac7d5f8dd386a0ccf2211346af1a2"
SEED = 19
CONFIG = dict(dim=32, depth=2, dim_head=16, heads=2, embedding_dim=24, output_dim=40, ff_mult=4)
QUERIES = (1, 16, 64)
X_SHAPE = (2, 65, 24)


def load_their_resampler(path: str):
    """The ``Resampler`` class of the given ``resampler.py`` (imported by location, not copied)."""
    spec = importlib.util.spec_from_file_location("ipadapter_resampler_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Resampler


def randomise(module: torch.nn.Module, g: torch.Generator) -> None:
    """Every parameter from ``g`` (so LayerNorms and biases matter too)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "latents":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif p.ndim == 1 and name.endswith("weight"):        # LayerNorm scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:                                      # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:                                                  # Linear weights
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def make(resampler_path: str, out: Path = OUT) -> dict:
    Resampler = load_their_resampler(resampler_path)
    g = torch.Generator().manual_seed(SEED)
    base = Resampler(num_queries=max(QUERIES), **CONFIG).eval()
    randomise(base, g)
    shared = {k: v.detach().clone() for k, v in base.state_dict().items() if k != "latents"}
    x = torch.randn(*X_SHAPE, generator=g)
    tensors = {"x": x}
    tensors.update({f"weights.{k}": v for k, v in shared.items()})
    for m in QUERIES:
        mod = Resampler(num_queries=m, **CONFIG).eval()
        latents = torch.randn(1, m, CONFIG["dim"], generator=g) / math.sqrt(CONFIG["dim"])
        mod.load_state_dict(dict(shared, latents=latents), strict=True)
        with torch.no_grad():
            y = mod(x)
        tensors[f"latents.m{m}"] = latents
        tensors[f"out.m{m}"] = y.detach().clone()
    meta = {"what": "official IP-Adapter Resampler (ip_adapter/resampler.py) on seeded random weights, fp32, CPU",
            "commit": IPADAPTER_COMMIT, "config": json.dumps(CONFIG), "queries": json.dumps(list(QUERIES)),
            "seed": str(SEED), "torch": torch.__version__, "remake": "python scripts/make_ipadapter_goldens.py "
            "<IP-Adapter checkout>/ip_adapter/resampler.py"}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=meta)
    return tensors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("resampler_py", help="ip_adapter/resampler.py of an IP-Adapter checkout at commit "
                                         f"{IPADAPTER_COMMIT}")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    tensors = make(args.resampler_py, Path(args.out))
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out} ({size / 1024:.0f} KiB): " + ", ".join(
        f"{k} {tuple(v.shape)}" for k, v in tensors.items() if not k.startswith("weights.")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
