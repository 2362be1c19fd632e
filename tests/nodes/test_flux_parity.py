"""AnyStory FLUX on a REAL ComfyUI FLUX model vs the authors' pipeline (goldens of scripts/make_flux_goldens.py).

The tiny ComfyUI FLUX model gets the goldens' random transformer (diffusers names → ComfyUI through ComfyUI's key
map), the pack's patch is applied to a ``model.clone()`` with the goldens' random ``anystory_flux`` file, and each
denoising step of the authors' run is replayed as one model call through ComfyUI's FLUX forward (its DIFFUSION_MODEL
wrappers and dit block replaces). Compared, per step: the noise prediction, every block's image (and text) output,
every block's routing map. Tolerances (fp32): |Δ| ≤ ATOL + RTOL·|golden|; routing maps must be identical.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comfy_harness import load_module  # registered by tests/nodes/conftest.py

ff = load_module("flux_fixtures", Path(__file__).with_name("flux_fixtures.py"))

ATOL, RTOL = 2e-5, 2e-5
STEPS = 4


@pytest.fixture(scope="module")
def mods(pack):
    from comfy_harness import pack_module
    return {"patch": pack_module("nodes.flux.patch"), "ckpt": pack_module("anystory.flux.checkpoint"),
            "subject": pack_module("anystory.flux.subject")}


@pytest.fixture(scope="module")
def flux_model(comfy):
    return ff.tiny_flux(comfy)


@pytest.fixture(scope="module")
def weights(mods):
    return mods["ckpt"].load_flux_checkpoint(str(ff.GOLDEN / "anystory_flux_tiny.bin"))


def _close(got, want, what):
    err = (got.float() - want.float()).abs()
    bound = ATOL + RTOL * want.float().abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max |Δ| {err.max().item():.3e} (golden max {want.abs().max().item():.3e})"
    return err.max().item(), (err.max() / want.abs().max().clamp_min(1e-12)).item()


def replay(mods, model, weights, name, **over):
    """Run every step of golden case ``name`` through the patched ComfyUI model; yields per-step results."""
    golden, meta = ff.case(name)
    inp = ff.inputs()
    subs = ff.subjects(mods["subject"].FluxSubject, meta["subjects"], inp, with_router=meta["router"])
    s = ff.settings(mods["patch"].FluxSettings, meta, **over.pop("settings", {}))
    patched, patch = mods["patch"].apply_anystory_flux(model, weights, subs, s, **over)
    rec = ff.BlockRecorder(patched)
    h = w = meta["height"] // 8
    sample_sigmas = inp["sigmas"]
    for step, x in enumerate(ff.step_latents(inp, golden, STEPS)):
        sigma = (inp["timesteps"][step] / 1000).reshape(1)
        rec.out.clear()
        v = ff.call_model(patched, ff.unpack(x, h, w), sigma, inp["prompt_embeds"], inp["pooled"],
                          torch.tensor([meta["guidance_scale"]]), sample_sigmas)
        yield step, golden, ff.pack(v), dict(rec.out), patch.maps.get(step, {})


@pytest.mark.parametrize("name", ff.CASES)
def test_parity_with_authors(mods, flux_model, weights, name):
    worst = {"noise": 0.0, "blocks": 0.0, "maps": 0}
    for step, golden, v, blocks, maps in replay(mods, flux_model, weights, name):
        e, _ = _close(v, golden[f"step{step}.noise_pred"], f"{name} step {step} noise prediction")
        worst["noise"] = max(worst["noise"], e)
        T = ff.config()["txt"]
        for key, val in golden.items():
            if not key.startswith(f"step{step}."):
                continue
            part = key.split(".", 1)[1]
            if part.endswith(".routing"):
                kind, i = ("double", int(part[6])) if part.startswith("double") else ("single", int(part[6]))
                got = maps.get((kind, i))
                assert got is not None, f"{name} step {step}: no routing map recorded for {kind} block {i}"
                assert torch.equal(got.float(), val), f"{name} step {step} {kind} block {i}: routing maps differ"
                worst["maps"] += 1
            elif part.startswith("double") and blocks:
                i, stream = int(part[6]), part.split(".")[1]
                out = blocks[("double_block", i)][stream]
                worst["blocks"] = max(worst["blocks"], _close(out, val, f"{name} step {step} {part}")[0])
            elif part.startswith("single") and blocks:
                i = int(part[6])
                out = blocks[("single_block", i)]["img"]
                worst["blocks"] = max(worst["blocks"], _close(out[:, -val.shape[1]:], val,
                                                             f"{name} step {step} {part}")[0])
        if not any(k.endswith(".routing") for k in golden if k.startswith(f"step{step}.")):
            assert not maps, f"{name} step {step}: routing maps where the authors have none"
    print(f"\n{name}: max |Δ| noise {worst['noise']:.2e}, blocks {worst['blocks']:.2e}, "
          f"{worst['maps']} routing maps identical")
